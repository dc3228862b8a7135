"""Fault drills: a worker killed mid-work and PostgreSQL restarted under load lose nothing and
show nobody a traceback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select

from events import emit
from models.devices import ActivityLog
from models.events import OutboxEvent
from tests.conftest import PASSWORD, LiveServer, free_port, make_app, shut_down_app
from tests.helpers import Browserless, wait_for, worker_process_env

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- a worker killed mid-work


def _start_worker(app, tmp_path: Path, label: str) -> subprocess.Popen:
    env = worker_process_env(
        app,
        tmp_path / f"worker-{label}",
        EXTRA_ACTOR_MODULES="tests.spine_handlers",
        # The relay in the worker redelivers what a dead worker took but never finished.
        EVENTS_RELAY_INTERVAL="0.5",
        EVENTS_REDELIVER_AFTER="3",
    )
    dramatiq_bin = shutil.which("dramatiq", path=str(Path(sys.executable).parent))
    return subprocess.Popen(
        [dramatiq_bin, "tasks.worker", "--processes", "1", "--threads", "4"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: SIGKILL reaches the forked worker too
    )


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_worker_killed_mid_work_every_event_handled_exactly_once(prod_app, prod_factory, tmp_path):
    from extensions import db

    total = 60
    tenant = prod_factory.tenant()
    first = _start_worker(prod_app, tmp_path, "first")
    second = None
    try:
        with prod_app.app_context():
            for n in range(total):
                # Each handling takes a while, so the kill lands with work in flight; a
                # commit of five is a batch of its own (one commit's events are one batch).
                emit("test.slow", tenant_id=tenant.id, payload={"n": n, "sleep": 0.15})
                if n % 5 == 4:
                    db.session.commit()
            db.session.commit()

            def handled() -> int:
                return db.session.scalar(
                    select(func.count())
                    .select_from(ActivityLog)
                    .where(ActivityLog.activity_type == "slow")
                )

            assert wait_for(lambda: handled() >= 8, timeout=60)
            _kill_group(first, signal.SIGKILL)
            at_kill = handled()
            assert at_kill < total, "the worker finished before it could be killed"

            second = _start_worker(prod_app, tmp_path, "second")
            assert wait_for(lambda: handled() >= total, timeout=90), handled()
            # Let redeliveries of already-finished work arrive: they must change nothing.
            time.sleep(4)
            summaries = db.session.scalars(
                select(ActivityLog.summary).where(ActivityLog.activity_type == "slow")
            ).all()
            counts = Counter(summaries)
            assert sorted(counts) == sorted(f"slow {n}" for n in range(total))
            assert set(counts.values()) == {1}  # exactly once in effect
            assert wait_for(
                lambda: (
                    db.session.scalar(
                        select(func.count())
                        .select_from(OutboxEvent)
                        .where(OutboxEvent.topic == "test.slow", OutboxEvent.status != "done")
                    )
                    == 0
                ),
                timeout=30,
            )
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                _kill_group(proc, signal.SIGTERM)


# ---------------------------------------------------------------- PostgreSQL restarted


class PrivatePostgres:
    """A throwaway PostgreSQL cluster of our own, so the drill can stop and start it."""

    def __init__(self, base: Path) -> None:
        self.bin = Path(
            subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
            or "/usr/lib/postgresql/15/bin"
        )
        self.data = base / "pgdata"
        self.port = free_port()
        self.sockdir = base / "pgsock"
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*self.as_postgres, *args], capture_output=True, text=True, timeout=60
        )
        if result.returncode:
            raise subprocess.CalledProcessError(
                result.returncode, args, result.stdout, result.stderr
            )

    def init(self) -> PrivatePostgres:
        for path in (self.data.parent, self.sockdir):
            path.mkdir(parents=True, exist_ok=True)
        if self.as_postgres:
            shutil.chown(self.data.parent, "postgres")
            shutil.chown(self.sockdir, "postgres")
            os.chmod(self.data.parent, 0o755)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8")  # fmt: skip
        self.start()
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1"
        log = str(self.data / "log.txt")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-l", log,
                  "-o", options, "start")  # fmt: skip

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture
def private_postgres():
    if not shutil.which("pg_config") and not Path("/usr/lib/postgresql").exists():
        pytest.skip("PostgreSQL server binaries not installed")
    # Not under pytest's tmp dir: that is private to root, and the server runs as postgres.
    base = Path(tempfile.mkdtemp(prefix="switchboard-pg-"))
    os.chmod(base, 0o755)
    pg = PrivatePostgres(base)
    try:
        pg.init()
        yield pg
    finally:
        try:
            pg.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(base, ignore_errors=True)


def test_postgres_restart_under_load_fails_cleanly_and_recovers(tmp_path, private_postgres):
    from extensions import db
    from tests.conftest import Factory

    app = make_app(tmp_path, SQLALCHEMY_DATABASE_URI=private_postgres.url)
    with app.app_context():
        db.create_all()
    user = Factory(app).user(email="night@ops.example")
    server = LiveServer(app).start()
    statuses: Counter = Counter()
    bodies_with_traceback: list[str] = []
    stop = threading.Event()

    def load(session: Browserless) -> None:
        while not stop.is_set():
            for path in ("/", "/devices/", "/healthz"):
                try:
                    response = session.http.get(server.url + path, timeout=10)
                except requests.RequestException as exc:
                    statuses[type(exc).__name__] += 1
                    continue
                statuses[response.status_code] += 1
                if "Traceback" in response.text:
                    bodies_with_traceback.append(response.text[:500])

    try:
        sessions = [Browserless(server.url).login(user.email, PASSWORD) for _ in range(3)]
        threads = [threading.Thread(target=load, args=(s,), daemon=True) for s in sessions]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        private_postgres.stop()
        time.sleep(2.0)
        down = sessions[0].http.get(server.url + "/devices/", timeout=10)
        assert down.status_code == 503 and "unavailable" in down.text
        health = sessions[0].http.get(server.url + "/healthz", timeout=10)
        assert health.status_code == 503 and health.json()["checks"]["database"]["ok"] is False
        private_postgres.start()
        # The app recovers by itself: no restart, the same logged-in sessions work again.
        assert wait_for(
            lambda: sessions[0].http.get(server.url + "/devices/", timeout=10).status_code == 200,
            timeout=30,
        )
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
        assert statuses[200] > 0 and statuses[503] > 0, statuses
        assert set(statuses) <= {200, 503}, statuses  # never a 500, never a dropped connection
        assert bodies_with_traceback == []
    finally:
        stop.set()
        server.stop()
        shut_down_app(app)


# ---------------------------------------------------------------- Redis stopped mid-stream


def test_redis_stopped_while_committing_loses_nothing_and_pages_catch_up(
    tmp_path, pg_database_url, private_redis
):
    import dramatiq

    from events.dispatch import relay
    from extensions import db
    from tests.conftest import Factory, prod_overrides
    from tests.helpers import receive_until

    overrides = prod_overrides(pg_database_url, private_redis.url)
    # Its handler of test.counted, whichever test files ran before it in this process.
    overrides["EXTRA_ACTOR_MODULES"] = ["tests.spine_handlers"]
    app = make_app(tmp_path, EVENTS_REDELIVER_AFTER=1.0, **overrides)
    with app.app_context():
        db.drop_all()
        db.create_all()
    user = Factory(app).user(email="redis-drill@ops.example")
    server = LiveServer(app).start()
    worker = dramatiq.Worker(app.extensions["switchboard.tasks"].broker, worker_threads=2)
    worker.start()
    page = Browserless(server.url).login(user.email, PASSWORD)
    socket = page.open_socket(page.live_url())
    socket.recv()  # the snapshot
    total, failures = 30, []
    try:
        with app.app_context():

            def commit(n: int) -> None:
                try:
                    emit("test.counted", tenant_id=user.tenant_id,
                         payload={"n": n, "label": f"drill item {n}"})  # fmt: skip
                    db.session.commit()
                except Exception as exc:  # noqa: BLE001 - collected: a commit must never fail
                    db.session.rollback()
                    failures.append(repr(exc))

            for n in range(total):
                if n == 10:
                    private_redis.stop()  # Redis goes away mid-stream
                if n == 20:
                    private_redis.start()  # an empty Redis: queued messages are gone too
                commit(n)
                time.sleep(0.05)
            assert failures == []  # every commit stood although the broker was down

            def counted() -> Counter:
                db.session.expire_all()
                return Counter(
                    db.session.scalars(
                        select(ActivityLog.summary).where(ActivityLog.summary.like("counted %"))
                    ).all()
                )

            # The relay (a periodic job in workers; called here) sends what waited and
            # redelivers what Redis lost.
            def settled() -> bool:
                relay(app, min_age_seconds=0)
                return len(counted()) == total

            assert wait_for(settled, timeout=60, interval=0.5), counted()
            assert set(counted().values()) == {1}  # nothing lost, nothing twice
        # The open page's socket came through the outage and shows the newest state.
        assert receive_until(socket, lambda f: f"drill item {total - 1}" in f, timeout=20)
    finally:
        socket.close()
        worker.stop()
        server.stop()
        shut_down_app(app, private_redis.url)
