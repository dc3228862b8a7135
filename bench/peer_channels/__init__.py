"""A Django Channels peer for the fanout benchmark (bench/bench_fanout.py), run side by side.

The peer is the usual Channels way to push HTML to dashboards: Django + Channels under daphne
(one process, like our one gunicorn web process), the RedisPubSubChannelLayer on the same
Redis, and one AsyncWebsocketConsumer (consumers.py) that joins the "devices" group and sends
each fragment it is given to its socket. It lives in a throwaway virtualenv of its own,
bench/peer_channels/.venv, built on first use from requirements.txt (pinned versions) and not
a dependency of Switchboard.

This module is the bench's side (it runs in the project's virtualenv): building that
virtualenv, starting daphne, and driving publish.py, the peer's publisher, which runs in the
peer's virtualenv and publishes with the layer's own group_send, so the frames on the wire
are exactly those a Channels app would send itself. The other files run in the peer's
virtualenv with this folder as their working directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    ROOT,
    BenchError,
    free_port,
    log_tail,
    note,
    start_process,
    stop_process,
)

PEER_DIR = Path(__file__).resolve().parent
VENV = PEER_DIR / ".venv"
PYTHON = VENV / "bin" / "python"
REQUIREMENTS = PEER_DIR / "requirements.txt"
STAMP = VENV / ".installed"  # holds the digest of the requirements it was built from
INSTALL_TIMEOUT = 600.0


def ensure_venv() -> Path:
    """The peer virtualenv's python, (re)building the virtualenv when it is missing or was
    built from other requirements. Raises BenchError when it cannot be built (no network)."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    with contextlib.suppress(OSError):
        if PYTHON.exists() and STAMP.read_text().strip() == digest:
            return PYTHON
    note(
        f"building the Channels peer's virtualenv ({os.path.relpath(VENV, ROOT)}: "
        "pip install -r requirements.txt), once …"
    )
    base = shutil.which("python3") or sys.executable
    steps = [
        [base, "-m", "venv", "--clear", str(VENV)],
        [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        + ["-r", str(REQUIREMENTS)],
    ]
    for cmd in steps:
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, cwd=PEER_DIR
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"cannot build the peer virtualenv: {' '.join(cmd)}: {exc}") from exc
        if done.returncode != 0:
            output = (done.stderr or done.stdout).strip().splitlines()
            raise BenchError(
                f"cannot build the peer virtualenv: {' '.join(cmd[:4])} … exited with "
                f"{done.returncode}: {' / '.join(output[-3:])}"
            )
    STAMP.write_text(digest + "\n")
    return PYTHON


def versions(python: Path) -> str:
    """'Django 5.2 · channels 4.3 · …' as installed in the peer virtualenv."""
    code = (
        "from importlib.metadata import version as v; "
        "print(' · '.join(f'{n} {v(n)}' for n in "
        "('Django', 'channels', 'channels-redis', 'daphne', 'Twisted')))"
    )
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    return done.stdout.strip() or "versions unknown"


def _env(redis_url: str, prefix: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "DJANGO_SETTINGS_MODULE")
    }
    env.update(
        PYTHONPATH=str(PEER_DIR),
        DJANGO_SETTINGS_MODULE="settings",
        PEER_REDIS_URL=redis_url,
        PEER_PREFIX=prefix,
        PYTHONUNBUFFERED="1",
    )
    return env


@dataclass
class Peer:
    proc: subprocess.Popen  # daphne itself (python -m daphne): its pid is the server's
    host: str
    port: int
    log_path: Path
    env: dict[str, str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(
                f"daphne exited with {self.proc.returncode}:\n{log_tail(self.log_path)}"
            )


@contextlib.contextmanager
def daphne(python: Path, redis_url: str, prefix: str, log_dir: Path) -> Iterator[Peer]:
    """The peer under daphne (one process) on a free port of 127.0.0.1, until the block ends."""
    host, port = "127.0.0.1", free_port()
    env = _env(redis_url, prefix)
    log_path = log_dir / f"daphne-{port}.log"
    cmd = [str(python), "-m", "daphne", "-b", host, "-p", str(port)]
    # Verbosity 1 logs every connection (thousands of lines); 0 still logs errors.
    cmd += ["-v", "0", "asgi:application"]
    proc = start_process(cmd, env, log_path, cwd=PEER_DIR)
    peer = Peer(proc, host, port, log_path, env)
    try:
        deadline = time.monotonic() + 30
        while True:
            peer.check_alive()
            with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"daphne did not listen within 30 s:\n{log_tail(log_path)}")
            time.sleep(0.1)
        yield peer
    finally:
        stop_process(proc, timeout=10)


class PeerPublisher:
    """Publishes numbered frames with the peer's group_send (publish.py in the peer's
    virtualenv), paced at `rate`/s; the same interface as the fanout bench's own publisher:
    start() returns a thread that ends when the burst is published, first_ns / last_ns are
    the stamps of its first and last frame, error what went wrong."""

    def __init__(self, peer: Peer, python: Path, head: str, tail: str, log_dir: Path) -> None:
        self.peer, self.python, self.log_dir = peer, python, log_dir
        self.card = {"head": head, "tail": tail}
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.first_ns = self.last_ns = 0
        self.sent = 0

    def _spawn(self) -> subprocess.Popen:
        proc = start_process(
            [str(self.python), "publish.py"],
            self.peer.env,
            self.log_dir / "peer-publisher.log",
            cwd=PEER_DIR,
            pipes=True,
        )
        proc.stdin.write(json.dumps(self.card).encode() + b"\n")
        proc.stdin.flush()
        if not proc.stdout.readline():
            stop_process(proc, timeout=5)
            raise BenchError(
                "the peer's publisher did not start:\n"
                + log_tail(self.log_dir / "peer-publisher.log")
            )
        return proc

    def start(self, run: int, count: int, rate: float) -> threading.Thread:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._spawn()
        self.first_ns = self.last_ns = 0
        self.sent = 0
        self.error = None
        command = json.dumps({"run": run, "count": count, "rate": rate}).encode() + b"\n"
        self.thread = threading.Thread(
            target=self._burst, args=(self.proc, command), name="peer-publisher", daemon=True
        )
        self.thread.start()
        return self.thread

    def _burst(self, proc: subprocess.Popen, command: bytes) -> None:
        try:
            proc.stdin.write(command)
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                raise BenchError(
                    "the peer's publisher exited:\n" + log_tail(self.log_dir / "peer-publisher.log")
                )
            answer = json.loads(line)
            if "error" in answer:
                raise BenchError(f"the peer's publisher failed: {answer['error']}")
            self.first_ns, self.last_ns, self.sent = (
                answer["first_ns"],
                answer["last_ns"],
                answer["sent"],
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the measuring coroutine
            self.error = exc

    def halt(self) -> None:
        """Stop a burst that is still being published (after an error or Ctrl-C)."""
        if self.thread is not None and self.thread.is_alive():
            proc, self.proc = self.proc, None  # the next burst starts a fresh one
            if proc is not None:
                stop_process(proc, timeout=5)  # its pipes close: the thread's read returns
            self.thread.join(timeout=5)

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # publish.py ends at the end of its input
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            stop_process(proc, timeout=5)
