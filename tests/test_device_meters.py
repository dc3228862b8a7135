"""Pushed, not polled (issue 20, section 2): a receiver's pushed change reaches an open page
long before the next poll, meters go out in short batches per tenant (never as events),
one connection per receiver for every process, and a per-minute history charted."""

from __future__ import annotations

import queue
import re
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from models.device_meters import DeviceMeterMinute
from models.devices import ActivityLog, Device, Location, ServiceSyncLog
from models.events import OutboxEvent
from services import devices as device_service
from services.manufacturers.shure import ShureService
from services.manufacturers.shure import service as shure_service
from services.manufacturers.simulator import SimulatedReceiver, attach_endpoints
from tests.conftest import drain, login
from tests.helpers import handlers_only, shure_app

OVERRIDES = {
    "DEVICES_AUTO_PROVISION": True,
    "DEVICES_POLL_TIMEOUT": 1.0,
    "DEVICES_POLL_INTERVAL": 3600.0,  # no poll but the tests' own
    "DEVICES_SHURE_METER_RATE_MS": 100,
    "DEVICES_SHURE_SILENCE_TIMEOUT": 1.0,
    "DEVICES_SHURE_CONNECT_TIMEOUT": 1.0,
    "DEVICES_SHURE_BACKOFF_INITIAL": 0.1,
    "DEVICES_SHURE_BACKOFF_MAX": 0.3,
    "DEVICES_METER_FRAME_MS": 50,
    "DEVICES_PUSH_DEBOUNCE_MS": 100,
}


@pytest.fixture
def app(tmp_path):
    with shure_app(tmp_path, OVERRIDES) as application:
        yield application


@pytest.fixture
def worker(app):
    with handlers_only(app) as state:
        yield state


@pytest.fixture
def stage(app, db, factory, worker):
    """A tenant with a 4-channel receiver whose devices one poll has provisioned."""
    from services.manufacturers.endpoints import manufacturer_for

    tenant = factory.tenant("Venue")
    admin = factory.user(tenant, role="admin")
    manufacturer_for("shure")
    location = Location(tenant_id=tenant.id, name="Stage")
    db.session.add(location)
    db.session.commit()
    receiver = SimulatedReceiver("ULXD4Q", device_id="STAGE", seed=3)
    attach_endpoints(tenant.id, [receiver.address], location_id=location.id)
    db.session.commit()
    device_service.poll_service(tenant.id, "shure")
    drain(app)
    db.session.expire_all()
    yield tenant, admin, receiver
    receiver.stop()


def mic(db, tenant_id: int, channel: int) -> Device:
    return db.session.scalar(
        select(Device).where(
            Device.tenant_id == tenant_id, Device.api_device_id == f"STAGE/ch{channel}"
        )
    )


def frames_of(sub, seconds: float) -> list:
    out, until = [], time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        try:
            out.append(sub.frames.get(timeout=left))
        except queue.Empty:
            break
    return out


def count(db, model, *where) -> int:
    return db.session.scalar(select(func.count()).select_from(model).where(*where))


def test_a_pushed_change_reaches_an_open_page_long_before_the_poll(app, db, stage):
    from services.live import hub, tenant_topic

    tenant, _, receiver = stage
    polls = count(db, ServiceSyncLog, ServiceSyncLog.tenant_id == tenant.id)
    device_id = mic(db, tenant.id, 2).id
    with app.app_context():
        sub = hub().subscribe([tenant_topic(tenant.id, "devices")], watch=True)
    started = time.monotonic()
    receiver.set_battery(2, 1, 42)  # the receiver pushes REP 2 BATT_BARS / BATT_RUN_TIME
    card = None
    while card is None and time.monotonic() - started < 5:
        for frame in frames_of(sub, 0.2):
            if frame.key == f"device-{device_id}" and 'title="1 of 5 bars"' in (frame.html or ""):
                card = frame
    took = time.monotonic() - started
    assert card is not None and took < 2.0, took  # the poll interval is an hour
    db.session.expire_all()
    assert mic(db, tenant.id, 2).state["battery_bars"] == 1
    assert count(db, ServiceSyncLog, ServiceSyncLog.tenant_id == tenant.id) == polls  # no poll
    drain(app)
    assert count(db, OutboxEvent, OutboxEvent.topic == "device.battery_low") == 1

    receiver.tx_off(3)  # pushed too: the card says TX off without a poll
    db.session.expire_all()
    deadline = time.monotonic() + 3
    while mic(db, tenant.id, 3).state.get("tx_on") is not False and time.monotonic() < deadline:
        time.sleep(0.05)
        db.session.expire_all()
    assert mic(db, tenant.id, 3).state["tx_on"] is False


def test_meters_go_out_batched_per_tenant_and_never_as_events(app, db, factory, stage):
    from services.live import hub, tenant_topic

    tenant, _, receiver = stage
    other = factory.tenant("Elsewhere")
    time.sleep(0.3)  # the first samples
    drain(app)
    updates = count(db, OutboxEvent, OutboxEvent.topic == "device.updated")
    rows = count(db, ActivityLog, ActivityLog.tenant_id == tenant.id)
    ids = [mic(db, tenant.id, n).id for n in (1, 2, 3, 4)]
    with app.app_context():
        mine = hub().subscribe([tenant_topic(tenant.id, "meters")])
        theirs = hub().subscribe([tenant_topic(other.id, "meters")])
    frames = frames_of(mine, 1.0)
    # 4 channels at 10 samples a second: 40 samples, in frames of at most one per 50 ms.
    assert 5 <= len(frames) <= 25, len(frames)
    # One receiver: its frames, each with all its channels, keyed by it.
    assert {f.key for f in frames} == {f"meters-{receiver.address[0]}-{receiver.address[1]}"}
    last = frames[-1].html
    for device_id in ids:
        assert f'id="rf-meter-{device_id}" hx-swap-oob="true"' in last
        assert f'id="audio-meter-{device_id}"' in last
        # The diversity antenna follows every fade: live in the frame, never an update.
        assert f'id="antenna-{device_id}" hx-swap-oob="true"' in last
    # Every frame carries every channel (a page that skips to the newest misses none), each
    # at its level of the moment: the levels move from frame to frame.
    for frame in frames:
        for device_id in ids:
            assert f'id="audio-meter-{device_id}"' in frame.html
    levels = [tuple(re.findall(r'title="(-?[\d.]+) dB', frame.html)) for frame in frames]
    assert len(set(levels)) >= 2, levels
    assert frames_of(theirs, 0.1) == []  # another tenant's topic hears nothing of it
    drain(app)
    assert count(db, OutboxEvent, OutboxEvent.topic == "device.updated") == updates
    assert count(db, ActivityLog, ActivityLog.tenant_id == tenant.id) == rows

    # Tenant isolation of the topic: a page of the other tenant is never granted it.
    from services.live import sign_topics, verify_topics

    outsider = factory.user(other, role="admin")
    with app.test_request_context():
        token = sign_topics(outsider, ["meters"])
        assert verify_topics(token, outsider) == [tenant_topic(other.id, "meters")]
        from itsdangerous import URLSafeTimedSerializer

        forged = URLSafeTimedSerializer(app.config["SECRET_KEY"], salt="live-topics").dumps(
            {"u": outsider.id, "t": [tenant_topic(tenant.id, "meters")]}
        )
        assert verify_topics(forged, outsider) is None

    # The minute's samples become one history row per channel, and the device page charts it.
    with app.app_context():
        assert shure_service.pump.write_history() >= 4  # a minute (or two) per channel
    written = db.session.scalars(select(DeviceMeterMinute)).all()
    assert {row.device_id for row in written} == set(ids)
    assert sum(row.samples for row in written) >= 40
    assert all(row.rf_min <= row.rf_max and row.battery_min == 5 for row in written), [
        (r.minute, r.samples, r.rf_min, r.rf_max, r.battery_min) for r in written
    ]


def test_the_device_page_charts_history_and_old_minutes_are_pruned(app, db, client, stage):
    from models.base import utcnow
    from services.meters import minute_of, prune_history

    tenant, admin, _ = stage
    device = mic(db, tenant.id, 1)
    now = minute_of(utcnow())
    for minutes_ago, rf_low in ((50, -62.0), (40, -91.0), (30, -60.0)):  # a fade at -40 min
        db.session.add(
            DeviceMeterMinute(
                tenant_id=tenant.id,
                device_id=device.id,
                minute=now - timedelta(minutes=minutes_ago),
                samples=600,
                rf_min=rf_low,
                rf_max=-55.0,
                audio_min=-52.0,
                audio_max=-12.0,
                battery_min=4,
                battery_max=4,
            )
        )
    db.session.add(
        DeviceMeterMinute(
            tenant_id=tenant.id, device_id=device.id, minute=now - timedelta(days=30), samples=1
        )
    )
    db.session.commit()
    login(client, admin)
    page = client.get(f"/devices/{device.id}").get_data(as_text=True)
    assert "Meters, last 12 hours" in page
    assert "RF low, % of -100…-20 dBm" in page and "Battery bars" in page
    assert ": 11.2</title>" in page  # the fade: -91 dBm is 11.2 % of the RF range
    with app.app_context():
        assert prune_history() == 1  # the 30-day-old minute (14 days are kept)
    assert count(db, DeviceMeterMinute, DeviceMeterMinute.device_id == device.id) == 3


def test_the_dashboard_groups_channels_under_their_receiver(app, db, client, stage):
    tenant, admin, _ = stage
    login(client, admin)
    page = client.get("/devices/").get_data(as_text=True)
    receiver = db.session.scalar(
        select(Device).where(Device.tenant_id == tenant.id, Device.kind == "receiver")
    )
    group = page.split(f'id="receiver-group-{receiver.id}"', 1)[1].split("</section>", 1)[0]
    cards = [c.split('"', 1)[0] for c in group.split('id="device-card-')[1:]]
    channels = [mic(db, tenant.id, n).id for n in (1, 2, 3, 4)]
    assert cards == [str(receiver.id), *map(str, channels)]


def test_one_connection_per_receiver_across_processes_and_takeover(app, redis_url):
    from services import netpolicy
    from services.kv import RedisKV
    from services.meters import Leases
    from tests.conftest import redis_prefix

    prefix = redis_prefix()
    settings = dict(lease_seconds=1.0, meter_rate_ms=100, silence_timeout=1.0, connect_timeout=1.0)
    processes = []
    for _ in range(2):  # two worker processes: their own services, one Redis
        service = ShureService()
        service.configure(**settings)
        service.leases = Leases(RedisKV(redis_url, prefix))
        service.pump.attach(app)
        service.address_problem = netpolicy.device_checker(app.config)  # loopback allowed
        processes.append(service)
    first, second = processes

    class Endpoint:
        def __init__(self, host, port):
            self.host, self.port, self.location_id, self.tenant_id = host, port, None, None

    with SimulatedReceiver("ULXD4D", device_id="RACK", seed=9) as receiver:
        endpoint = Endpoint(*receiver.address)
        try:
            assert [r.online for r in first.fetch([endpoint], 1.0)] == [True, True, True]
            # The other process reports what the owner shares, without connecting.
            reports = second.fetch([endpoint], 2.0)
            assert [r.api_device_id for r in reports if r.online] == [
                "RACK",
                "RACK/ch1",
                "RACK/ch2",
            ]
            assert receiver.client_count == 1 and second.status() == []

            first.shutdown(release=False)  # dies: its lease is no longer renewed
            time.sleep(1.1)
            reports = second.fetch([endpoint], 1.0)
            assert reports[0].online  # it took the receiver over
            assert len(second.status()) == 1 and receiver.client_count == 1
        finally:
            for service in processes:
                service.shutdown()
            keys = processes[0].leases.redis.keys(prefix + "*")
            if keys:
                processes[0].leases.redis.delete(*keys)


# ---------------------------------------------------------------- a demo that looks like a show


def test_the_demo_fleet_keeps_transmitters_on_and_drains_batteries_slowly():
    from services.manufacturers.simulator import FULL_MINUTES, Fleet

    with Fleet(4, seed=2202, models=["ULXD4D", "ULXD4D", "QLXD4", "AD4D"]) as fleet:
        channels = [c for r in fleet.receivers for c in r.channels.values()]
        off = 0
        for _ in range(720):  # an hour of the demo's 5-second ticks
            fleet.step()
            off += sum(not c.tx_on for c in channels)
        assert off / (720 * len(channels)) < 0.05  # not "half of them off at any time"
        drops = [what for _, _, what in fleet.history if what == "dropped"]
        assert len(drops) <= 1
        drained = [FULL_MINUTES - c.battery_minutes for c in channels if c.tx_on]
        assert all(20 <= minutes <= 120 for minutes in drained), drained  # ~an hour's worth


def test_simulated_meters_sound_like_speech_and_rf_fades():
    import random

    from services.manufacturers.simulator import SimChannel

    channel = SimChannel(1, "Lead Vocal", "ULXD2", 500_000, rf_dbm=-60, audio_dbfs=-25)
    rng = random.Random(7)
    samples = [channel.levels(i * 0.2, rng) for i in range(5 * 60 * 5)]  # 5 min at 5/s
    rf = [s[0] for s in samples]
    audio = [s[1] for s in samples]
    assert max(audio) > -25 and min(audio) < -45  # phrases and pauses
    assert sum(a < -45 for a in audio) > len(audio) * 0.1
    assert min(rf) <= -75 and sorted(rf)[len(rf) // 2] > -65  # fades, not a weak link


def test_discovered_online_and_offline_are_in_the_process_log_too(app, db, factory, caplog):
    import logging

    from services.manufacturers.endpoints import manufacturer_for

    tenant = factory.tenant("Logged")
    manufacturer_for("shure")
    db.session.commit()
    caplog.set_level(logging.INFO, logger="services.devices")
    app.config["DEVICES_OFFLINE_AFTER_MISSES"] = 1
    with SimulatedReceiver("QLXD4", device_id="LOG-RX", seed=1) as receiver:
        attach_endpoints(tenant.id, [receiver.address])
        db.session.commit()
        device_service.poll_service(tenant.id, "shure")
        receiver.drop()
        for _ in range(app.config["DEVICES_OFFLINE_AFTER_MISSES"]):
            device_service.poll_service(tenant.id, "shure")
        receiver.restore()
        device_service.poll_service(tenant.id, "shure")
    text = caplog.text
    assert "Discovered receiver LOG-RX" in text
    assert "LOG-RX is offline" in text and "LOG-RX is online" in text


def test_quality_and_antenna_that_follow_rf_fades_are_no_update(app, db, stage):
    """Axient's channel quality and the antenna in use change with every fade of a moving
    performer: as device.updated events they filled the activity log with "quality 5 → 3"
    rows several times a minute. They are meter readings: the card shows them live."""
    from services.devices import DeviceReport, _diff

    tenant, _, _ = stage
    device = mic(db, tenant.id, 1)
    device.state = {**(device.state or {}), "quality": 5, "antenna": "AX", "battery_bars": 4}
    faded = DeviceReport(
        api_device_id=device.api_device_id,
        kind=device.kind,
        name=device.name,
        state={**device.state, "quality": 2, "antenna": "BX"},
    )
    assert _diff(device, faded) == ({}, {})
    drained = DeviceReport(
        api_device_id=device.api_device_id,
        kind=device.kind,
        name=device.name,
        state={**device.state, "quality": 2, "battery_bars": 3},
    )
    assert _diff(device, drained) == ({"battery_bars": 4}, {"battery_bars": 3})

    from flask import render_template

    with app.test_request_context():
        html = render_template(
            "devices/_meters_push.html",
            meters=[{"id": device.id, "rf": -60, "audio": -20, "quality": 3, "antenna": "BX"}],
        )
    assert f'<span id="quality-{device.id}" hx-swap-oob="true">Quality 3/5</span>' in html
    assert f'<span id="antenna-{device.id}" hx-swap-oob="true">Antenna BX</span>' in html


def test_pushes_of_several_receivers_are_applied_in_one_commit(app, db, stage):
    """A burst of pushes across a fleet is one transaction and one batch of events for the
    handlers, not one per receiver; each device still gets its own device.updated."""
    from dataclasses import replace

    from sqlalchemy import event as sa_event

    from extensions import db as ext_db

    tenant, _, receiver = stage
    location_id = mic(db, tenant.id, 1).location_id
    side = SimulatedReceiver("ULXD4Q", device_id="SIDE", seed=4)
    try:
        attach_endpoints(tenant.id, [side.address], location_id=location_id)
        db.session.commit()
        device_service.poll_service(tenant.id, "shure")
        drain(app)
        snaps = {
            address: conn.snapshot(True, close=False)
            for address, conn in shure_service._owned().items()
        }
        reports = []
        for address in (receiver.address, side.address):
            for report in shure_service.reports_for(snaps[address], location_id):
                if report.channel == 1:  # its battery changed since the poll
                    report = replace(report, state={**report.state, "battery_bars": 1})
                reports.append(report)
        updates = count(db, OutboxEvent, OutboxEvent.topic == "device.updated")
        commits = []

        def committed(session) -> None:
            commits.append(session)

        session = ext_db.session()  # this thread's, the one the function commits
        sa_event.listen(session, "after_commit", committed)
        try:
            # None: the pump is applying the receivers' own pushes this moment; try again.
            applied = None
            for _ in range(50):
                applied = device_service.apply_pushed_reports(tenant.id, "shure", reports)
                if applied is not None:
                    break
                commits.clear()
                time.sleep(0.05)
            assert applied == 2
        finally:
            sa_event.remove(session, "after_commit", committed)
        assert len(commits) == 1
        db.session.expire_all()
        assert count(db, OutboxEvent, OutboxEvent.topic == "device.updated") == updates + 2
        side_ch1 = db.session.scalar(
            select(Device).where(Device.tenant_id == tenant.id, Device.api_device_id == "SIDE/ch1")
        )
        assert side_ch1.state["battery_bars"] == 1
        assert mic(db, tenant.id, 1).state["battery_bars"] == 1
    finally:
        side.stop()
