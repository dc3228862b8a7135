"""Production mode against the real PostgreSQL and Redis: RedisBroker, Redis live bus,
separate `dramatiq` worker processes, and Redis going away at commit time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

import tests.spine_handlers  # noqa: F401 - registers the test_counter handler
from events import emit
from events.dispatch import relay
from events.registry import registry
from models.devices import ActivityLog
from models.events import OutboxEvent, ProcessedEvent
from tests.conftest import cleanup_redis, make_app, prod_overrides, shut_down_app
from tests.helpers import stop_process, wait_for, worker_process_env

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _count(db, model, *where) -> int:
    db.session.rollback()
    return db.session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def test_event_is_handled_and_published_through_redis(prod_app, prod_worker, prod_factory):
    from extensions import db

    tenant = prod_factory.tenant()
    hub = prod_app.extensions["switchboard.live"].hub
    with prod_app.app_context(), hub.subscribe([f"t{tenant.id}:feed"], watch=True) as sub:
        emit("test.counted", tenant_id=tenant.id, payload={"n": 10, "label": "via redis"})
        db.session.commit()
        assert wait_for(lambda: _count(db, ActivityLog, ActivityLog.summary == "counted 10") == 1)
        frame = sub.frames.get(timeout=10)
        assert "via redis" in frame.html


def _procfile_process(app, instance_dir, name: str, **extra: str) -> subprocess.Popen:
    """Start the Procfile's `name` line against the test app, so a bad flag there fails."""
    env = worker_process_env(app, instance_dir, **extra)
    procfile = (ROOT / "Procfile").read_text().splitlines()
    line = next(line for line in procfile if line.startswith(f"{name}:"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.Popen(
        ["bash", "-c", "exec " + line.split(":", 1)[1].strip()],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _stderr_of(proc: subprocess.Popen) -> str:
    return proc.stderr.read1().decode(errors="replace")[-2000:] if proc.poll() is not None else ""


def test_handlers_run_in_a_separate_worker_process(prod_app, prod_factory, tmp_path):
    from extensions import db

    worker = _procfile_process(
        prod_app,
        tmp_path / "worker-instance",
        "worker",
        EXTRA_ACTOR_MODULES="tests.spine_handlers",
        WORKER_PROCESSES="1",
        WORKER_THREADS="2",
    )
    try:
        tenant = prod_factory.tenant()
        hub = prod_app.extensions["switchboard.live"].hub
        with prod_app.app_context(), hub.subscribe([f"t{tenant.id}:feed"], watch=True) as sub:
            for n in range(5):
                emit("test.counted", tenant_id=tenant.id, payload={"n": 100 + n})
            db.session.commit()
            assert wait_for(
                lambda: _count(db, ActivityLog, ActivityLog.summary.like("counted 10%")) == 5,
                timeout=30,
            ), _stderr_of(worker)
            # The worker process published the feed frames; this process receives them.
            received = {sub.frames.get(timeout=10).key for _ in range(5)}
            assert len(received) == 5
    finally:
        stop_process(worker)


def test_replies_are_left_to_the_procfiles_assistant_process(prod_app, prod_factory, tmp_path):
    """`worker` runs the handlers but leaves the `assistant` queue (replies hold a thread as
    long as the model talks) to the `assistant` process."""
    from extensions import db
    from models.chats import Agent, Message
    from services import chats

    tenant = prod_factory.tenant()
    with prod_app.app_context():
        db.session.add(Agent(tenant_id=tenant.id, name="Helper", is_default=True))
        db.session.commit()
        chat = chats.start_chat(tenant.id, visitor_id="visitor-procfile")
        visitor_message = chats.add_message(chat, "visitor", "Is anyone there?")
        chats.start_reply_now(visitor_message.id)
        emit("test.counted", tenant_id=tenant.id, payload={"n": 7})
        db.session.commit()

    def replies() -> int:
        return _count(db, Message, Message.sender == "assistant")

    extra = {"EXTRA_ACTOR_MODULES": "tests.spine_handlers", "WORKER_PROCESSES": "1"}
    worker = _procfile_process(prod_app, tmp_path / "worker", "worker", **extra)
    assistant = None
    try:
        with prod_app.app_context():
            assert wait_for(
                lambda: _count(db, ActivityLog, ActivityLog.summary == "counted 7") == 1,
                timeout=30,
            ), _stderr_of(worker)
            queued = prod_app.extensions["switchboard.tasks"].broker.client.llen(
                f"{prod_app.config['DRAMATIQ_NAMESPACE']}:assistant"
            )
            assert queued >= 1 and replies() == 0  # handled the event, not the reply

            assistant = _procfile_process(
                prod_app, tmp_path / "assistant", "assistant", ASSISTANT_THREADS="2"
            )
            assert wait_for(lambda: replies() == 1, timeout=30), _stderr_of(assistant)
    finally:
        stop_process(worker)
        if assistant is not None:
            stop_process(assistant)


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
            assert wait_for(
                lambda: _count(db, ActivityLog, ActivityLog.summary == "counted 7") == 1
            )
            assert wait_for(
                lambda: (
                    _count(db, ProcessedEvent, ProcessedEvent.event_id == event.id)
                    == len(registry.handler_names_for("test.counted"))
                )
            )
        finally:
            worker.stop()
        db.session.remove()
        db.engine.dispose()
    app.extensions["switchboard.live"].hub.stop()
    cleanup_redis(private_redis.url, overrides["REDIS_PREFIX"], overrides["DRAMATIQ_NAMESPACE"])


def test_more_committers_than_pooled_connections_do_not_stall(
    tmp_path, pg_database_url, redis_url, caplog
):
    """Each commit dispatches its events with a connection of its own. Were that done while the
    committing session still held its connection, as many threads committing at once as the
    pool has connections would each wait for another one: every dispatch would time out and
    leave its events pending. Here 8 threads share a pool of 2."""
    import threading

    from extensions import db
    from models.accounts import Tenant

    overrides = prod_overrides(pg_database_url, redis_url)
    overrides["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_size": 2, "max_overflow": 0, "pool_timeout": 5}
    app = make_app(tmp_path, **overrides)
    with app.app_context():
        db.drop_all()
        db.create_all()
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def commit_one(n: int) -> None:
        try:
            with app.app_context():
                barrier.wait(timeout=10)
                db.session.add(Tenant(name=f"Pool {n}"))
                emit("test.counted", tenant_id=None, payload={"n": n})
                db.session.commit()
                db.session.remove()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        with caplog.at_level("ERROR", logger="events.outbox"):
            threads = [threading.Thread(target=commit_one, args=(n,)) for n in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
        assert errors == []
        assert not [r for r in caplog.records if "dispatch after commit failed" in r.message]
        with app.app_context():
            rows = db.session.execute(select(OutboxEvent.topic, OutboxEvent.status)).all()
        # Every event was handed to the broker at its commit: none left for the relay.
        assert sorted(topic for topic, _ in rows).count("test.counted") == 8
        assert {status for _, status in rows} == {"dispatched"}
    finally:
        shut_down_app(app, redis_url)


def test_a_visitor_messages_events_wait_until_its_reply_has_gone_out(prod_app, prod_factory):
    """The reply's job goes to the assistant at the commit; the message's events (sentiment,
    the operators' view, metrics, audit) go CHAT_EVENTS_DELAY_MS later, once the reply has
    started, and none is lost."""
    import time

    from extensions import db
    from models.chats import Agent
    from services import chats

    prod_app.config["CHAT_EVENTS_DELAY_MS"] = 600
    tenant = prod_factory.tenant()
    broker = prod_app.extensions["switchboard.tasks"].broker
    namespace = prod_app.config["DRAMATIQ_NAMESPACE"]
    with prod_app.app_context():
        db.session.add(Agent(tenant_id=tenant.id, name="Helper", is_default=True))
        db.session.commit()
        chat = chats.start_chat(tenant.id, visitor_id="visitor-delay")
        db.session.commit()
        before = broker.client.llen(f"{namespace}:chats")  # (the chat's own events)
        message = chats.add_message(chat, "visitor", "Where is my order?")
        chats.start_reply_now(message.id)
        db.session.commit()
        committed = time.monotonic()

        def created_status() -> str:
            db.session.rollback()
            return db.session.scalar(
                select(OutboxEvent.status).where(
                    OutboxEvent.topic == "message.created", OutboxEvent.entity_id == message.id
                )
            )

        assert broker.client.llen(f"{namespace}:assistant") == 1  # the reply: at once
        assert created_status() == "pending"
        assert broker.client.llen(f"{namespace}:chats") == before
        assert wait_for(lambda: created_status() == "dispatched", timeout=10, interval=0.02)
        assert time.monotonic() - committed >= 0.55
        assert broker.client.llen(f"{namespace}:chats") > before  # its handlers' message


def test_a_rolled_back_delay_is_forgotten(prod_app, prod_factory):
    from events import delay_events
    from extensions import db
    from models.chats import Agent

    tenant = prod_factory.tenant()
    with prod_app.app_context():
        db.session.add(Agent(tenant_id=tenant.id, name="Dropped"))
        delay_events(5)
        db.session.rollback()
        now = Agent(tenant_id=tenant.id, name="Now")
        db.session.add(now)
        db.session.commit()
        status = db.session.scalar(
            select(OutboxEvent.status).where(
                OutboxEvent.topic == "agent.created", OutboxEvent.entity_id == now.id
            )
        )
        assert status == "dispatched"  # sent by its own commit: the delay went with the rollback
