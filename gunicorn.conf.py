"""gunicorn settings read by the Procfile's web process (`gunicorn --config gunicorn.conf.py`).

Workers, threads and the bind address stay on the Procfile's command line."""

from __future__ import annotations


def on_starting(server) -> None:
    """Check the configuration in the master, before any worker is forked.

    A worker that cannot build the app exits, and gunicorn answers every exit but a boot
    error by starting another worker: a missing SECRET_KEY made it fork some 150 doomed
    workers in 40 s and never stop. Failing here ends the whole server with the reason."""
    from config import Config

    Config()  # raises ConfigError: a SystemExit that prints the reason and exits 1
