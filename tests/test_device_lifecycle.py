"""Device lifecycle handlers through the spine: events in, devices marked, activity logged,
alerts raised — found by manufacturer code + device id, never by name."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from events import emit
from models.base import utcnow
from models.devices import ActivityLog, Device, DeviceReading, Location, Manufacturer
from models.events import OutboxEvent
from tests.conftest import drain


@pytest.fixture
def venue(app, db, factory):
    tenant = factory.tenant("Venue")
    maker = Manufacturer(code="shure", name="Shure")
    stage = Location(tenant_id=tenant.id, name="Stage", alert_on_offline=True)
    db.session.add_all([maker, stage])
    db.session.flush()
    device = Device(
        tenant_id=tenant.id,
        manufacturer_id=maker.id,
        api_device_id="ULXD-1",
        name="Lead vocal",
        kind="receiver",
        location_id=stage.id,
        is_online=True,
        state={"battery_bars": 4},
    )
    # Same name, other id: lookups must never pick it.
    decoy = Device(
        tenant_id=tenant.id,
        manufacturer_id=maker.id,
        api_device_id="ULXD-2",
        name="Lead vocal",
        kind="receiver",
        is_online=True,
        state={},
    )
    db.session.add_all([device, decoy])
    db.session.commit()
    return tenant, device, decoy, stage


def _emit(db, topic, tenant_id, device_id, **data):
    emit(
        topic,
        tenant_id=tenant_id,
        entity="device",
        payload={"service_code": "shure", "device_id": device_id, **data},
    )
    db.session.commit()


def _activity(db, tenant_id):
    db.session.expire_all()
    return db.session.scalars(
        select(ActivityLog).where(ActivityLog.tenant_id == tenant_id).order_by(ActivityLog.id)
    ).all()


def _topics(db):
    return db.session.scalars(select(OutboxEvent.topic).order_by(OutboxEvent.id)).all()


def test_offline_then_online_marks_logs_alerts_and_recovers(app, db, worker, venue):
    tenant, device, decoy, _ = venue
    _emit(db, "device.offline", tenant.id, "ULXD-1", missed_polls=3)
    drain(app)
    db.session.expire_all()
    assert db.session.get(Device, device.id).is_online is False
    assert db.session.get(Device, decoy.id).is_online is True  # found by id, not by name
    row = _activity(db, tenant.id)[-1]
    assert row.status == "warning" and row.device_id == device.id
    assert row.details["old"] == {"status": "online"} and row.details["new"] == {
        "status": "offline"
    }
    assert "device.offline_alert" in _topics(db)

    _emit(db, "device.online", tenant.id, "ULXD-1")
    drain(app)
    db.session.expire_all()
    recovered = db.session.get(Device, device.id)
    assert recovered.is_online is True and recovered.offline_alerted_at is None
    assert "device.recovered" in _topics(db)


def test_maintenance_suppresses_alerts(app, db, worker, venue):
    tenant, device, _, stage = venue
    stage.maintenance_mode = True
    db.session.commit()
    _emit(db, "device.offline", tenant.id, "ULXD-1", missed_polls=3)
    drain(app)
    assert db.session.get(Device, device.id).is_online is False
    assert "device.offline_alert" not in _topics(db)


def test_update_logs_old_and_new_and_samples_and_warns_on_low_battery(app, db, worker, venue):
    tenant, device, _, _ = venue
    _emit(
        db,
        "device.updated",
        tenant.id,
        "ULXD-1",
        old={"battery_bars": 4, "firmware": ""},
        new={"battery_bars": 1, "firmware": "2.4.13"},
    )
    drain(app)
    db.session.expire_all()
    updated = db.session.get(Device, device.id)
    assert updated.state["battery_bars"] == 1 and updated.firmware == "2.4.13"
    row = _activity(db, tenant.id)[-1]
    assert row.details["old"]["battery_bars"] == 4 and row.details["new"]["battery_bars"] == 1
    assert db.session.scalar(select(DeviceReading.battery_bars)) == 1
    assert "device.battery_low" in _topics(db)


def test_unknown_device_warns_or_is_provisioned(app, db, worker, venue):
    tenant, _, _, _ = venue
    report = {
        "api_device_id": "AD4D-9",
        "kind": "receiver",
        "name": "Band rack",
        "model": "AD4D",
        "state": {"battery_bars": 5},
    }
    _emit(db, "device.discovered", tenant.id, "AD4D-9", device=report)
    _emit(db, "device.online", tenant.id, "NOPE-1")
    drain(app)
    warnings = [a for a in _activity(db, tenant.id) if a.status == "warning"]
    assert any("AD4D-9" in a.summary and "auto-provisioning is off" in a.summary for a in warnings)
    assert any("unknown device NOPE-1" in a.summary for a in warnings)
    assert db.session.scalar(select(Device).where(Device.api_device_id == "AD4D-9")) is None

    app.config["DEVICES_AUTO_PROVISION"] = True
    _emit(db, "device.discovered", tenant.id, "AD4D-9", device=report)
    drain(app)
    created = db.session.scalar(select(Device).where(Device.api_device_id == "AD4D-9"))
    assert created is not None and created.model == "AD4D" and created.is_online


def test_reminders_repeat_while_down(app, db, worker, venue):
    tenant, device, _, _ = venue
    _emit(db, "device.offline", tenant.id, "ULXD-1", missed_polls=3)
    drain(app)
    row = db.session.get(Device, device.id)
    row.offline_alerted_at = utcnow() - timedelta(minutes=45)
    db.session.commit()
    from tasks.devices import offline_reminders

    offline_reminders()
    offline_reminders()  # a second run within the interval adds nothing
    assert _topics(db).count("device.offline_reminder") == 1


def test_activity_page_and_dashboard_render(app, db, client, worker, venue, factory):
    from tests.conftest import login

    tenant, device, _, _ = venue
    _emit(db, "device.offline", tenant.id, "ULXD-1", missed_polls=3)
    drain(app)
    from models.accounts import Tenant

    login(client, factory.user(db.session.get(Tenant, tenant.id)))
    page = client.get("/devices/").get_data(as_text=True)
    assert f'id="device-card-{device.id}"' in page and 'data-online="false"' in page
    activity = client.get("/devices/activity?status=warning").get_data(as_text=True)
    assert "Lead vocal is offline" in activity
    assert client.get("/devices/activity?from=bad").status_code == 400
    detail = client.get(f"/devices/{device.id}").get_data(as_text=True)
    assert "Lead vocal is offline" in detail
