"""Run one process type of the Procfile in the foreground, for a process supervisor.

    .venv/bin/python scripts/procfile_run.py worker

supervisord (deploy/supervisor/switchboard.conf) and systemd (deploy/systemd/switchboard@.service)
start each Procfile line through this, so the Procfile stays the one place that says how web,
worker and assistant run. The command replaces this process (exec): the supervisor's pid is
gunicorn's or dramatiq's own master, which then receives the supervisor's stop signal directly.

As under `honcho start`, a `.env` file beside the Procfile is read first, for the Procfile's
`${WEB_CONCURRENCY:-2}`-style settings; variables already in the environment win over it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def procfile_commands(procfile: Path) -> dict[str, str]:
    commands: dict[str, str] = {}
    for line in procfile.read_text().splitlines():
        name, colon, command = line.partition(":")
        if colon and name.strip() and not name.lstrip().startswith("#"):
            commands[name.strip()] = command.strip()
    return commands


def main(argv: list[str]) -> int:
    commands = procfile_commands(ROOT / "Procfile")
    if len(argv) != 1 or argv[0] not in commands:
        known = ", ".join(commands)
        print(f"usage: procfile_run.py PROCESS_TYPE (one of: {known})", file=sys.stderr)
        return 2

    from dotenv import load_dotenv

    load_dotenv(ROOT / ".env", override=False)
    os.chdir(ROOT)
    # gunicorn and dramatiq of this interpreter's virtualenv, whatever PATH the supervisor has.
    venv_bin = str(Path(sys.executable).parent)
    os.environ["PATH"] = os.pathsep.join([venv_bin, os.environ.get("PATH", "")])
    # bash expands the Procfile's ${VAR:-default}s; its `exec` keeps the one pid throughout.
    os.execvp("bash", ["bash", "-c", "exec " + commands[argv[0]]])
    return 1  # not reached: execvp returns only by raising


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
