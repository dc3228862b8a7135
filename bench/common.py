"""Shared pieces for benchmarks: production-mode apps, processes, a live client, statistics.

Everything a benchmark starts is torn down by the context manager that started it, also on
an exception, Ctrl-C or SIGTERM (bench/run.py turns SIGTERM into KeyboardInterrupt):

    with prod_app("spine", actor_modules=["bench.spine_handlers"]) as env:  # DB, Redis, app
        user = create_tenant_user(env)
        with dramatiq_workers(env, processes=2, threads=8):  # `dramatiq tasks.worker`
            ...
        with web_server(env) as web, LiveClient(web.url) as live:  # gunicorn + /ws/live
            live.login(user.email, user.password).subscribe("/", on_frame=...)

Results are rows (dicts) made with `result(...)`, which prints each one as it is measured;
bench/run.py collects the rows a benchmark's `run(args)` returns into bench/RESULTS.md.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urljoin, urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PG_URL = os.environ.get("SWITCHBOARD_BENCH_DATABASE_URL") or os.environ.get(
    "SWITCHBOARD_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("SWITCHBOARD_BENCH_REDIS_URL") or os.environ.get(
    "SWITCHBOARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"
)
PASSWORD = "bench-password-123"
# Every Redis key a benchmark makes starts with this (REDIS_PREFIX) or its dash form
# (DRAMATIQ_NAMESPACE), so a crashed run's leftovers are easy to find.
KEY_ROOT = "sbbench"


class BenchError(RuntimeError):
    """A benchmark could not run (a service is unreachable, a process did not start, …)."""


# ---------------------------------------------------------------- cleanup safety


_shield_depth = 0


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Hold off Ctrl-C and SIGTERM while cleaning up, so they cannot leave things behind;
    one that arrived meanwhile is raised (as KeyboardInterrupt) when the outermost ends."""
    global _shield_depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _shield_depth:  # nested: the outermost one restores the handlers and raises
        _shield_depth += 1
        try:
            yield
        finally:
            _shield_depth -= 1
        return
    interrupted: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda signum, frame: interrupted.append(signum))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    _shield_depth += 1
    try:
        yield
    finally:
        _shield_depth -= 1
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if interrupted:
        raise KeyboardInterrupt


_children: dict[int, subprocess.Popen] = {}


def _set_parent_death_signal() -> None:
    # Runs in the child before exec: if this (bench) process dies without cleaning up, even
    # by SIGKILL, the kernel sends the child SIGTERM, and its own children follow it.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_process(
    cmd: Sequence[str], env: dict[str, str], log_path: Path, *, cwd: Path = ROOT, pipes=False
) -> subprocess.Popen:
    """Start a command in its own process group, output to log_path; stop it with stop_process.

    pipes=True: its stdin and stdout are pipes to this process (a command-driven helper),
    and only its stderr goes to log_path."""
    log = open(log_path, "ab")  # closed by stop_process
    kwargs: dict[str, Any] = {}
    if sys.platform.startswith("linux"):
        kwargs["preexec_fn"] = _set_parent_death_signal
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
        stdout=subprocess.PIPE if pipes else log,
        stderr=log if pipes else subprocess.STDOUT,
        start_new_session=True,  # Ctrl-C reaches us, and we stop children in order
        **kwargs,
    )
    proc._bench_log = log  # type: ignore[attr-defined]
    _children[proc.pid] = proc
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group, wait, then SIGKILL whatever is left of it."""
    with shielded():
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                    os.killpg(proc.pid, signal.SIGCONT)  # a paused group handles it only now
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            # The leader may be gone while forked workers linger: clear the group too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, 0)
                time.sleep(0.5)
                os.killpg(proc.pid, signal.SIGKILL)
        finally:
            _children.pop(proc.pid, None)
            for stream in (proc.stdin, proc.stdout, getattr(proc, "_bench_log", None)):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


@atexit.register
def _kill_leftover_children() -> None:
    for proc in list(_children.values()):
        stop_process(proc, timeout=5)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------- PostgreSQL + Redis


@contextlib.contextmanager
def new_pg_database(label: str = "bench") -> Iterator[str]:
    """Create an empty PostgreSQL database, yield its SQLAlchemy URL, drop it afterwards."""
    import psycopg

    name = f"{KEY_ROOT}_{label}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except Exception as exc:  # noqa: BLE001
        raise BenchError(f"PostgreSQL unreachable at {PG_URL}: {exc}") from exc
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = urlunsplit(urlsplit(PG_URL)._replace(path="/" + name))
        yield url.replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        with shielded(), psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def delete_redis_keys(url: str, *patterns: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    deleted = 0
    try:
        for pattern in patterns:
            batch: list[bytes] = []
            for key in client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += client.delete(*batch)
                    batch = []
            if batch:
                deleted += client.delete(*batch)
    finally:
        client.close()
    return deleted


@contextlib.contextmanager
def redis_namespace(url: str = REDIS_URL) -> Iterator[tuple[str, str]]:
    """(REDIS_PREFIX, DRAMATIQ_NAMESPACE) of our own; every key under them is deleted after."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        raise BenchError(f"Redis unreachable at {url}: {exc}") from exc
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    prefix, namespace = f"{KEY_ROOT}:{tag}:", f"{KEY_ROOT}-{tag}"
    try:
        yield prefix, namespace
    finally:
        with shielded():
            delete_redis_keys(url, prefix + "*", namespace + ":*")


# ---------------------------------------------------------------- a production-mode app


@dataclass
class ProdEnv:
    """A production-mode app (PostgreSQL + RedisBroker + Redis live bus) in this process, and
    the environment that makes `dramatiq` workers and gunicorn see the same database, Redis
    namespace, secret key and actor modules."""

    app: Any
    env: dict[str, str]
    database_url: str
    redis_url: str
    prefix: str
    namespace: str
    tmpdir: Path
    actor_modules: tuple[str, ...] = ()

    @property
    def tasks(self):
        return self.app.extensions["switchboard.tasks"]

    @property
    def broker(self):
        return self.tasks.broker

    def redis(self):
        import redis

        return redis.Redis.from_url(self.redis_url)

    def queue_sizes(self) -> dict[str, int]:
        """Messages queued, delayed or being processed, per queue of the broker."""
        broker = self.broker
        names = {q for q in broker.get_declared_queues() if not q.endswith(".DQ")}
        return {name: int(broker.do_qsize(name)) for name in sorted(names)}

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until every queue of the broker is empty (workers must be running)."""
        if wait_until(lambda: not any(self.queue_sizes().values()), timeout, 0.02) is None:
            raise BenchError(f"queues not drained within {timeout:.0f}s: {self.queue_sizes()}")


def _config(env: dict[str, str]):
    from config import Config

    # Config reads os.environ: build it from exactly the environment the subprocesses get.
    with mock.patch.dict(os.environ, env):
        return Config()


@contextlib.contextmanager
def prod_app(
    label: str = "bench",
    *,
    actor_modules: Iterable[str] = (),
    env: dict[str, str] | None = None,
    schema: str = "create_all",
) -> Iterator[ProdEnv]:
    """A production-mode app on a throwaway PostgreSQL database and Redis namespace.

    actor_modules are imported by this app and by the workers (EXTRA_ACTOR_MODULES), so both
    know the same handlers and actors. `env` adds or overrides environment variables (config
    knobs) for this app, the workers and the web server. schema: "create_all" (fast) or
    "migrate" (`flask db upgrade`, the production way)."""
    modules = tuple(actor_modules)
    tmpdir = Path(tempfile.mkdtemp(prefix=f"{KEY_ROOT}-{label}-"))
    try:
        with new_pg_database(label) as database_url, redis_namespace() as (prefix, namespace):
            full_env = dict(os.environ)
            full_env.update(
                DATABASE_URL=database_url,
                REDIS_URL=REDIS_URL,
                REDIS_PREFIX=prefix,
                DRAMATIQ_NAMESPACE=namespace,
                SECRET_KEY=secrets.token_hex(32),
                SWITCHBOARD_INSTANCE=str(tmpdir / "instance"),
                EXTRA_ACTOR_MODULES=",".join(modules),
                SESSION_COOKIE_SECURE="0",  # the web server is plain http on 127.0.0.1
                FLASK_DEBUG="0",
                PYTHONPATH=str(ROOT),
                PYTHONUNBUFFERED="1",
            )
            # Every benchmark client comes from 127.0.0.1: the abuse limits (sign-ins,
            # API calls, widget messages per address) would refuse the load itself.
            full_env.update(
                LOGIN_LIMIT_PER_IP="1000000/minute",
                LOGIN_LIMIT_PER_EMAIL="1000000/minute",
                API_RATE_LIMIT_PER_IP="1000000/minute",
                API_RATE_LIMIT_PER_TOKEN="1000000/minute",
                CHAT_MESSAGES_PER_IP_PER_MINUTE="1000000",
                CHAT_NEW_CHATS_PER_IP_PER_HOUR="1000000",
                CHAT_MESSAGES_PER_WIDGET_PER_MINUTE="1000000",
            )
            full_env.update(env or {})
            from app import create_app

            app = create_app(_config(full_env))
            penv = ProdEnv(
                app=app,
                env=full_env,
                database_url=database_url,
                redis_url=REDIS_URL,
                prefix=prefix,
                namespace=namespace,
                tmpdir=tmpdir,
                actor_modules=modules,
            )
            try:
                _create_schema(app, schema)
                yield penv
            finally:
                with shielded():
                    app.extensions["switchboard.tasks"].stop()
                    app.extensions["switchboard.live"].hub.stop()
                    from extensions import db

                    with app.app_context():
                        db.session.remove()
                        db.engine.dispose()
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _create_schema(app, schema: str) -> None:
    from extensions import db

    with app.app_context():
        if schema == "migrate":
            from flask_migrate import upgrade

            upgrade()
        else:
            db.create_all()


@dataclass
class BenchUser:
    tenant_id: int
    user_id: int
    email: str
    password: str = PASSWORD


def create_tenant_user(penv: ProdEnv, name: str = "Bench Ltd", role: str = "admin") -> BenchUser:
    """A tenant and a user who can log in to it (their creation events go on the spine)."""
    from extensions import db
    from models.accounts import Tenant
    from services.accounts import create_user

    with penv.app.app_context():
        tenant = Tenant(name=f"{name} {uuid.uuid4().hex[:4]}")
        db.session.add(tenant)
        db.session.flush()
        email = f"bench-{uuid.uuid4().hex[:8]}@example.com"
        user = create_user(email, PASSWORD, tenant, role=role)
        db.session.commit()
        found = BenchUser(tenant_id=tenant.id, user_id=user.id, email=email)
        db.session.remove()
        return found


# ---------------------------------------------------------------- worker and web processes


@dataclass
class Workers:
    proc: subprocess.Popen
    processes: int
    threads: int
    log_path: Path

    def pause(self) -> None:
        """SIGSTOP every worker process: messages queue up until resume() (a backlog)."""
        self.check_alive()
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(
                f"dramatiq exited with {self.proc.returncode}:\n{log_tail(self.log_path)}"
            )


@contextlib.contextmanager
def dramatiq_workers(
    penv: ProdEnv,
    processes: int = 2,
    threads: int = 8,
    *,
    ready_timeout: float = 60.0,
    env: dict[str, str] | None = None,
    queues: Sequence[str] = (),
) -> Iterator[Workers]:
    """`dramatiq tasks.worker --processes N --threads T` (as in the Procfile), ready to consume
    (only the given queues, if any: `--queues`).

    The workers also import bench.worker_hooks, which reports each booted worker process in
    Redis; this waits until all N have booted."""
    dramatiq_bin = shutil.which("dramatiq", path=str(BIN)) or str(BIN / "dramatiq")
    worker_env = dict(penv.env)
    worker_env["EXTRA_ACTOR_MODULES"] = ",".join(("bench.worker_hooks", *penv.actor_modules))
    worker_env["SWITCHBOARD_BENCH_WORKER"] = "1"
    # As the Procfile: idle queues are polled at least every DRAMATIQ_IDLE_POLL_MS.
    worker_env["dramatiq_worker_timeout"] = os.environ.get("DRAMATIQ_IDLE_POLL_MS", "1000")
    worker_env.update(env or {})
    ready_key = penv.prefix + "bench:workers_ready"
    client = penv.redis()
    client.delete(ready_key)
    log_path = penv.tmpdir / f"dramatiq-{uuid.uuid4().hex[:6]}.log"
    cmd = [
        dramatiq_bin,
        "tasks.worker",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--worker-shutdown-timeout",
        "15000",
        *(["--queues", *queues] if queues else []),
    ]
    proc = start_process(cmd, worker_env, log_path)
    workers = Workers(proc=proc, processes=processes, threads=threads, log_path=log_path)
    try:

        def ready() -> bool:
            workers.check_alive()
            return int(client.get(ready_key) or 0) >= processes

        if wait_until(ready, ready_timeout, 0.1) is None:
            raise BenchError(
                f"{processes} dramatiq workers not ready in {ready_timeout:.0f}s:\n"
                + log_tail(log_path)
            )
        yield workers
    except BaseException as exc:
        died = proc.poll() is not None and not isinstance(exc, BenchError)
        if died or os.environ.get("BENCH_VERBOSE"):
            print(log_tail(log_path), file=sys.stderr)
        raise
    finally:
        client.close()
        stop_process(proc, timeout=25)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class WebServer:
    url: str
    proc: subprocess.Popen
    log_path: Path
    ready_timeout: float = 60.0
    _ready: bool = False

    def wait_ready(self) -> WebServer:
        """Wait until it serves the login page (web_server(..., wait=False) starts it only)."""
        if self._ready:
            return self
        import requests

        def up() -> bool:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"gunicorn exited with {self.proc.returncode}:\n{log_tail(self.log_path)}"
                )
            try:
                return requests.get(self.url + "/login", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        if wait_until(up, self.ready_timeout, 0.1) is None:
            raise BenchError(
                f"gunicorn not serving in {self.ready_timeout:.0f}s:\n{log_tail(self.log_path)}"
            )
        self._ready = True
        return self


@contextlib.contextmanager
def web_server(
    penv: ProdEnv,
    workers: int = 1,
    threads: int = 32,
    *,
    env: dict[str, str] | None = None,
    wait: bool = True,
    ready_timeout: float = 60.0,
) -> Iterator[WebServer]:
    """The console under gunicorn (gthread, as in the Procfile) in production mode.

    wait=False returns as soon as it is started (to boot it alongside the workers); call
    `wait_ready()` before using it."""
    gunicorn_bin = shutil.which("gunicorn", path=str(BIN)) or str(BIN / "gunicorn")
    port = free_port()
    web_env = dict(penv.env)
    web_env.update(env or {})
    log_path = penv.tmpdir / f"gunicorn-{port}.log"
    cmd = [
        gunicorn_bin,
        "--worker-class",
        "gthread",
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--bind",
        f"127.0.0.1:{port}",
        "--graceful-timeout",
        "5",
        "wsgi:app",
    ]
    proc = start_process(cmd, web_env, log_path)
    server = WebServer(
        url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, ready_timeout=ready_timeout
    )
    try:
        if wait:
            server.wait_ready()
        yield server
    finally:
        stop_process(proc, timeout=15)


# ---------------------------------------------------------------- a live-socket client


class LiveClient:
    """A logged-in browser without a browser: it opens the /ws/live socket a page was
    rendered with (topics signed by the server) and timestamps every frame it receives.

    Frames arrive on a reader thread: `on_frame(received_at, text)` is called for each
    (received_at is time.perf_counter()), and `frames` keeps them all."""

    def __init__(self, base_url: str) -> None:
        import requests

        self.base_url = base_url.rstrip("/")
        self.http = requests.Session()
        self.ws = None
        self.snapshot = ""
        self.frames: list[tuple[float, str]] = []
        self.error: BaseException | None = None
        self._on_frame: Callable[[float, str], None] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._arrived = threading.Condition()

    def login(self, email: str, password: str = PASSWORD) -> LiveClient:
        page = self.http.get(self.base_url + "/login", timeout=10)
        match = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.text)
        if not match:
            raise BenchError("login page has no CSRF token")
        response = self.http.post(
            self.base_url + "/login",
            data={"email": email, "password": password, "csrf_token": match.group(1)},
            allow_redirects=False,
            timeout=10,
        )
        if response.status_code != 303:
            raise BenchError(f"login failed ({response.status_code})")
        return self

    def live_url(self, path: str = "/") -> str:
        """The ws:// URL (with its signed topics) the page at `path` connects to."""
        page = self.http.get(self.base_url + path, timeout=10)
        match = re.search(r'hx-ws:connect="([^"]+)"', page.text)
        if not match:
            raise BenchError(f"{path} has no live connection (logged in?)")
        target = match.group(1).replace("&amp;", "&")
        # The page may name the socket by path ("/ws/live?…") or as a full ws:// URL.
        return urljoin(self.base_url.replace("http://", "ws://", 1) + "/", target)

    def subscribe(
        self, path: str = "/", *, on_frame: Callable[[float, str], None] | None = None
    ) -> str:
        """Open the page's live socket, wait for its snapshot, then read frames in a thread."""
        import websocket

        url = self.live_url(path)
        cookie = "; ".join(f"{c.name}={c.value}" for c in self.http.cookies)
        # No pure-Python UTF-8 check of every frame (a browser's is native): on a page with
        # live meters it cost this process more CPU than everything it measures. A frame
        # that is not UTF-8 still fails, in its decoding.
        ws = websocket.WebSocket(enable_multithread=True, skip_utf8_validation=True)
        ws.connect(url, cookie=cookie, origin=self.base_url, timeout=10)
        self.ws = ws
        self.snapshot = ws.recv()
        self._on_frame = on_frame
        ws.settimeout(0.5)
        self._thread = threading.Thread(target=self._read, name="live-client", daemon=True)
        self._thread.start()
        return self.snapshot

    def _read(self) -> None:
        import websocket

        while not self._stop.is_set():
            try:
                text = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception as exc:  # noqa: BLE001 - closed: report it to the benchmark
                if not self._stop.is_set():
                    self.error = exc
                break
            received = time.perf_counter()
            if isinstance(text, bytes):
                text = text.decode(errors="replace")
            with self._arrived:
                self.frames.append((received, text))
                self._arrived.notify_all()
            if self._on_frame is not None:
                self._on_frame(received, text)

    def reader_ident(self) -> int:
        """The reader thread's ident (for CpuMeter's ("thread", ident))."""
        if self._thread is None or self._thread.ident is None:
            raise BenchError("the live client is not reading")
        return self._thread.ident

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until predicate() holds, re-checking whenever a frame arrives."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.error is not None:
                    return predicate()
                self._arrived.wait(min(remaining, 0.1))
        return True

    def close(self) -> None:
        self._stop.set()
        if self.ws is not None:
            with contextlib.suppress(Exception):
                self.ws.close(timeout=2)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.http.close()

    def __enter__(self) -> LiveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- timing and statistics


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01):
    """Poll predicate until true; the time.perf_counter() when it was, or None on timeout."""
    deadline = time.perf_counter() + timeout
    while True:
        if predicate():
            return time.perf_counter()
        if time.perf_counter() >= deadline:
            return None
        time.sleep(interval)


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), interpolating linearly between ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def sized(args: Any, name: str, defaults: dict[str, tuple], prefix: str) -> Any:
    """A benchmark's size: its --<prefix>-<name> option when given, else the DEFAULTS entry
    (full run, --quick run) for the kind of run this is."""
    value = getattr(args, f"{prefix}_{name}", None)
    if value is not None:
        return value
    full, quick = defaults[name]
    return quick if args.quick else full


def summarize(values: Sequence[float]) -> dict[str, float]:
    """count, mean, min, p50, p90, p99, max of values."""
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "mean": sum(values) / len(values),
        "min": min(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
    }


# ---------------------------------------------------------------- results


def fmt_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != value:  # NaN
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def result(
    figure: str,
    value: Any,
    unit: str = "",
    *,
    ratio: float | None = None,
    vs: str = "",
    detail: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """A result row, printed at once. `ratio` is value ÷ the baseline named by `vs`."""
    row: dict[str, Any] = {
        "figure": figure,
        "value": value,
        "unit": unit,
        "ratio": ratio,
        "vs": vs,
        "detail": detail,
        **extra,
    }
    print_row(row)
    return row


def ratio_text(row: dict[str, Any]) -> str:
    ratio = row.get("ratio")
    if ratio is None:
        return ""
    text = f"{ratio:.3f}×" if abs(ratio) < 1 else f"{ratio:.2f}×"
    return f"{text} {row['vs']}".strip()


def value_text(row: dict[str, Any]) -> str:
    return f"{fmt_number(row.get('value'))} {row.get('unit') or ''}".strip()


def print_row(row: dict[str, Any]) -> None:
    parts = [f"  {row.get('figure', '?'):<36} {value_text(row):>15}"]
    if row.get("ratio") is not None:
        parts.append(f"  [{ratio_text(row)}]")
    if row.get("detail"):
        parts.append(f"  {row['detail']}")
    print("".join(parts), flush=True)


_started = time.perf_counter()


def note(text: str) -> None:
    """Progress output between figures, with the seconds since the run started."""
    print(f"  · {time.perf_counter() - _started:5.1f}s {text}", flush=True)


# ---------------------------------------------------------------- machine


def _run(cmd: Sequence[str]) -> str:
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _ram() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def _postgres_version() -> str:
    try:
        import psycopg

        with psycopg.connect(PG_URL, connect_timeout=3) as conn:
            return str(conn.execute("SHOW server_version").fetchone()[0])
    except Exception as exc:  # noqa: BLE001
        return f"unreachable ({exc.__class__.__name__})"


def _redis_version() -> str:
    try:
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        try:
            return str(client.info("server").get("redis_version"))
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001
        return f"unreachable ({exc.__class__.__name__})"


def _git_commit() -> str:
    commit = _run(["git", "rev-parse", "--short=12", "HEAD"])
    if not commit:
        return "unknown"
    # The results file itself is what a run writes: a run after another is no less the
    # commit's for it.
    dirty = _run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/RESULTS.md"]
    )
    return commit + (" + uncommitted changes" if dirty else "")


def _versions(*names: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{name} {version(name)}")
    return ", ".join(found)


def load_average() -> str:
    """The 1-minute load average: other work on the machine skews every figure."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def machine_info() -> dict[str, str]:
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return {
        "CPU": _cpu_model(),
        "cores": f"{usable} usable of {cores}" if usable != cores else str(cores),
        "RAM": _ram(),
        "OS": platform.platform(terse=True),
        "Python": platform.python_version(),
        "PostgreSQL": _postgres_version(),
        "Redis": _redis_version(),
        "packages": _versions("dramatiq", "SQLAlchemy", "psycopg", "redis", "gunicorn", "Flask"),
        "git commit": _git_commit(),
    }


__all__ = [
    "BenchError",
    "BenchUser",
    "BIN",
    "create_tenant_user",
    "delete_redis_keys",
    "dramatiq_workers",
    "fmt_number",
    "free_port",
    "KEY_ROOT",
    "LiveClient",
    "load_average",
    "log_tail",
    "machine_info",
    "new_pg_database",
    "note",
    "PASSWORD",
    "percentile",
    "PG_URL",
    "print_row",
    "prod_app",
    "ProdEnv",
    "ratio_text",
    "redis_namespace",
    "REDIS_URL",
    "result",
    "ROOT",
    "shielded",
    "start_process",
    "stop_process",
    "summarize",
    "value_text",
    "wait_until",
    "web_server",
    "WebServer",
    "Workers",
]


# ---------------------------------------------------------------- processes seen from /proc


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (up to the hard limit);
    processes started afterwards inherit it. Returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (e.g. gunicorn's workers), from /proc."""
    found: set[int] = set()
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            found.update(int(p) for p in children.read_text().split())
    return sorted(found)


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (VmRSS, VmHWM, Threads, …); empty if the process is gone."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def proc_rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (or its peak, field="VmHWM") in MiB; NaN if gone."""
    value = proc_status(pid).get(field, "")
    return int(value.split()[0]) / 1024 if value else float("nan")


def _proc_stat(stat: Path) -> tuple[str, list[str]] | None:
    """(command name, the fields after it) of /proc/PID/stat; None if the process is gone.
    fields[0] is the state, [2] the process group, [11:15] utime stime cutime cstime (ticks)."""
    try:
        text = stat.read_text()
    except OSError:
        return None
    return text[text.find("(") + 1 : text.rfind(")")], text.rsplit(")", 1)[1].split()


def proc_cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used so far, all its threads; NaNs if gone."""
    parsed = _proc_stat(Path(f"/proc/{pid}/stat"))
    if parsed is None:
        return float("nan"), float("nan")
    fields = parsed[1]
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (all its threads); NaN if gone."""
    return sum(proc_cpu_times(pid))


def proc_open_files(pid: int) -> int:
    """How many file descriptors a process holds (-1 if unreadable)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _live_processes() -> Iterator[tuple[str, int, float]]:
    """(command name, process group, CPU seconds) of each live process, from /proc/PID/stat.

    The CPU seconds count the process's own user + system time and that of the children it
    has reaped (cutime, cstime): a server's exited connections (PostgreSQL's backends, which
    its postmaster reaps) keep counting after they are gone."""
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        parsed = _proc_stat(stat)
        if parsed is None:
            continue
        comm, fields = parsed
        try:
            yield comm, int(fields[2]), sum(int(f) for f in fields[11:15]) / tick
        except (IndexError, ValueError):
            continue


def _thread_cpu_seconds(ident: int) -> float:
    """CPU seconds used so far by a live thread of this process (0 once it has ended)."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(ident))
    except (OSError, ProcessLookupError):
        return 0.0


class CpuMeter:
    """CPU seconds used between start() and stop() by named sets of processes.

    Each name maps to a process group (an int: its pgid, as start_process makes one per
    command), to every process of one command name (a str such as "postgres" or
    "redis-server": a local server and its connections, which may serve others on the
    machine too), to "self" (this process, all its threads but those named apart), or to
    ("thread", ident): one thread of this process (a measuring client that lives in the
    bench process, counted apart from what it measures)."""

    def __init__(self, **who: int | str | tuple[str, int]) -> None:
        self.who = who
        self.used: dict[str, float] = {}
        self.seconds = 0.0

    def read(self) -> dict[str, float]:
        times = os.times()
        threads = {
            name: _thread_cpu_seconds(key[1])
            for name, key in self.who.items()
            if isinstance(key, tuple) and key[0] == "thread"
        }
        apart = sum(threads.values())
        found = {
            name: times.user + times.system - apart
            for name, key in self.who.items()
            if key == "self"
        }
        found.update(threads)
        others = {name: key for name, key in self.who.items() if isinstance(key, int | str)}
        others = {name: key for name, key in others.items() if key != "self"}
        found.update(dict.fromkeys(others, 0.0))
        for comm, pgid, seconds in _live_processes():
            for name, key in others.items():
                if key == pgid or key == comm:
                    found[name] += seconds
        return found

    def start(self) -> None:
        self._start, self._at = self.read(), time.perf_counter()

    def stop(self) -> None:
        end, self.seconds = self.read(), time.perf_counter() - self._at
        self.used = {name: end[name] - self._start[name] for name in end}

    @property
    def total(self) -> float:
        return sum(self.used.values())

    def text(self) -> str:
        """Each set's CPU seconds and share of a core over the measured time."""
        parts = [
            f"{name} {used:.1f} CPU-s ({used / self.seconds:.0%} of a core)"
            for name, used in self.used.items()
        ]
        return f"over {self.seconds:.1f} s: " + ", ".join(parts)

    def per(self, count: int) -> str:
        """Each set's CPU milliseconds per unit of work (`count` units), largest first."""
        return ", ".join(
            f"{name} {used * 1000 / count:.2f}"
            for name, used in sorted(self.used.items(), key=lambda item: -item[1])
        )


__all__ += [
    "CpuMeter",
    "child_pids",
    "proc_cpu_seconds",
    "proc_cpu_times",
    "proc_open_files",
    "proc_rss_mb",
    "proc_status",
    "raise_open_files_limit",
]
