"""Background jobs are durable (issue 18): a job is written in the transaction that asks for
it and reaches its task even when Redis is down at the commit; periodic jobs are enqueued by
one scheduler and run as their own actors; live frames a dying worker never published heal."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

import tests.durable_job_actors  # noqa: F401 - registers the test tasks and periodic jobs
from events import emit
from events.registry import Event
from extensions import db
from models.base import utcnow
from models.devices import ActivityLog
from models.events import OutboxEvent
from tests.conftest import Factory, make_app, prod_overrides, shut_down_app
from tests.helpers import stop_process, wait_for, worker_process_env

ROOT = Path(__file__).resolve().parent.parent


def _count(model, *where) -> int:
    db.session.rollback()
    return db.session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def _job_runs(label: str) -> int:
    return _count(ActivityLog, ActivityLog.activity_type == "job", ActivityLog.summary == label)


def _dramatiq_worker(app, instance_dir: Path, *args: str, **extra: str) -> subprocess.Popen:
    env = worker_process_env(
        app,
        instance_dir,
        EXTRA_ACTOR_MODULES="tests.durable_job_actors,tests.spine_handlers",
        EVENTS_RELAY_INTERVAL="0.3",
        **extra,
    )
    dramatiq_bin = shutil.which("dramatiq", path=str(Path(sys.executable).parent))
    return subprocess.Popen(
        [dramatiq_bin, "tasks.worker", "--processes", "1", "--threads", "4", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _stderr(proc: subprocess.Popen) -> str:
    return proc.stderr.read1().decode(errors="replace")[-3000:] if proc.poll() is not None else ""


@pytest.fixture
def offline_app(tmp_path, pg_database_url, private_redis):
    """Production mode against a Redis the test can stop and start."""
    overrides = prod_overrides(pg_database_url, private_redis.url)
    app = make_app(tmp_path, **overrides)
    with app.app_context():
        db.drop_all()
        db.create_all()
    yield app
    shut_down_app(app, private_redis.url if _answers(private_redis.url) else None)


def _answers(redis_url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


# ---------------------------------------------------------------- durable jobs


@pytest.mark.integration
def test_a_job_committed_while_redis_is_down_runs_once_it_is_back(
    offline_app, private_redis, tmp_path
):
    from events import enqueue

    app = offline_app
    tenant_id = Factory(app).tenant().id
    with app.app_context():
        private_redis.stop()
        enqueue("test.record_job", tenant_id, "kept")
        db.session.commit()  # the commit stands although the broker is unreachable
        enqueue("test.record_job", tenant_id, "rolled back")
        db.session.rollback()
        jobs = db.session.execute(
            select(OutboxEvent.topic, OutboxEvent.status).where(OutboxEvent.topic.like("job:%"))
        ).all()
        assert jobs == [("job:test.record_job", "pending")]

        private_redis.start()
        worker = _dramatiq_worker(app, tmp_path / "worker")
        try:
            # The worker's scheduler enqueues the relay's tick; the relay sends the job.
            assert wait_for(lambda: _job_runs("kept") == 1, timeout=60), _stderr(worker)
            assert wait_for(
                lambda: _count(OutboxEvent, OutboxEvent.status != "done") == 0, timeout=30
            )
        finally:
            stop_process(worker)
        assert _job_runs("kept") == 1
        assert _job_runs("rolled back") == 0


def test_a_job_goes_out_at_commit_and_is_marked_done(app, worker, factory):
    from events import enqueue

    tenant_id = factory.tenant().id
    with app.app_context():
        enqueue("test.record_job", tenant_id, "at once")
        db.session.commit()
        assert wait_for(lambda: _job_runs("at once") == 1, timeout=10)
        assert wait_for(lambda: _count(OutboxEvent, OutboxEvent.status != "done") == 0, 10)


def test_a_job_that_gives_up_is_done_and_listed_as_failed(app, worker):
    from events import enqueue
    from models.events import ProcessedEvent

    with app.app_context():
        enqueue("test.failing_job", "the impossible")
        db.session.commit()
        assert wait_for(lambda: _count(OutboxEvent, OutboxEvent.status == "done") == 1, 10)
        record = db.session.scalars(select(ProcessedEvent)).one()
        assert record.status == "failed" and "the impossible cannot be done" in record.error
    result = app.test_cli_runner().invoke(args=["events", "list", "--failed"])
    assert "job:test.failing_job" in result.output


def test_enqueue_refuses_a_task_that_does_not_exist(app):
    from events import enqueue

    with app.app_context(), pytest.raises(ValueError, match="no task"):
        enqueue("no.such.task", 1)


def test_a_sent_job_that_never_finished_is_sent_again(app, factory):
    """A job whose message was lost (Redis restarted empty, a worker killed) is dispatched and
    never done: after its redelivery window the relay sends it again."""
    from events import enqueue
    from events.dispatch import relay

    app.config["EVENTS_REDELIVER_AFTER"] = 0
    state = app.extensions["switchboard.tasks"]
    tenant_id = factory.tenant().id
    with app.app_context():
        enqueue("test.record_job", tenant_id, "lost once")
        db.session.commit()  # no worker in this process: the row stays pending
        relay(app, min_age_seconds=0)  # sent…
        queue = state.broker.queues["default"]
        lost = [queue.get_nowait() for _ in range(queue.qsize())]  # …and lost
        assert len(lost) == 1
        # Its window: the task's tries and back-offs (max_retries=2, 60 s limit, 200 ms).
        spec_window = 3 * 60 + 2 * 0.2
        row = db.session.scalars(select(OutboxEvent)).one()
        row.dispatched_at = utcnow().replace(microsecond=0) - _seconds(spec_window + 1)
        db.session.commit()
        report = relay(app, min_age_seconds=0)
        assert report.redelivered == 1
        state.start_embedded_worker()
        assert wait_for(lambda: _job_runs("lost once") == 1, timeout=10)
        assert wait_for(lambda: _count(OutboxEvent, OutboxEvent.status != "done") == 0, 10)


def _seconds(n: float):
    from datetime import timedelta

    return timedelta(seconds=n)


@pytest.mark.integration
def test_email_and_reply_asked_for_while_redis_is_down_happen_once_it_is_back(
    offline_app, private_redis, tmp_path
):
    """The notification email and the chat's reply start were sent from after-commit
    callbacks whose failure was only logged: a Redis blip at that commit lost them."""
    from models.chats import Agent, Message
    from services import chats
    from services.notifications import deliver_event
    from tests.test_notifications import SmtpSink

    app = offline_app
    factory = Factory(app)
    tenant = factory.tenant()
    admin = factory.user(tenant, role="admin")
    with SmtpSink() as smtp, app.app_context():
        app.config["SMTP_URL"] = f"smtp://127.0.0.1:{smtp.port}"
        db.session.add(Agent(tenant_id=tenant.id, name="Helper", is_default=True))
        db.session.commit()
        chat = chats.start_chat(tenant.id, visitor_id="visitor-offline")
        db.session.commit()

        private_redis.stop()
        # The web process saves a visitor message and starts its reply.
        visitor_message = chats.add_message(chat, "visitor", "Is anyone there?")
        chats.start_reply_now(visitor_message.id)
        db.session.commit()
        # A notifications handler records an email-wanting notification.
        deliver_event(
            Event(
                id=0,
                event_id=None,
                topic="escalation.triggered",
                entity="chat",
                entity_id=chat.id,
                tenant_id=tenant.id,
                actor_user_id=None,
                actor_ip=None,
                payload={"excerpt": "The receiver exploded"},
                created_at=utcnow(),
            )
        )
        db.session.commit()

        private_redis.start()
        worker = _dramatiq_worker(
            app, tmp_path / "worker", SMTP_URL=app.config["SMTP_URL"], EVENTS_REDELIVER_AFTER="2"
        )
        try:
            assert wait_for(lambda: len(smtp.messages) >= 1, timeout=60), _stderr(worker)
            assert wait_for(
                lambda: _count(Message, Message.in_response_to_id == visitor_message.id) == 1,
                timeout=60,
            ), _stderr(worker)
            # Everything sent has finished: no job left to be redelivered.
            assert wait_for(
                lambda: _count(OutboxEvent, OutboxEvent.status != "done") == 0, timeout=60
            ), db.session.execute(select(OutboxEvent.topic, OutboxEvent.status)).all()
        finally:
            stop_process(worker)
        assert [recipients for recipients, _ in smtp.messages] == [[admin.email]]
        assert _count(Message, Message.in_response_to_id == visitor_message.id) == 1


# ---------------------------------------------------------------- the scheduler


def _pending_event_row(tenant_id: int, n: int) -> None:
    """An event whose dispatch at commit never happened (the row alone, as a commit whose
    process died before sending would leave it): only the relay can deliver it."""
    import uuid

    db.session.execute(
        insert(OutboxEvent.__table__).values(
            event_id=uuid.uuid4(),
            topic="test.counted",
            tenant_id=tenant_id,
            payload={"n": n},
            status="pending",
            attempts=0,
            created_at=utcnow(),
        )
    )
    db.session.commit()


def _counted(n: int) -> int:
    return _count(ActivityLog, ActivityLog.summary == f"counted {n}")


def test_a_slow_periodic_job_does_not_hold_up_the_relay(app, factory):
    """Periodic jobs ran one after another in the scheduler's thread: the relay's tick
    waited behind a slow device poll or archive sweep."""
    import tests.spine_handlers  # noqa: F401 - the test_counter handler
    from tests import durable_job_actors

    app.config.update(
        TEST_SLOW_PERIODIC_INTERVAL=0.2, TEST_SLOW_PERIODIC_SECONDS=8, EVENTS_RELAY_INTERVAL=0.2
    )
    durable_job_actors.slow_started.clear()
    tenant_id = factory.tenant().id
    state = app.extensions["switchboard.tasks"]
    state.start_embedded_worker()
    try:
        assert durable_job_actors.slow_started.wait(timeout=10)
        with app.app_context():
            _pending_event_row(tenant_id, 41)
            started = time.monotonic()
            # The relay takes rows a second old (their own commit's dispatch may be under way).
            assert wait_for(lambda: _counted(41) == 1, timeout=8)
            assert time.monotonic() - started < 4.0
            db.session.remove()
    finally:
        app.config["TEST_SLOW_PERIODIC_SECONDS"] = 0
        state.stop()


@pytest.mark.integration
def test_two_schedulers_enqueue_each_tick_once(prod_app):
    from dramatiq import Message

    from tasks.broker import Scheduler

    prod_app.config["TEST_TICK_PERIODIC_INTERVAL"] = 0.5
    state = prod_app.extensions["switchboard.tasks"]
    client = state.broker.client
    messages_key = f"{prod_app.config['DRAMATIQ_NAMESPACE']}:periodic.msgs"

    def ticks() -> list[float]:
        found = []
        for data in client.hvals(messages_key):
            message = Message.decode(data)
            if message.actor_name == "p_test_tick_periodic":
                found.append(message.args[0])
        return sorted(found)

    schedulers = [Scheduler(prod_app), Scheduler(prod_app)]
    for scheduler in schedulers:
        scheduler.start()
    try:
        assert wait_for(lambda: len(ticks()) >= 6, timeout=20), ticks()
        holder = client.get(schedulers[0].lease_key).decode()
        assert holder in {s.owner for s in schedulers}
    finally:
        for scheduler in schedulers:
            scheduler.stop()
    enqueued = ticks()
    gaps = [later - earlier for earlier, later in zip(enqueued, enqueued[1:], strict=False)]
    assert min(gaps) > 0.4, enqueued  # one message per tick, not one per scheduler


def _procfile_line(app, instance_dir: Path, name: str, **extra: str) -> subprocess.Popen:
    import os

    env = worker_process_env(app, instance_dir, **extra)
    line = next(
        line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith(name)
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.Popen(
        ["bash", "-c", "exec " + line.split(":", 1)[1].strip()],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.integration
def test_the_assistant_process_runs_no_scheduler(prod_app, prod_factory, tmp_path):
    """The `assistant` process streams replies; it ran the scheduler (and the periodic jobs
    themselves) whenever it won the lock."""
    import tests.spine_handlers  # noqa: F401

    tenant_id = prod_factory.tenant().id
    client = prod_app.extensions["switchboard.tasks"].broker.client
    heartbeats = f"{prod_app.config['DRAMATIQ_NAMESPACE']}:__heartbeats__"
    extra = {"EVENTS_RELAY_INTERVAL": "0.2", "EXTRA_ACTOR_MODULES": "tests.spine_handlers"}
    with prod_app.app_context():
        _pending_event_row(tenant_id, 51)
        assistant = _procfile_line(prod_app, tmp_path / "assistant", "assistant:", **extra)
        worker = None
        try:
            # Consuming: its consumers beat; a scheduler would have started before them.
            assert wait_for(lambda: client.zcard(heartbeats) > 0, timeout=60), _stderr(assistant)
            deadline = time.monotonic() + 3  # fifteen relay intervals
            while time.monotonic() < deadline:
                status = db.session.scalar(select(OutboxEvent.status))
                db.session.rollback()
                assert status == "pending"  # nobody relayed it
                time.sleep(0.1)
            assert assistant.poll() is None, _stderr(assistant)
            # The worker line does schedule: the relay's tick delivers the row.
            worker = _procfile_line(
                prod_app, tmp_path / "worker", "worker:", WORKER_PROCESSES="1", **extra
            )
            assert wait_for(lambda: _counted(51) == 1, timeout=60), _stderr(worker)
        finally:
            stop_process(assistant)
            if worker is not None:
                stop_process(worker)


# ---------------------------------------------------------------- live frames


@pytest.mark.integration
def test_a_frame_is_not_lost_when_the_worker_dies_right_after_the_commit(
    prod_app, prod_factory, tmp_path
):
    """The handler's record is in its commit; its frames went out in after-commit callbacks.
    A worker dying in between lost them for good: a redelivery skips recorded handlers."""
    tenant_id = prod_factory.tenant().id
    hub = prod_app.extensions["switchboard.live"].hub
    worker = _dramatiq_worker(prod_app, tmp_path / "worker")
    try:
        with prod_app.app_context(), hub.subscribe([f"t{tenant_id}:test-live"]) as sub:
            emit("test.live_then_die", tenant_id=tenant_id, payload={"n": 61, "die": True})
            db.session.commit()
            frame = sub.frames.get(timeout=30)
            assert ">61<" in frame.html
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        stop_process(worker)


# ---------------------------------------------------------------- the archive sweep


@pytest.mark.integration
def test_the_archive_sweep_holds_no_transaction_while_the_model_writes(prod_app, prod_factory):
    """It summarised up to 500 chats in a row with a transaction open across each model call:
    a connection idle in transaction for as long as the model takes."""
    from datetime import timedelta

    from sqlalchemy import create_engine, text

    from models.chats import Chat
    from services import chats
    from tasks.chats import archive_inactive_chats
    from tests.fake_openai import FakeOpenAI, Script

    fake = FakeOpenAI(Script(json_reply="The visitor's receiver was fixed.", stall_seconds=1.0))
    fake.start()
    prod_app.config.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="test-key")
    tenant_id = prod_factory.tenant().id
    observer = create_engine(prod_app.config["SQLALCHEMY_DATABASE_URI"])
    seen_idle_in_transaction = []
    done = threading.Event()

    def watch() -> None:
        with observer.connect() as conn:
            while not done.is_set():
                seen_idle_in_transaction.append(
                    (
                        time.monotonic(),
                        conn.execute(
                            text(
                                "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                "current_database() AND state = 'idle in transaction' "
                                "AND pid <> pg_backend_pid()"
                            )
                        ).scalar(),
                    )
                )
                conn.rollback()
                time.sleep(0.05)

    try:
        with prod_app.app_context():
            ids = []
            for n in range(3):
                chat = chats.start_chat(tenant_id, visitor_id=f"idle-{n}")
                chats.add_message(chat, "visitor", "My receiver keeps dropping out.")
                db.session.flush()
                chat.last_activity = utcnow() - timedelta(hours=48)
                ids.append(chat.id)
            db.session.commit()
            db.session.remove()
            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                archive_inactive_chats()
            finally:
                done.set()
                watcher.join()
            db.session.remove()
            rows = db.session.execute(
                select(Chat.status, Chat.summary).where(Chat.id.in_(ids))
            ).all()
        assert rows == [("archived", "The visitor's receiver was fixed.")] * 3
        assert len(fake.records) == 3
        # While the model was thinking (its stall, give or take the request's way there and
        # back), no connection sat in an open transaction.
        during_calls = [
            idle
            for at, idle in seen_idle_in_transaction
            if any(r.at + 0.2 < at < r.at + 0.8 for r in fake.records)
        ]
        assert len(during_calls) > 10
        assert max(during_calls) == 0
    finally:
        fake.stop()
        observer.dispose()


def test_a_periodic_job_whose_worker_died_mid_run_runs_again_within_seconds(redis_url):
    """One run at a time across processes, however long it takes; but a process killed
    mid-run must not keep the job from running for its whole time limit (a minute for the
    sweep that restarts orphaned replies)."""
    from types import SimpleNamespace

    import redis

    from events.registry import PeriodicSpec
    from tasks.broker import PeriodicGuard
    from tests.conftest import redis_prefix

    prefix = redis_prefix()
    app = SimpleNamespace(config={"REDIS_URL": redis_url, "REDIS_PREFIX": prefix})
    spec = PeriodicSpec(name="sweep", fn=lambda: None, time_limit_ms=60_000)
    dead, alive = PeriodicGuard(app), PeriodicGuard(app)
    for guard in (dead, alive):  # the same rules, on a shorter clock
        guard.HOLD_SECONDS, guard.RENEW_SECONDS = 1.0, 0.2

    def can_run() -> bool:
        with alive.running(spec) as mine:
            return mine

    try:
        with dead.running(spec) as mine:
            assert mine
            assert not can_run()
            time.sleep(2.5)  # a run longer than one hold keeps its hold
            assert not can_run()
            dead.close()  # killed: nothing renews its hold any more
            started = time.monotonic()
            assert wait_for(can_run, timeout=10, interval=0.1)
            assert time.monotonic() - started < 3
    finally:
        dead.close()
        alive.close()
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(prefix + "*"):
            client.delete(key)
        client.close()
