"""The spine end to end in embedded mode: outbox → dispatch → handlers → live bus."""

from __future__ import annotations

import time

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
    assert event.status == "dispatched"
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
    tenant = factory.tenant()
    emit("test.counted", tenant_id=tenant.id, payload={"n": 4})
    db.session.commit()
    drain(app)
    event = db.session.scalars(select(OutboxEvent).where(OutboxEvent.topic == "test.counted")).one()
    # Simulate a lost message for one handler: forget its result.
    db.session.execute(
        ProcessedEvent.__table__.delete().where(
            ProcessedEvent.event_id == event.id, ProcessedEvent.handler == "test_counter"
        )
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
        hub.subscribe([f"t{tenant_a.id}:feed"]) as sub_a,
        hub.subscribe([f"t{tenant_b.id}:feed"]) as sub_b,
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
