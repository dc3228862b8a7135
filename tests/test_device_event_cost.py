"""What a device event costs (issue 23 §2) must not change what it does: emits written in
bulk still go with rollbacks, a batch renders a device's card once from its final state and
still logs every event, and a redelivered batch applies nothing twice."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from models.audit import AuditLog
from models.devices import ActivityLog, Device, DeviceReading
from models.events import OutboxEvent, ProcessedEvent
from tests.conftest import drain


def _topics(db) -> list[str]:
    db.session.expire_all()
    return db.session.scalars(select(OutboxEvent.topic).order_by(OutboxEvent.id)).all()


def test_bulk_written_emits_go_with_a_rollback_and_only_a_savepoints_with_it(db, factory):
    from events import emit
    from events.outbox import deferred_emits
    from models.chats import Agent

    tenant = factory.tenant()
    with deferred_emits():
        emit("test.kept", tenant_id=tenant.id)
        savepoint = db.session.begin_nested()
        emit("test.dropped", tenant_id=tenant.id)
        db.session.add(Agent(tenant_id=tenant.id, name="Dropped"))
        db.session.flush()  # inside the savepoint: the emits wait for the outer level
        savepoint.rollback()
        emit("test.also_kept", tenant_id=tenant.id)
        db.session.add(Agent(tenant_id=tenant.id, name="Kept"))
        db.session.flush()  # the outer level's flush writes them with it
        assert "test.kept" in db.session.scalars(select(OutboxEvent.topic)).all()
        db.session.commit()
        emit("test.rolled_back", tenant_id=tenant.id)
        db.session.rollback()
        emit("test.last", tenant_id=tenant.id)
        db.session.commit()  # written at the commit with nothing else to flush
    topics = [t for t in _topics(db) if t.startswith("test.")]
    assert topics == ["test.kept", "test.also_kept", "test.last"]


def test_device_lifecycle_events_are_no_audit_work(app):
    from events.registry import registry

    for topic in ("device.updated", "device.online", "device.offline", "device.discovered"):
        assert "audit.record" not in registry.handler_names_for(topic)
    # A person's change to the device record still is.
    assert "audit.record" in registry.handler_names_for("device_record.updated")


@pytest.fixture
def mic(db, factory):
    from services.manufacturers.endpoints import manufacturer_for

    tenant = factory.tenant("Venue")
    maker = manufacturer_for("shure")
    device = Device(
        tenant_id=tenant.id,
        manufacturer_id=maker.id,
        api_device_id="RX-1/ch1",
        name="Lectern",
        kind="transmitter",
        is_online=True,
        state={"battery_bars": 5, "battery_minutes": 300},
    )
    db.session.add(device)
    db.session.commit()
    return tenant, device


def _updated(tenant_id: int, bars: int, minutes: int) -> None:
    from events import emit

    # Without a version: the handler applies it (as an event emitted by hand is).
    emit(
        "device.updated",
        tenant_id=tenant_id,
        entity="device",
        payload={
            "service_code": "shure",
            "device_id": "RX-1/ch1",
            "old": {},
            "new": {"battery_bars": bars, "battery_minutes": minutes},
        },
    )


def test_a_batch_logs_every_event_and_shows_the_card_as_the_batch_left_it(app, db, worker, mic):
    from services.live import hub, tenant_topic

    tenant, device = mic
    with hub().subscribe([tenant_topic(tenant.id, "devices")], watch=True) as board:
        _updated(tenant.id, 4, 240)
        _updated(tenant.id, 3, 180)  # same commit: one batch, one transaction
        db.session.commit()
        drain(app)
        time.sleep(0.2)
        frames = board.drain()
    card = frames[f"device-{device.id}"].html
    assert 'title="3 of 5 bars"' in card and "3h 00m" in card
    summaries = db.session.scalars(
        select(ActivityLog.summary).where(ActivityLog.device_id == device.id)
    ).all()
    assert len(summaries) == 2
    assert db.session.scalar(select(func.count()).select_from(DeviceReading)) == 2
    # What receivers report is no one's change: no audit row for the lifecycle events.
    assert db.session.scalars(select(AuditLog).where(AuditLog.object_type == "device")).all() == []


def test_a_redelivered_batch_changes_nothing(app, db, worker, mic):
    tenant, device = mic
    _updated(tenant.id, 2, 120)
    _updated(tenant.id, 1, 60)
    db.session.commit()
    drain(app)
    pks = db.session.scalars(
        select(OutboxEvent.id).where(OutboxEvent.topic == "device.updated").order_by(OutboxEvent.id)
    ).all()
    records = db.session.scalar(select(func.count()).select_from(ProcessedEvent))
    state = app.extensions["switchboard.tasks"]
    for group in ("devices", "events", "metrics"):
        state.actors[f"spine_{group}"].send(list(pks))  # the same batch, delivered again
    drain(app)
    db.session.expire_all()
    assert db.session.scalar(select(func.count()).select_from(ActivityLog)) == 2
    assert db.session.scalar(select(func.count()).select_from(DeviceReading)) == 2
    assert db.session.scalar(select(func.count()).select_from(ProcessedEvent)) == records
    assert db.session.get(Device, device.id).state["battery_bars"] == 1


def test_a_device_event_is_one_message_for_all_its_handlers(app):
    """The feed, webhook and metrics handlers of a device event run in the devices group
    (one message, one transaction per batch); the same handlers keep their own groups for
    topics no route names."""
    from events.registry import registry

    for topic in ("device.updated", "device.online", "device.offline", "device.discovered"):
        names = registry.handler_names_for(topic)
        assert {"live_feed", "webhooks.fanout", "metrics.count"} <= set(names)
        assert registry.groups_for(names, topic) == ["devices"]
    project = registry.handler_names_for("project.generation_completed")
    assert len(registry.groups_for(project, "project.generation_completed")) > 1
    assert registry.queue_of("live_feed", "project.generation_completed") == "events"
    # The devices actor is sized for what the route brings it.
    members = {spec.name for spec in registry.group_members("devices")}
    assert {"device_updated", "live_feed", "metrics.count"} <= members
    assert "chat_sentiment" not in members  # message.created never comes to the devices group


def test_a_card_shows_what_the_state_reports_and_nothing_it_does_not(app, db, mic):
    """The card reads a state with every key filled in (services.devices.card_state): a
    key the receiver never reported must read as absent, not as a value."""
    from services.live import render_macro

    _, device = mic
    device.state = {}
    bare = render_macro("devices/_card.html", "device_card", d=device)
    assert 'class="battery"' not in bare and "Interference" not in bare
    assert "Locked:" not in bare and "G/C" not in bare
    reported = {
        "battery_bars": 2,
        "battery_minutes": 125,
        "interference": True,
        "tx_lock": "power",
        "group_channel": "3,12",
        "channel_name": "Lectern <A>",
    }
    device.state = dict(reported)
    full = render_macro("devices/_card.html", "device_card", d=device)
    assert 'title="2 of 5 bars"' in full and "2h 05m" in full
    assert "Interference detected" in full and "Locked: power" in full and "G/C 3,12" in full
    assert "Lectern &lt;A&gt;" in full
    assert device.state == reported  # the device's own state is not filled in


def test_a_batch_adds_to_the_shared_counters_last(app, db, worker, mic):
    """The counters every batch of a tenant's events adds to are locked by the upsert until
    the commit: it comes after the batch's other writes, so a second worker's batch of the
    same tenant waits for a commit, not for this batch's rendering too."""
    from tests.helpers import statements_run, transaction_running

    tenant, _ = mic
    _updated(tenant.id, 4, 240)
    _updated(tenant.id, 3, 180)
    db.session.commit()
    with statements_run() as statements:
        drain(app)
    batch = transaction_running(statements, "INSERT INTO metric_counters")
    writes = [s.split("(")[0].strip() for s in batch if s.startswith(("INSERT", "UPDATE"))]
    assert "INSERT INTO activity_logs" in writes and "INSERT INTO device_readings" in writes
    assert writes[-1] == "INSERT INTO metric_counters", writes


def test_a_chats_events_are_one_message_each_with_the_counters_last(app):
    """A visitor's message is one spine message for all its handlers (tasks/chats.py routes
    message.* and chat.* to the chats group), and the counters' upsert, whose row locks every
    message of the tenant contends for, runs after the other handlers."""
    from events.registry import registry

    for topic in ("message.created", "message.updated", "chat.created", "chat.updated"):
        names = registry.handler_names_for(topic)
        assert registry.groups_for(names, topic) == ["chats"], topic
    created = registry.handler_names_for("message.created")
    assert {"live_feed", "audit.record", "chat_sentiment", "chat_live_messages"} <= set(created)
    assert created[-1] == "metrics.count"
    members = {spec.name for spec in registry.group_members("chats")}
    assert {"audit.record", "metrics.count", "live_feed"} <= members
