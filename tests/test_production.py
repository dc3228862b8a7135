"""Production mode against the real PostgreSQL and Redis: RedisBroker, Redis live bus,
separate `dramatiq` worker processes, and Redis going away at commit time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

import tests.spine_handlers  # noqa: F401 - registers the test_counter handler
from events import emit
from events.dispatch import relay
from models.devices import ActivityLog
from models.events import OutboxEvent, ProcessedEvent
from tests.conftest import cleanup_redis, free_port, make_app, prod_overrides

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _wait_for(predicate, timeout: float = 15.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def _count(db, model, *where) -> int:
    db.session.rollback()
    return db.session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def test_event_is_handled_and_published_through_redis(prod_app, prod_worker, prod_factory):
    from extensions import db

    tenant = prod_factory.tenant()
    hub = prod_app.extensions["switchboard.live"].hub
    with prod_app.app_context(), hub.subscribe([f"t{tenant.id}:feed"]) as sub:
        emit("test.counted", tenant_id=tenant.id, payload={"n": 10, "label": "via redis"})
        db.session.commit()
        assert _wait_for(lambda: _count(db, ActivityLog, ActivityLog.summary == "counted 10") == 1)
        frame = sub.frames.get(timeout=10)
        assert "via redis" in frame.html


def test_handlers_run_in_a_separate_worker_process(prod_app, prod_factory, tmp_path):
    from extensions import db

    cfg = prod_app.config
    env = dict(
        os.environ,
        DATABASE_URL=cfg["SQLALCHEMY_DATABASE_URI"],
        REDIS_URL=cfg["REDIS_URL"],
        REDIS_PREFIX=cfg["REDIS_PREFIX"],
        DRAMATIQ_NAMESPACE=cfg["DRAMATIQ_NAMESPACE"],
        SECRET_KEY=cfg["SECRET_KEY"],
        SWITCHBOARD_INSTANCE=str(tmp_path / "worker-instance"),
        EXTRA_ACTOR_MODULES="tests.spine_handlers",
        PYTHONPATH=str(ROOT),
    )
    dramatiq_bin = shutil.which("dramatiq", path=str(Path(sys.executable).parent))
    worker = subprocess.Popen(
        [dramatiq_bin, "tasks.worker", "--processes", "1", "--threads", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        tenant = prod_factory.tenant()
        hub = prod_app.extensions["switchboard.live"].hub
        with prod_app.app_context(), hub.subscribe([f"t{tenant.id}:feed"]) as sub:
            for n in range(5):
                emit("test.counted", tenant_id=tenant.id, payload={"n": 100 + n})
            db.session.commit()
            assert _wait_for(
                lambda: _count(db, ActivityLog, ActivityLog.summary.like("counted 10%")) == 5,
                timeout=30,
            ), worker.stderr.read1().decode(errors="replace")[-2000:] if worker.poll() else ""
            # The worker process published the feed frames; this process receives them.
            received = {sub.frames.get(timeout=10).key for _ in range(5)}
            assert len(received) == 5
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        worker.stderr.close()


@pytest.fixture
def private_redis():
    """A Redis server of our own that the test can stop and start again."""
    if not shutil.which("redis-server"):
        pytest.skip("redis-server not installed")
    port = free_port()

    def start():
        proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=port)
        assert _wait_for(lambda: _ping(client), timeout=10)
        client.close()
        return proc

    state = {"proc": start()}

    def stop():
        state["proc"].terminate()
        state["proc"].wait(timeout=10)

    def restart():
        state["proc"] = start()

    yield type(
        "PrivateRedis", (), {"url": f"redis://127.0.0.1:{port}/0", "stop": stop, "start": restart}
    )
    if state["proc"].poll() is None:
        stop()


def _ping(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001
        return False


def test_redis_down_at_commit_then_relay_delivers(tmp_path, pg_database_url, private_redis):
    import dramatiq

    from extensions import db

    overrides = prod_overrides(pg_database_url, private_redis.url)
    app = make_app(tmp_path, **overrides)
    with app.app_context():
        db.drop_all()
        db.create_all()
        from models.accounts import Tenant

        tenant = Tenant(name="Offline Ltd")
        db.session.add(tenant)
        db.session.commit()

        private_redis.stop()
        emit("test.counted", tenant_id=tenant.id, payload={"n": 7})
        db.session.commit()  # the commit stands although the broker is unreachable
        event = db.session.scalars(
            select(OutboxEvent).where(OutboxEvent.topic == "test.counted")
        ).one()
        assert event.status == "pending"

        private_redis.start()
        report = relay(app, min_age_seconds=0)
        assert report.sent >= 1
        worker = dramatiq.Worker(app.extensions["switchboard.tasks"].broker, worker_threads=2)
        worker.start()
        try:
            assert _wait_for(
                lambda: _count(db, ActivityLog, ActivityLog.summary == "counted 7") == 1
            )
            assert _wait_for(
                lambda: _count(db, ProcessedEvent, ProcessedEvent.event_id == event.id) == 2
            )
        finally:
            worker.stop()
        db.session.remove()
        db.engine.dispose()
    app.extensions["switchboard.live"].hub.stop()
    cleanup_redis(private_redis.url, overrides["REDIS_PREFIX"], overrides["DRAMATIQ_NAMESPACE"])
