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
    # Recovery announced as soon as the device answers (flap damping: test_device_alerts.py).
    app.config["DEVICES_RECOVERY_CONFIRM_SECONDS"] = 0
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
    # The lifecycle events are the record of those flips: no second, "device_record.updated"
    # event repeats them (and runs every handler again).
    assert "device_record.updated" not in _topics(db)

    recovered.name = "Stage left receiver"  # a person renames it: that is a record change
    db.session.commit()
    assert "device_record.updated" in _topics(db)


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


def test_one_commits_events_about_new_and_known_devices_all_apply(app, db, worker, venue):
    """A poll commits many events at once and their handlers run as one batch, reading the
    batch's devices up front: a device discovered earlier in the same batch is found too,
    and a same-named device is never picked."""
    tenant, device, decoy, _ = venue
    app.config["DEVICES_AUTO_PROVISION"] = True

    def event(topic, device_id, **data):
        payload = {"service_code": "shure", "device_id": device_id, **data}
        emit(topic, tenant_id=tenant.id, entity="device", payload=payload)

    event("device.discovered", "AD4D-7", device={"api_device_id": "AD4D-7", "name": "Rack"})
    event("device.updated", "AD4D-7", old={"firmware": ""}, new={"firmware": "1.2"})
    event("device.updated", "ULXD-1", old={"battery_bars": 4}, new={"battery_bars": 3})
    event("device.offline", "ULXD-2", missed_polls=3)
    event("device.online", "NOPE-1")
    db.session.commit()
    drain(app)
    db.session.expire_all()
    created = db.session.scalar(select(Device).where(Device.api_device_id == "AD4D-7"))
    assert created is not None and created.firmware == "1.2"
    assert db.session.get(Device, device.id).state["battery_bars"] == 3
    assert db.session.get(Device, device.id).is_online
    assert not db.session.get(Device, decoy.id).is_online
    summaries = [a.summary for a in _activity(db, tenant.id)]
    assert "Provisioned receiver Rack" in summaries
    assert "Rack: firmware changed" in summaries and "Lead vocal is offline" in summaries
    assert any("unknown device NOPE-1" in s for s in summaries)


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
    # Levels as receivers report them (dBm, dBFS), meters filled on a scale that fits them.
    db.session.get(Device, device.id).state = {"rf_level": -60, "audio_level": -30}
    db.session.commit()
    page = client.get("/devices/").get_data(as_text=True)
    assert 'value="50.0" title="-60 dBm"' in page and "-60 dBm</span>" in page
    assert 'value="50.0" title="-30 dBFS"' in page and "-30 dBFS</span>" in page
    activity = client.get("/devices/activity?status=warning").get_data(as_text=True)
    assert "Lead vocal is offline" in activity
    # The type filter offers exactly the tenant's types (another tenant's stay out).
    other = factory.tenant("Elsewhere")
    db.session.add(ActivityLog(tenant_id=other.id, activity_type="zz_other", summary="x"))
    db.session.add(ActivityLog(tenant_id=tenant.id, activity_type="audit_a", summary="y"))
    db.session.commit()
    options = client.get("/devices/activity").get_data(as_text=True)
    assert "<option >audit_a</option>" in options and "<option >status</option>" in options
    assert "zz_other" not in options
    assert client.get("/devices/activity?from=bad").status_code == 400
    detail = client.get(f"/devices/{device.id}").get_data(as_text=True)
    assert "Lead vocal is offline" in detail


def test_dashboard_pages_through_a_large_fleet(app, db, client, factory):
    import re

    from tests.conftest import login

    tenant = factory.tenant("Arena")
    maker = Manufacturer(code="arena", name="Arena Co")
    halls = [Location(tenant_id=tenant.id, name=f"Hall {n}") for n in (1, 2)]
    db.session.add_all([maker, *halls])
    db.session.flush()
    for n in range(260):
        location = halls[n % 2].id if n < 250 else None  # ten without a location
        db.session.add(
            Device(tenant_id=tenant.id, manufacturer_id=maker.id, api_device_id=f"A-{n}",
                   name=f"Mic {n:03d}", kind="transmitter", location_id=location, state={})
        )  # fmt: skip
    db.session.commit()
    login(client, factory.user(db.session.get(type(tenant), tenant.id)))

    seen: list[str] = []
    page = client.get("/devices/?state=offline").get_data(as_text=True)
    pages = 1
    while True:
        seen += re.findall(r'id="device-card-(\d+)"', page)
        more = re.search(r'hx-get="([^"]+)"[^>]*>Show more devices', page)
        if not more:
            break
        url = more.group(1).replace("&amp;", "&")
        assert "state=offline" in url  # the filter carries over
        page = client.get(url, headers={"HX-Request": "true"}).get_data(as_text=True)
        pages += 1
    assert pages == 3
    assert len(seen) == 260 and len(set(seen)) == 260  # every device once, none twice
    assert "No location" in page  # the unlocated ones come last
    # Another tenant's device id as the cursor is a 404, not a page of theirs.
    other = factory.tenant()
    db.session.add(Device(tenant_id=other.id, manufacturer_id=maker.id, api_device_id="X",
                          name="X", kind="receiver", state={}))  # fmt: skip
    db.session.commit()
    foreign = db.session.scalar(select(Device.id).where(Device.tenant_id == other.id))
    assert client.get(f"/devices/?after={foreign}").status_code == 404


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_overlapping_polls_of_one_service_run_once(backend, request):
    from models.devices import ServiceSyncLog
    from services.devices import poll_lock, poll_service

    app = request.getfixturevalue("app" if backend == "sqlite" else "prod_app")
    from tests.conftest import Factory

    tenant = Factory(app).tenant()
    with app.app_context():
        from extensions import db

        if backend == "sqlite":
            db.create_all()
        db.session.add(Manufacturer(code="shure", name="Shure"))
        db.session.commit()
        with poll_lock(tenant.id, "shure") as first:
            assert first
            # A second poll (another worker, or the CLI) while the first one runs: skipped,
            # nothing emitted, no sync log.
            assert poll_service(tenant.id, "shure").status == "skipped"
            assert db.session.scalars(select(ServiceSyncLog)).all() == []
        assert poll_service(tenant.id, "shure").status == "success"
        assert len(db.session.scalars(select(ServiceSyncLog)).all()) == 1
