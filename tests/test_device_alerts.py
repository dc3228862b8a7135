"""Alerts people can live with (issue 20, section 3), and a CLI that tells the truth (section 5).

Receivers are the simulator over real TCP; the poll and the handlers are the real ones (SQLite,
embedded worker). What is counted is what an admin receives: notifications.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from events import emit
from models.devices import Device, Location, ServiceSyncLog
from models.notifications import Notification
from services import devices as device_service
from services.manufacturers.shure import ShureSettings
from services.manufacturers.shure import service as shure_service
from services.manufacturers.simulator import SimulatedReceiver, attach_endpoints
from tests.conftest import drain, login, make_app
from tests.helpers import handlers_only

OVERRIDES = {
    "DEVICES_AUTO_PROVISION": True,
    "DEVICES_POLL_TIMEOUT": 1.5,
    "DEVICES_OFFLINE_AFTER_MISSES": 2,
    "DEVICES_POLL_INTERVAL": 3600.0,
    "DEVICES_RECOVERY_CONFIRM_SECONDS": 0.0,
    "DEVICES_SHURE_METER_RATE_MS": 100,
    "DEVICES_SHURE_SILENCE_TIMEOUT": 2.0,
    "DEVICES_SHURE_CONNECT_TIMEOUT": 1.0,
    "DEVICES_SHURE_BACKOFF_INITIAL": 0.05,
    "DEVICES_SHURE_BACKOFF_MAX": 0.1,
}


def _app(tmp_path, **extra):
    from extensions import db

    application = make_app(tmp_path, **{**OVERRIDES, **extra})
    with application.app_context():
        db.create_all()
    return application


def _close(application) -> None:
    from extensions import db

    shure_service.shutdown()
    shure_service.settings = ShureSettings()
    application.extensions["switchboard.tasks"].stop()
    with application.app_context():
        db.engine.dispose()


@pytest.fixture
def app(tmp_path):
    application = _app(tmp_path)
    yield application
    _close(application)


@pytest.fixture
def worker(app):
    """Handlers run; the scheduler does not (the tests poll, and run the periodic job)."""
    with handlers_only(app) as state:
        yield state


@pytest.fixture
def venue(app, db, factory):
    from services.manufacturers.endpoints import manufacturer_for

    tenant = factory.tenant("Venue")
    admin = factory.user(tenant, role="admin")
    manufacturer_for("shure")
    stage = Location(tenant_id=tenant.id, name="Stage", alert_on_offline=True)
    db.session.add(stage)
    db.session.commit()
    return tenant, admin, stage


def poll(app, db, tenant_id):
    result = device_service.poll_service(tenant_id, "shure")
    drain(app)
    db.session.expire_all()
    return result


def wait_connected(app, db, tenant_id, receiver_id: str, tries: int = 20) -> None:
    """Poll until the receiver answers again (the client reconnects with a short back-off)."""
    for _ in range(tries):
        poll(app, db, tenant_id)
        if devices_of(db, tenant_id)[receiver_id].is_online:
            return
        time.sleep(0.1)
    raise AssertionError(f"{receiver_id} never answered again")


def devices_of(db, tenant_id) -> dict[str, Device]:
    rows = db.session.scalars(select(Device).where(Device.tenant_id == tenant_id))
    return {d.api_device_id: d for d in rows}


def received(db, admin, *kinds: str) -> list[Notification]:
    return db.session.scalars(
        select(Notification)
        .where(Notification.recipient_id == admin.id, Notification.type.in_(kinds))
        .order_by(Notification.id)
    ).all()


OUTAGE_KINDS = ("device_offline", "device_recovered", "device_offline_reminder")


def test_a_receiver_outage_is_one_alert_and_its_mics_show_unreachable(
    app, db, worker, venue, client
):
    tenant, admin, stage = venue
    with SimulatedReceiver("ULXD4Q", device_id="RACK-A") as rx:
        attach_endpoints(tenant.id, [rx.address], location_id=stage.id)
        db.session.commit()
        poll(app, db, tenant.id)
        assert len(devices_of(db, tenant.id)) == 5  # the receiver and four mics

        rx.drop()
        poll(app, db, tenant.id)
        # One miss of two: pending, not offline, and nobody is told yet.
        receiver = devices_of(db, tenant.id)["RACK-A"]
        assert receiver.is_online and receiver.missed_polls == 1
        login(client, admin)
        assert "Pending" in client.get(f"/devices/{receiver.id}").get_data(as_text=True)
        assert received(db, admin, *OUTAGE_KINDS) == []

        poll(app, db, tenant.id)
        devices = devices_of(db, tenant.id)
        assert not any(d.is_online for d in devices.values())
        assert [n.title for n in received(db, admin, *OUTAGE_KINDS)] == ["Device offline: RACK-A"]
        mic = devices["RACK-A/ch1"]
        page = client.get(f"/devices/{mic.id}").get_data(as_text=True)
        assert "Receiver unreachable" in page
        assert "Receiver unreachable" in client.get("/devices/").get_data(as_text=True)

        rx.restore()
        wait_connected(app, db, tenant.id, "RACK-A")
        poll(app, db, tenant.id)
        assert all(d.is_online for d in devices_of(db, tenant.id).values())
        assert [n.title for n in received(db, admin, *OUTAGE_KINDS)] == [
            "Device offline: RACK-A",
            "Device back online: RACK-A",
        ]


def test_a_transmitter_switched_off_is_tx_off_and_raises_no_alert(app, db, worker, venue, client):
    tenant, admin, stage = venue
    with SimulatedReceiver("ULXD4D", device_id="RACK-B", channel_names=["Pastor", "Choir"]) as rx:
        attach_endpoints(tenant.id, [rx.address], location_id=stage.id)
        db.session.commit()
        poll(app, db, tenant.id)
        rx.tx_off(1)
        for _ in range(3):  # more than DEVICES_OFFLINE_AFTER_MISSES
            poll(app, db, tenant.id)
        devices = devices_of(db, tenant.id)
        pastor = devices["RACK-B/ch1"]
        assert devices["RACK-B"].is_online and devices["RACK-B/ch2"].is_online
        assert pastor.state.get("tx_on") is False
        login(client, admin)
        assert "TX off" in client.get(f"/devices/{pastor.id}").get_data(as_text=True)
        board = client.get("/devices/").get_data(as_text=True)
        assert "TX off" in board

        rx.tx_on(1)
        poll(app, db, tenant.id)
        assert devices_of(db, tenant.id)["RACK-B/ch1"].state.get("tx_on") is True
        assert received(db, admin, *OUTAGE_KINDS) == []


def test_a_flapping_receiver_is_one_alert_with_a_flap_count(tmp_path, factory_for_flaps):
    app, db, tenant, admin, stage = factory_for_flaps
    with SimulatedReceiver("ULXD4D", device_id="FLAPPY") as rx:
        attach_endpoints(tenant.id, [rx.address], location_id=stage.id)
        db.session.commit()
        poll(app, db, tenant.id)
        # 12 s down / 12 s up for two minutes, polled every 10 s with one retry: five outages.
        for _ in range(5):
            rx.drop()
            poll(app, db, tenant.id)
            poll(app, db, tenant.id)
            assert not devices_of(db, tenant.id)["FLAPPY"].is_online
            rx.restore()
            wait_connected(app, db, tenant.id, "FLAPPY")
        # Back, but not yet for DEVICES_RECOVERY_CONFIRM_SECONDS: still one open outage.
        assert [n.title for n in received(db, admin, *OUTAGE_KINDS)] == ["Device offline: FLAPPY"]
        from tasks.devices import offline_reminders

        offline_reminders()
        assert len(received(db, admin, *OUTAGE_KINDS)) == 1
        # The clock moves past the confirmation window (the device stays up).
        for device in devices_of(db, tenant.id).values():
            if device.back_online_at is not None:
                device.back_online_at -= timedelta(seconds=61)
        db.session.commit()
        offline_reminders()
        drain(app)
        db.session.expire_all()
        notes = received(db, admin, *OUTAGE_KINDS)
        assert [n.title for n in notes] == ["Device offline: FLAPPY", "Device back online: FLAPPY"]
        assert "flapped 4 times" in notes[-1].body
        assert devices_of(db, tenant.id)["FLAPPY"].flap_count == 0


@pytest.fixture
def factory_for_flaps(tmp_path):
    from extensions import db
    from services.manufacturers.endpoints import manufacturer_for
    from tests.conftest import Factory

    application = _app(
        tmp_path, DEVICES_RECOVERY_CONFIRM_SECONDS=60.0, DEVICES_ALERT_REMINDER_MINUTES=30.0
    )
    state = application.extensions["switchboard.tasks"]
    state.start_embedded_worker()
    state.scheduler.stop()
    state.scheduler = None
    with application.app_context():
        factory = Factory(application)
        tenant = factory.tenant("Venue")
        admin = factory.user(tenant, role="admin")
        manufacturer_for("shure")
        stage = Location(tenant_id=tenant.id, name="Stage", alert_on_offline=True)
        db.session.add(stage)
        db.session.commit()
        yield application, db, tenant, admin, stage
        db.session.remove()
    state.stop()
    _close(application)


def test_reminders_follow_a_sub_minute_setting_and_stop_at_recovery(tmp_path):
    from extensions import db
    from services.manufacturers.endpoints import manufacturer_for
    from tests.conftest import Factory

    # Three-second reminders; the scheduler runs as in production (its poll does nothing).
    application = _app(tmp_path, DEVICES_ALERT_REMINDER_MINUTES=0.05)
    state = application.extensions["switchboard.tasks"]
    try:
        with application.app_context():
            factory = Factory(application)
            tenant = factory.tenant("Venue")
            admin = factory.user(tenant, role="admin")
            maker = manufacturer_for("shure")
            stage = Location(tenant_id=tenant.id, name="Stage", alert_on_offline=True)
            db.session.add(stage)
            db.session.flush()
            device = Device(
                tenant_id=tenant.id,
                manufacturer_id=maker.id,
                api_device_id="RX-9",
                name="Lectern",
                kind="receiver",
                location_id=stage.id,
                is_online=True,
                state={},
            )
            db.session.add(device)
            db.session.commit()
            state.start_embedded_worker()
            payload = {"service_code": "shure", "device_id": "RX-9", "missed_polls": 3}
            emit("device.offline", tenant_id=tenant.id, entity="device", payload=payload)
            db.session.commit()
            time.sleep(8.0)
            db.session.expire_all()
            reminders = received(db, admin, "device_offline_reminder")
            assert 2 <= len(reminders) <= 3, [n.title for n in reminders]

            emit("device.online", tenant_id=tenant.id, entity="device", payload=payload)
            db.session.commit()
            time.sleep(1.0)
            db.session.expire_all()
            after_recovery = len(received(db, admin, "device_offline_reminder"))
            time.sleep(5.0)
            db.session.expire_all()
            assert len(received(db, admin, "device_offline_reminder")) == after_recovery
            assert [n.title for n in received(db, admin, "device_recovered")] == [
                "Device back online: Lectern"
            ]
            db.session.remove()
    finally:
        state.stop()
        _close(application)


# ---------------------------------------------------------------- section 5: the CLI


def test_a_cli_poll_while_another_runs_waits_then_says_so_and_fails(app, db, venue, runner):
    tenant, _, stage = venue
    with SimulatedReceiver("QLXD4", device_id="CLI-RX") as rx:
        attach_endpoints(tenant.id, [rx.address], location_id=stage.id)
        db.session.commit()
        with device_service.poll_lock(tenant.id, "shure") as mine:
            assert mine
            started = time.monotonic()
            result = runner.invoke(args=["devices", "poll", "--wait", "1"])
            waited = time.monotonic() - started
        assert result.exit_code != 0, result.output
        assert "another poll" in result.output.lower()
        assert "waiting" in result.output.lower()
        assert waited >= 1.0
        assert "0 devices" not in result.output
        assert db.session.scalar(select(func.count()).select_from(ServiceSyncLog)) == 0


def test_a_cli_poll_waits_for_the_running_one_and_then_polls(app, db, venue, runner):
    tenant, _, stage = venue
    with SimulatedReceiver("QLXD4", device_id="CLI-RX") as rx:
        attach_endpoints(tenant.id, [rx.address], location_id=stage.id)
        db.session.commit()
        holding = threading.Event()
        release = threading.Event()

        def other_poll() -> None:
            with app.app_context(), device_service.poll_lock(tenant.id, "shure"):
                holding.set()
                release.wait(5)

        other = threading.Thread(target=other_poll)
        other.start()
        holding.wait(5)
        threading.Timer(0.5, release.set).start()
        result = runner.invoke(args=["devices", "sync", "--wait", "10", "-q"])
        other.join()
        assert result.exit_code == 0, result.output
        assert "2 devices" in result.output
        assert db.session.scalar(select(func.count()).select_from(ServiceSyncLog)) == 1


def test_the_device_page_shows_uptime_and_its_outages(app, db, venue, client):
    from models.base import utcnow
    from models.devices import ActivityLog, Manufacturer

    tenant, admin, stage = venue
    maker = db.session.scalar(select(Manufacturer).where(Manufacturer.code == "shure"))
    device = Device(
        tenant_id=tenant.id,
        manufacturer_id=maker.id,
        api_device_id="RX-UP",
        name="Lectern",
        kind="receiver",
        location_id=stage.id,
        is_online=True,
        state={},
    )
    db.session.add(device)
    db.session.flush()
    now = utcnow()
    for hours_ago, status in ((24, "online"), (2, "offline"), (1, "online")):
        db.session.add(
            ActivityLog(
                tenant_id=tenant.id,
                device_id=device.id,
                activity_type="status",
                summary=f"Lectern is {status}",
                details={"new": {"status": status}},
                created_at=now - timedelta(hours=hours_ago),
            )
        )
    db.session.commit()
    login(client, admin)
    page = client.get(f"/devices/{device.id}").get_data(as_text=True)
    assert "95.83 %" in page and "1 outage" in page
    assert "1 h 00 min" in page


def test_a_scheduled_maintenance_window_silences_its_location_only_while_it_lasts(
    app, db, worker, venue, client
):
    from models.base import utcnow
    from models.devices import MaintenanceWindow, Manufacturer
    from tests.conftest import csrf_token_from

    tenant, admin, stage = venue
    maker = db.session.scalar(select(Manufacturer).where(Manufacturer.code == "shure"))
    elsewhere = Location(tenant_id=tenant.id, name="Foyer", alert_on_offline=True)
    db.session.add(elsewhere)
    db.session.flush()
    for api_id, name, location in (
        ("RX-S", "Stage rack", stage),
        ("RX-F", "Foyer rack", elsewhere),
    ):
        db.session.add(
            Device(
                tenant_id=tenant.id,
                manufacturer_id=maker.id,
                api_device_id=api_id,
                name=name,
                kind="receiver",
                location_id=location.id,
                is_online=True,
                state={},
            )
        )
    db.session.commit()
    login(client, admin)
    token = csrf_token_from(client.get("/devices/settings").data)
    now = utcnow()
    fmt = "%Y-%m-%dT%H:%M"
    refused = client.post(
        "/devices/maintenance-windows",
        data={
            "csrf_token": token,
            "starts_at": (now + timedelta(hours=1)).strftime(fmt),
            "ends_at": now.strftime(fmt),
        },
        follow_redirects=True,
    )
    assert "The end must be after the start." in refused.get_data(as_text=True)
    scheduled = client.post(
        "/devices/maintenance-windows",
        data={
            "csrf_token": token,
            "starts_at": (now - timedelta(minutes=5)).strftime(fmt),
            "ends_at": (now + timedelta(hours=1)).strftime(fmt),
            "location_id": str(stage.id),
            "note": "Line check",
        },
        follow_redirects=True,
    )
    assert "Line check" in scheduled.get_data(as_text=True)

    def offline(api_id: str) -> None:
        payload = {"service_code": "shure", "device_id": api_id, "missed_polls": 3}
        emit("device.offline", tenant_id=tenant.id, entity="device", payload=payload)
        db.session.commit()
        drain(app)
        db.session.expire_all()

    offline("RX-S")
    offline("RX-F")
    assert [n.title for n in received(db, admin, "device_offline")] == [
        "Device offline: Foyer rack"
    ]
    # Once the window is over, the stage alerts again.
    window = db.session.scalar(select(MaintenanceWindow))
    window.ends_at = utcnow() - timedelta(seconds=1)
    db.session.commit()
    payload = {"service_code": "shure", "device_id": "RX-S"}
    emit("device.online", tenant_id=tenant.id, entity="device", payload=payload)
    db.session.commit()
    drain(app)
    offline("RX-S")
    assert "Device offline: Stage rack" in [n.title for n in received(db, admin, "device_offline")]
