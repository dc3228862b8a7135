"""Polls compare against the state they have applied themselves, and old events never win.

A poll that diffed against rows only the handlers update repeated every change for as long
as the handlers were not running (one rename became one `device.updated` per poll, each with
its own activity row, metric count and webhook); an old event delivered again after a newer
one put the older name back on the card. Real receivers (the simulator over TCP), real
PostgreSQL and Redis where the worker is stopped and started.
"""

from __future__ import annotations

import json

import dramatiq
import pytest
from sqlalchemy import func, select, update

from models.devices import ActivityLog, Device
from models.events import OutboxEvent, ProcessedEvent
from services import devices as device_service
from services.manufacturers.shure import ShureSettings
from services.manufacturers.shure import service as shure_service
from services.manufacturers.simulator import Fleet, attach_endpoints
from tests.conftest import drain, make_app, prod_overrides, shut_down_app

SETTINGS = {
    "DEVICES_AUTO_PROVISION": True,
    "DEVICES_POLL_TIMEOUT": 1.0,
    "DEVICES_OFFLINE_AFTER_MISSES": 2,
    "DEVICES_POLL_INTERVAL": 3600.0,  # only the polls the tests make
    "DEVICES_SHURE_METER_RATE_MS": 200,
    "DEVICES_SHURE_SILENCE_TIMEOUT": 1.0,
    "DEVICES_SHURE_CONNECT_TIMEOUT": 1.0,
    "DEVICES_SHURE_BACKOFF_INITIAL": 0.1,
    "DEVICES_SHURE_BACKOFF_MAX": 0.3,
}


def _count(db, topic: str) -> int:
    return db.session.scalar(select(func.count()).where(OutboxEvent.topic == topic))


def _mic(db, tenant_id: int, receiver) -> Device:
    db.session.expire_all()
    return db.session.scalar(
        select(Device).where(
            Device.tenant_id == tenant_id, Device.api_device_id == f"{receiver.device_id}/ch1"
        )
    )


def _renames(db) -> int:
    payloads = db.session.scalars(
        select(OutboxEvent.payload).where(OutboxEvent.topic == "device.updated")
    ).all()
    return sum(1 for payload in payloads if "name" in payload["new"])


def _updates_logged(db, device_id: int) -> list[ActivityLog]:
    return db.session.scalars(
        select(ActivityLog)
        .where(ActivityLog.device_id == device_id, ActivityLog.activity_type == "update")
        .order_by(ActivityLog.id)
    ).all()


def _shure_teardown() -> None:
    shure_service.shutdown()
    shure_service.settings = ShureSettings()


# ---------------------------------------------------------------- handlers down (production)


@pytest.fixture
def prod_devices_app(tmp_path, pg_database_url, redis_url):
    application = make_app(tmp_path, **prod_overrides(pg_database_url, redis_url), **SETTINGS)
    from extensions import db

    with application.app_context():
        db.drop_all()
        db.create_all()
    yield application
    _shure_teardown()
    shut_down_app(application, redis_url)


def _run_worker(app) -> None:
    """Start a worker on the app's Redis queues, let it handle everything queued, stop it."""
    from events.dispatch import relay

    state = app.extensions["switchboard.tasks"]
    worker = dramatiq.Worker(state.broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        with app.app_context():
            relay(app, min_age_seconds=0)
        drain(app)
        worker.join()
    finally:
        worker.stop()


@pytest.mark.integration
def test_changes_seen_by_many_polls_while_the_handlers_are_down_are_one_event_each(
    prod_devices_app, prod_factory
):
    app = prod_devices_app
    from extensions import db
    from services.manufacturers.endpoints import manufacturer_for

    tenant = prod_factory.tenant("Venue")
    fleet = Fleet(2, seed=5, models=["QLXD4", "QLXD4"])
    try:
        with app.app_context():
            manufacturer_for("shure")
            attach_endpoints(tenant.id, fleet.endpoints)
            db.session.commit()
            # Discovery, twice, before any worker runs: two receivers with a transmitter each.
            device_service.poll_service(tenant.id, "shure")
            device_service.poll_service(tenant.id, "shure")
            assert _count(db, "device.discovered") == 4
            _run_worker(app)
            discoveries = db.session.scalars(
                select(ActivityLog.summary).where(ActivityLog.activity_type == "discovery")
            ).all()
            assert len(discoveries) == 4 and all("Provisioned" in s for s in discoveries)
            renamed, dropped = fleet.receivers
            mic = _mic(db, tenant.id, renamed)
            assert mic is not None and mic.name == renamed.channel(1).name
            assert _renames(db) == 0

            # No worker runs from here on: every event the polls write waits in Redis.
            renamed.rename(1, "Pastor Mic")
            dropped.drop()
            for _ in range(4):
                device_service.poll_service(tenant.id, "shure")
            db.session.expire_all()
            # (Meter levels may change meanwhile too: only the renames are counted.)
            assert _renames(db) == 1
            # The rows say so already (pages show it while the handlers are away), and the
            # poll's own changes are no person's edits: no device_record.updated for them.
            assert _mic(db, tenant.id, renamed).name == "Pastor Mic"
            assert _count(db, "device_record.updated") == 0
            # The dropped receiver and its transmitter, once each.
            assert _count(db, "device.offline") == 2
            dropped.restore()
            for _ in range(3):
                device_service.poll_service(tenant.id, "shure")
            assert _count(db, "device.online") == 2

            _run_worker(app)
            mic = _mic(db, tenant.id, renamed)
            assert mic.name == "Pastor Mic" and mic.state["channel_name"] == "Pastor Mic"
            logged = [row for row in _updates_logged(db, mic.id) if "name" in row.details["new"]]
            assert len(logged) == 1, [row.summary for row in logged]
            assert logged[0].details["new"]["name"] == "Pastor Mic"
            assert logged[0].details["old"]["name"] != "Pastor Mic"
            statuses = db.session.scalars(
                select(ActivityLog.summary).where(
                    ActivityLog.tenant_id == tenant.id, ActivityLog.activity_type == "status"
                )
            ).all()
            assert len(statuses) == 4  # two devices offline once, online once
            # And once handled, further polls stay quiet.
            device_service.poll_service(tenant.id, "shure")
            assert _renames(db) == 1
    finally:
        fleet.stop()


# ---------------------------------------------------------------- an old event again (embedded)


@pytest.fixture
def devices_app(tmp_path):
    from extensions import db

    application = make_app(tmp_path, **SETTINGS)
    with application.app_context():
        db.create_all()
    yield application
    _shure_teardown()
    application.extensions["switchboard.tasks"].stop()
    with application.app_context():
        db.engine.dispose()


@pytest.fixture
def devices_worker(devices_app):
    state = devices_app.extensions["switchboard.tasks"]
    state.start_embedded_worker()
    state.scheduler.stop()  # its periodic polls would race the tests' own
    state.scheduler = None
    yield state
    state.stop()


def _card_frames(app, tenant_id: int, device_id: int) -> list[str]:
    from services.live import bus, tenant_topic

    frames = bus().read({tenant_topic(tenant_id, "devices"): "0-0"})
    out = []
    for _, _, data in frames:
        body = json.loads(data)
        if body.get("key") == f"device-{device_id}":
            out.append(body.get("html") or "")
    return out


def test_an_old_update_delivered_again_does_not_bring_back_the_old_name(
    devices_app, devices_worker, factory
):
    from events.dispatch import relay
    from extensions import db
    from services.manufacturers.endpoints import manufacturer_for

    app = devices_app
    tenant = factory.tenant("Venue")
    fleet = Fleet(1, seed=5, models=["QLXD4"])
    try:
        with app.app_context():
            manufacturer_for("shure")
            attach_endpoints(tenant.id, fleet.endpoints)
            db.session.commit()
            device_service.poll_service(tenant.id, "shure")
            drain(app)
            receiver = fleet.receivers[0]

            receiver.rename(1, "Name B")
            device_service.poll_service(tenant.id, "shure")
            drain(app)
            first = db.session.scalars(
                select(OutboxEvent)
                .where(OutboxEvent.topic == "device.updated")
                .order_by(OutboxEvent.id.desc())
            ).first()
            assert first.payload["new"]["name"] == "Name B"
            receiver.rename(1, "Name C")
            device_service.poll_service(tenant.id, "shure")
            drain(app)
            mic = _mic(db, tenant.id, receiver)
            assert mic.name == "Name C"

            # The B event's handler result is lost (a worker died before its record was
            # kept, say): the relay sends it again, after C was applied.
            db.session.execute(
                ProcessedEvent.__table__.delete().where(
                    ProcessedEvent.event_id == first.id, ProcessedEvent.handler == "device_updated"
                )
            )
            db.session.execute(
                update(OutboxEvent)
                .where(OutboxEvent.id == first.id)
                .values(status="dispatched", dispatched_at=None)
            )
            db.session.commit()
            frames_before = len(_card_frames(app, tenant.id, mic.id))
            assert relay(app, min_age_seconds=0).redelivered == 1
            drain(app)
            handled = db.session.scalar(
                select(func.count()).where(
                    ProcessedEvent.event_id == first.id, ProcessedEvent.handler == "device_updated"
                )
            )
            assert handled == 1  # it did run again

            mic = _mic(db, tenant.id, receiver)
            assert mic.name == "Name C" and mic.state["channel_name"] == "Name C"
            for html in _card_frames(app, tenant.id, mic.id)[frames_before:]:
                assert "Name B" not in html
            # The next poll agrees that the name is C: it reports no rename (meter levels
            # may well have moved meanwhile).
            last = db.session.scalar(select(func.max(OutboxEvent.id)))
            device_service.poll_service(tenant.id, "shure")
            later = db.session.scalars(
                select(OutboxEvent.payload).where(
                    OutboxEvent.id > last, OutboxEvent.topic == "device.updated"
                )
            ).all()
            assert not [p for p in later if "name" in p["new"] or "channel_name" in p["new"]]
    finally:
        fleet.stop()


def test_a_late_offline_event_neither_marks_nor_alerts_a_device_that_is_back(
    devices_app, devices_worker, factory
):
    """The poll saw the receiver go down (state 6) and come back (state 7); the offline
    event's handlers run last. The device is online: no outage to show or alert on."""
    from events import emit
    from extensions import db
    from models.devices import Location
    from services.manufacturers.endpoints import manufacturer_for

    app = devices_app
    tenant = factory.tenant("Venue")
    with app.app_context():
        stage = Location(tenant_id=tenant.id, name="Stage", alert_on_offline=True)
        db.session.add(stage)
        db.session.flush()
        device = Device(
            tenant_id=tenant.id,
            manufacturer_id=manufacturer_for("shure").id,
            api_device_id="ULXD-1",
            name="Lead vocal",
            kind="receiver",
            location_id=stage.id,
            is_online=True,
            state={},
            state_version=7,
        )
        db.session.add(device)
        db.session.commit()
        emit(
            "device.offline",
            tenant_id=tenant.id,
            entity="device",
            entity_id=device.id,
            payload={
                "service_code": "shure",
                "device_id": "ULXD-1",
                "pk": device.id,
                "version": 6,
                "missed_polls": 2,
            },
        )
        db.session.commit()
        drain(app)
        device = _fresh_device(db, device.id)
        assert device.is_online and device.offline_alerted_at is None
        assert _count(db, "device.offline_alert") == 0
        assert _card_frames(app, tenant.id, device.id) == []
        logged = db.session.scalars(
            select(ActivityLog.summary).where(ActivityLog.device_id == device.id)
        ).all()
        assert logged == ["Lead vocal is offline"]  # what happened stays in the log


def _fresh_device(db, device_id: int) -> Device:
    db.session.expire_all()
    return db.session.get(Device, device_id)
