"""The spine end to end in embedded mode: outbox → dispatch → handlers → live bus."""

from __future__ import annotations

import time

import dramatiq
from sqlalchemy import func, select

import tests.spine_handlers  # noqa: F401 - registers the test_counter handler
from events import emit
from events.dispatch import relay
from events.registry import registry
from models.chats import Agent
from models.devices import ActivityLog
from models.events import OutboxEvent, ProcessedEvent
from tests.conftest import drain


def _count(db, model, *where):
    db.session.expire_all()
    return db.session.scalar(select(func.count()).select_from(model).where(*where))


def test_event_reaches_its_handler_once_after_commit(app, db, worker, factory):
    tenant = factory.tenant()
    emit("test.counted", tenant_id=tenant.id, payload={"n": 1})
    db.session.commit()
    drain(app)
    assert _count(db, ActivityLog, ActivityLog.summary == "counted 1") == 1
    event = db.session.scalars(select(OutboxEvent).where(OutboxEvent.topic == "test.counted")).one()
    # The worker's periodic relay may already have marked it done (its tick is 0.2 s here).
    assert event.status in ("dispatched", "done")
    relay(app, min_age_seconds=0)
    db.session.expire_all()
    assert event.status == "done"  # every handler recorded a result


def test_duplicate_delivery_changes_nothing(app, db, worker, factory):
    tenant = factory.tenant()
    emit("test.counted", tenant_id=tenant.id, payload={"n": 2})
    db.session.commit()
    drain(app)
    event_pk = db.session.scalar(select(OutboxEvent.id).where(OutboxEvent.topic == "test.counted"))
    actor = app.extensions["switchboard.tasks"].actors["spine_events"]
    for _ in range(3):
        actor.send(event_pk)  # redeliveries, as after a worker crash
    drain(app)
    assert _count(db, ActivityLog, ActivityLog.summary == "counted 2") == 1
    # One result per handler of the topic (the feed, the counter and the shared handlers).
    handlers = registry.handler_names_for("test.counted")
    assert "test_counter" in handlers
    assert _count(db, ProcessedEvent, ProcessedEvent.event_id == event_pk) == len(handlers)


def test_events_from_a_process_without_worker_wait_for_the_relay(app, db, factory):
    tenant = factory.tenant()
    emit("test.counted", tenant_id=tenant.id, payload={"n": 3})
    db.session.commit()
    # Embedded mode with no worker running here (like a `flask` CLI process): stays pending.
    assert _count(db, OutboxEvent, OutboxEvent.status == "pending") == 1
    state = app.extensions["switchboard.tasks"]
    state.start_embedded_worker()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if _count(db, ActivityLog, ActivityLog.summary == "counted 3"):
                break
            time.sleep(0.05)
    finally:
        state.stop()
    assert _count(db, ActivityLog, ActivityLog.summary == "counted 3") == 1


def test_lost_message_is_redelivered_only_to_missing_handlers(app, db, worker, factory):
    # The relay below is this test's alone: the scheduler's next tick is an hour away.
    app.config["EVENTS_RELAY_INTERVAL"] = 3600
    tenant = factory.tenant()
    emit("test.counted", tenant_id=tenant.id, payload={"n": 4})
    db.session.commit()
    drain(app)
    event = db.session.scalars(select(OutboxEvent).where(OutboxEvent.topic == "test.counted")).one()
    # Simulate a lost message for one handler: forget its result. A relay tick that ran before
    # the hour-long interval took effect may have marked the event done; with a result missing
    # it never would have, so it goes back to dispatched.
    db.session.execute(
        ProcessedEvent.__table__.delete().where(
            ProcessedEvent.event_id == event.id, ProcessedEvent.handler == "test_counter"
        )
    )
    db.session.execute(
        OutboxEvent.__table__.update().where(OutboxEvent.id == event.id).values(status="dispatched")
    )
    db.session.execute(ActivityLog.__table__.delete())
    db.session.commit()
    app.config["EVENTS_REDELIVER_AFTER"] = 0
    report = relay(app, min_age_seconds=0)
    drain(app)
    assert report.redelivered == 1
    assert _count(db, ActivityLog, ActivityLog.summary == "counted 4") == 1
    # The feed handler had already run; it was not sent again.
    assert _count(db, ProcessedEvent, ProcessedEvent.event_id == event.id) == len(
        registry.handler_names_for("test.counted")
    )


def test_model_change_publishes_a_feed_fragment_to_its_tenant(app, db, worker, factory):
    hub = app.extensions["switchboard.live"].hub
    tenant_a, tenant_b = factory.tenant(), factory.tenant()
    with (
        hub.subscribe([f"t{tenant_a.id}:feed"], watch=True) as sub_a,
        hub.subscribe([f"t{tenant_b.id}:feed"], watch=True) as sub_b,
    ):
        db.session.add(Agent(tenant_id=tenant_a.id, name="Frontdesk"))
        db.session.commit()
        frame = sub_a.frames.get(timeout=5)
        assert "Frontdesk" in frame.html and 'hx-swap-oob="afterbegin"' in frame.html
        assert sub_b.frames.empty()


def test_failing_handler_gives_up_and_is_recorded(app, db, worker, factory):
    from events.registry import HandlerSpec, registry

    calls = []

    def explode(event):
        calls.append(event.id)
        raise RuntimeError("boom")

    spec = HandlerSpec(name="test_explode", fn=explode, topics=("test.explode",), max_retries=0)
    registry.add_handler(spec)
    try:
        tenant = factory.tenant()
        emit("test.explode", tenant_id=tenant.id)
        db.session.commit()
        drain(app)
        failed = db.session.scalars(
            select(ProcessedEvent).where(ProcessedEvent.handler == "test_explode")
        ).one()
        assert failed.status == "failed" and "boom" in failed.error
        assert len(calls) == 1
    finally:
        registry.handlers.pop("test_explode", None)
        registry.handler_names_for.cache_clear()


class _CountMessages(dramatiq.Middleware):
    def __init__(self) -> None:
        self.args: list = []

    def before_enqueue(self, broker, message, delay):
        if message.actor_name == "spine_events":
            self.args.append(message.args[0])


def test_a_commits_events_go_to_their_group_in_one_message_and_run_once(app, db, worker, factory):
    counter = _CountMessages()
    app.extensions["switchboard.tasks"].broker.add_middleware(counter)
    tenant = factory.tenant()
    for n in range(7):
        emit("test.counted", tenant_id=tenant.id, payload={"n": f"batch {n}"})
    db.session.commit()
    drain(app)
    assert len(counter.args) == 1 and len(counter.args[0]) == 7
    summaries = db.session.scalars(
        select(ActivityLog.summary).where(ActivityLog.summary.like("counted batch %"))
    ).all()
    assert sorted(summaries) == [f"counted batch {n}" for n in range(7)]
    # Delivered again, as after a worker crash: every record already there, nothing runs.
    app.extensions["switchboard.tasks"].actors["spine_events"].send(counter.args[0])
    drain(app)
    assert _count(db, ActivityLog, ActivityLog.summary.like("counted batch %")) == 7
    handlers = registry.handler_names_for("test.counted")
    assert _count(db, ProcessedEvent, ProcessedEvent.event_id.in_(counter.args[0])) == 7 * len(
        handlers
    )


def test_commits_larger_than_the_batch_are_split(app, db, worker, factory):
    counter = _CountMessages()
    app.extensions["switchboard.tasks"].broker.add_middleware(counter)
    app.config["EVENTS_BATCH"] = 3
    tenant = factory.tenant()
    for n in range(7):
        emit("test.counted", tenant_id=tenant.id, payload={"n": f"split {n}"})
    db.session.commit()
    drain(app)
    assert [len(a) if isinstance(a, list) else 1 for a in counter.args] == [3, 3, 1]
    assert _count(db, ActivityLog, ActivityLog.summary.like("counted split %")) == 7


def test_a_failing_handler_in_a_batch_keeps_the_others_work(app, db, worker, factory):
    from events.registry import HandlerSpec

    calls: list[int] = []

    def flaky(event):
        n = event.payload["n"]
        calls.append(n)
        if n == 3 and calls.count(3) < 3:
            raise RuntimeError("not yet")
        db.session.add(
            ActivityLog(tenant_id=event.tenant_id, activity_type="test", summary=f"flaky {n}")
        )

    spec = HandlerSpec(
        name="test_flaky", fn=flaky, topics=("test.flaky",), max_retries=2, min_backoff_ms=10
    )
    registry.add_handler(spec)
    try:
        tenant = factory.tenant()
        for n in range(5):
            emit("test.flaky", tenant_id=tenant.id, payload={"n": n})
        db.session.commit()
        drain(app)
        summaries = db.session.scalars(
            select(ActivityLog.summary).where(ActivityLog.summary.like("flaky %"))
        ).all()
        assert sorted(summaries) == [f"flaky {n}" for n in range(5)]  # each exactly once
        records = db.session.scalars(
            select(ProcessedEvent.status).where(ProcessedEvent.handler == "test_flaky")
        ).all()
        assert records == ["ok"] * 5
        # The batch stopped at 3 and was undone; then each on its own but 3, whose raise
        # was its try; each retry of the message ran only the one without a record (once
        # more failing, then done): three tries of max_retries=2, one per delivery.
        assert calls == [0, 1, 2, 3] + [0, 1, 2, 4] + [3] + [3]
    finally:
        registry.handlers.pop("test_flaky", None)
        registry.handler_names_for.cache_clear()


def test_one_events_handlers_share_one_record_insert_and_no_savepoint(app, db, worker, factory):
    """A commit with one event (a visitor's message) runs its group's handlers as a batch
    does: one INSERT of their records, no savepoint per handler. A handler that raises then
    gets the one-by-one way, and is not run a second time in the same delivery."""
    from events.registry import HandlerSpec
    from tests.helpers import statements_run, transaction_running

    calls: list[str] = []

    def make(name: str, fails: bool = False):
        def run(event):
            calls.append(name)
            if fails:
                raise RuntimeError(f"{name} failed")
            db.session.add(
                ActivityLog(tenant_id=event.tenant_id, activity_type="test", summary=name)
            )

        return HandlerSpec(
            name=name, fn=run, topics=("test.single",), queue="events", max_retries=0
        )

    specs = [make("test_one"), make("test_two"), make("test_three")]
    for spec in specs:
        registry.add_handler(spec)
    try:
        tenant = factory.tenant()
        emit("test.single", tenant_id=tenant.id)
        db.session.commit()
        with statements_run() as statements:
            drain(app)
        its = transaction_running(statements, "INSERT INTO processed_events")
        assert sum(s.startswith("INSERT INTO processed_events") for s in its) == 1, its
        assert not any(s.startswith(("SAVEPOINT", "RELEASE")) for s in its), its
        assert sorted(calls) == ["test_one", "test_three", "test_two"]

        # One handler raising: the others' work is kept, and it had one try (max_retries=0).
        calls.clear()
        registry.handlers["test_two"] = make("test_two", fails=True)
        registry.handler_names_for.cache_clear()
        emit("test.single", tenant_id=tenant.id)
        db.session.commit()
        drain(app)
        assert calls.count("test_two") == 1 and calls.count("test_one") == 2
        second = db.session.scalar(select(func.max(OutboxEvent.id)))
        results = dict(
            db.session.execute(
                select(ProcessedEvent.handler, ProcessedEvent.status).where(
                    ProcessedEvent.event_id == second, ProcessedEvent.handler.like("test_%")
                )
            ).all()
        )
        assert results == {"test_one": "ok", "test_two": "failed", "test_three": "ok"}
        assert _count(db, ActivityLog, ActivityLog.summary == "test_one") == 2
        assert _count(db, ActivityLog, ActivityLog.summary == "test_two") == 1
    finally:
        for spec in specs:
            registry.handlers.pop(spec.name, None)
        registry.handler_names_for.cache_clear()
