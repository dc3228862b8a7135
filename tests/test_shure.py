"""The Shure service over real TCP against simulated receivers: protocol, discovery, offline
after missed polls with alerts and recovery, change logging, hung receivers, CLI."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from models.devices import ActivityLog, Device, DeviceEndpoint, Location
from models.events import OutboxEvent
from models.notifications import Notification
from services import devices as device_service
from services.manufacturers import shure_protocol as proto
from services.manufacturers.shure import (
    LevelBucket,
    backoff_delay,
    round_minutes,
)
from services.manufacturers.shure import service as shure_service
from services.manufacturers.simulator import Fleet, FleetChances, SimulatedReceiver
from tests.conftest import drain
from tests.helpers import handlers_only, shure_app

# Short timeouts keep the file fast; the scheduler's periodic poll is pushed out of the way so
# only the polls these tests make happen.
OVERRIDES = {
    "DEVICES_AUTO_PROVISION": True,
    "DEVICES_POLL_TIMEOUT": 1.0,
    "DEVICES_OFFLINE_AFTER_MISSES": 2,
    "DEVICES_POLL_INTERVAL": 3600.0,
    "DEVICES_SHURE_METER_RATE_MS": 200,
    "DEVICES_SHURE_SILENCE_TIMEOUT": 1.0,
    "DEVICES_SHURE_CONNECT_TIMEOUT": 1.0,
    "DEVICES_SHURE_BACKOFF_INITIAL": 0.1,
    "DEVICES_SHURE_BACKOFF_MAX": 0.3,
}


@pytest.fixture
def app(tmp_path):
    from blueprints.devices.cli import devices_cli

    with shure_app(tmp_path, OVERRIDES) as application:
        if "devices" not in application.cli.commands:
            application.cli.add_command(devices_cli)
        yield application


@pytest.fixture
def worker(app):
    """The embedded worker, without the scheduler's own polls racing the tests' polls."""
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


@pytest.fixture
def fleet(app, db, venue):
    from services.manufacturers.simulator import attach_endpoints

    tenant, _, stage = venue
    running = Fleet(2, seed=5, models=["ULXD4D", "QLXD4"])
    attach_endpoints(tenant.id, running.endpoints, location_id=stage.id)
    db.session.commit()
    yield running
    running.stop()


def poll(app, db, tenant_id):
    result = device_service.poll_service(tenant_id, "shure")
    drain(app)
    db.session.expire_all()
    return result


def devices_of(db, tenant_id) -> dict[str, Device]:
    rows = db.session.scalars(select(Device).where(Device.tenant_id == tenant_id))
    return {d.api_device_id: d for d in rows}


def count_topic(db, topic: str) -> int:
    return db.session.scalar(select(func.count()).where(OutboxEvent.topic == topic))


# ---------------------------------------------------------------- protocol


def test_format_commands():
    assert proto.format_get("CHAN_NAME", 1) == b"< GET 1 CHAN_NAME >"
    assert proto.format_get("ALL", 0) == b"< GET 0 ALL >"
    assert proto.format_get("MODEL") == b"< GET MODEL >"
    assert proto.format_meter_rate(1000, 1) == b"< SET 1 METER_RATE 01000 >"
    assert proto.format_sample(1, "XB", 45, 32) == b"< SAMPLE 1 ALL XB 045 032 >"
    name = proto.braced("Lead {Vocal}")
    assert name == "{Lead Vocal" + " " * 21 + "}" and len(name) == proto.NAME_WIDTH + 2
    with pytest.raises(ValueError):
        proto.format_frame("REP", "bad key")


def test_parse_replies_samples_and_errors():
    frames = proto.parse(
        "< REP 1 CHAN_NAME {Lead Vocal                     } >"
        "< REP 1 BATT_BARS 004 >< REP 2 BATT_RUN_TIME 00325 >< REP 1 FREQUENCY 0578000 >"
        "< REP 1 TX_TYPE ULXD2 >< REP 2 TX_TYPE UNKN >< REP MODEL {ULXD4D} >"
        "< REP FW_VER {2.5.4} >< REP DEVICE_ID {Stage L   } >"
        "< SAMPLE 1 ALL XB 045 032 >< REP ERR >"
    )
    assert [(f.kind, f.channel, f.key, f.value) for f in frames] == [
        ("REP", 1, "CHAN_NAME", "Lead Vocal"),
        ("REP", 1, "BATT_BARS", "004"),
        ("REP", 2, "BATT_RUN_TIME", "00325"),
        ("REP", 1, "FREQUENCY", "0578000"),
        ("REP", 1, "TX_TYPE", "ULXD2"),
        ("REP", 2, "TX_TYPE", "UNKN"),
        ("REP", None, "MODEL", "ULXD4D"),
        ("REP", None, "FW_VER", "2.5.4"),
        ("REP", None, "DEVICE_ID", "Stage L"),
        ("SAMPLE", 1, "ALL", "XB"),
        ("ERR", None, "", None),
    ]
    assert frames[-2].values == ("XB", "045", "032")
    assert proto.battery_bars("004") == 4 and proto.battery_bars("255") is None
    assert proto.battery_minutes("00325") == 325 and proto.battery_minutes("65535") is None
    assert proto.frequency_mhz("0578125") == 578.125 and proto.frequency_mhz("0000000") is None
    assert proto.transmitter_present("ULXD2") and not proto.transmitter_present("UNKN")
    assert proto.rf_dbm("045") == -83 and proto.audio_dbfs("032") == -18


def test_parser_survives_split_frames_and_garbage():
    stream = (
        b"\x00\xffnoise< REP 1 CHAN_NAME {Guitar > amp  } >junk>"
        b"< REP 1 BATT_B< REP 2 BATT_BARS 003 >\r\n"  # a frame cut off by the next one
        b"< REP 1 CHAN_NAME {never closed\r\n"  # a broken brace ends at the line end
        b"< HELLO there >< REP >"  # not frames
        b"< REP 2 CHAN_NAME {" + b"x" * 200 + b"} >"  # an overlong string is noise
        b"< SAMPLE 2 ALL AX 100 040 >"
    )
    expected = [("CHAN_NAME", "Guitar > amp"), ("BATT_BARS", "003"), ("ALL", "AX")]

    whole = proto.FrameParser().feed(stream)
    assert [(f.key, f.value) for f in whole] == expected

    # Byte by byte, and in random chunks, the result is the same.
    parser = proto.FrameParser()
    frames = [f for i in range(len(stream)) for f in parser.feed(stream[i : i + 1])]
    assert [(f.key, f.value) for f in frames] == expected
    rng = random.Random(3)
    parser, frames, pos = proto.FrameParser(), [], 0
    while pos < len(stream):
        step = rng.randint(1, 17)
        frames += parser.feed(stream[pos : pos + step])
        pos += step
    assert [(f.key, f.value) for f in frames] == expected
    assert parser.garbage_bytes > 0
    # Endless noise without a frame does not grow the buffer.
    parser = proto.FrameParser()
    for _ in range(100):
        assert parser.feed(b"<" + b"z" * 100) == []
    assert len(parser._buffer) <= proto.MAX_FRAME


class _WalkingParser(proto.FrameParser):
    """The parser with only the byte-by-byte scan: what the regex shortcut must agree with."""

    _scan = staticmethod(proto.FrameParser._walk)


def test_the_parsers_shortcuts_read_hostile_streams_as_the_full_scan_does():
    """Random streams thick with the bytes that matter (<, >, braces, line ends, Unicode
    spaces, long runs) give the same frames and the same garbage count with the shortcuts
    (a regex search for the frame's end, str.split for a frame without braces) as without."""
    # fmt: off
    words = [
        b"<", b"<", b">", b">", b"{", b"}", b"REP", b"REP", b"SAMPLE", b"GET", b"SET", b"ERR",
        b"1", b"07", b"123", b"ALL", b"AX", b"CHAN_NAME", b"BATT_BARS", b"004", b"\x00", b"\xff",
        b"x" * 70, b"y" * 600, b"< REP 1 BATT_BARS 004 >", b"< SAMPLE 2 ALL XB 085 092 >",
    ]
    gaps = [b" ", b" ", b" ", b"", b"\t", b"\r", b"\n", b"\xc2\xa0", b"\xe2\x80\x83", b"\x1c"]
    # fmt: on
    rng = random.Random(23)
    for _ in range(1500):
        stream = b"".join(rng.choice(words) + rng.choice(gaps) for _ in range(rng.randint(1, 40)))
        results = []
        for parser in (proto.FrameParser(), _WalkingParser()):
            frames, pos = [], 0
            while pos < len(stream):
                step = rng.randint(1, 40)
                frames += parser.feed(stream[pos : pos + step])
                pos += step
            results.append((frames, parser.garbage_bytes, bytes(parser._buffer)))
        assert results[0] == results[1], stream
        for body in stream.decode("utf-8", "replace").split("<"):
            assert proto._tokens(body) == proto._braced_tokens(body), body
        for frame in results[0][0]:  # whatever was read, str.split read it as _TOKEN does
            assert frame.kind in {*proto.KINDS, "ERR"}
    for body in ("REP 1 BATT_BARS 004", " SAMPLE\u00a02 ALL\u2003AX 1 2 ", "REP\x1c1 X", "a}b c"):
        assert proto._tokens(body) == proto._braced_tokens(body), body


def test_levels_are_bucketed_with_hysteresis_and_backoff_is_capped_and_jittered():
    rf = LevelBucket()
    assert rf.add(-65) == -70
    for value in (-68, -62, -61, -69, -63, -60, -66):  # jitter within the step
        assert rf.add(value) == -70
    for _ in range(10):  # a real change
        level = rf.add(-85)
    assert level == -90
    assert round_minutes(327) == 325 and round_minutes(None) is None

    rng = random.Random(1)
    delays = [backoff_delay(n, 0.5, 8.0, rng) for n in range(1, 12)]
    assert 0.25 <= delays[0] <= 0.5 and 0.5 <= delays[1] <= 1.0
    assert all(4.0 <= d <= 8.0 for d in delays[5:])  # capped, jittered below the cap
    assert len(set(delays[5:])) > 1


# ---------------------------------------------------------------- the simulator


def read_until(sock, predicate, timeout: float = 2.0) -> list[proto.Frame]:
    """Frames from a raw socket until one matches `predicate` (or the timeout)."""
    parser, frames = proto.FrameParser(), []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        if not data:
            break
        frames += parser.feed(data)
        if any(predicate(f) for f in frames):
            break
    return frames


def test_simulator_speaks_the_protocol_to_several_clients():
    import socket

    with SimulatedReceiver("QLXD4", device_id="FOH", channel_names=["Lectern"]) as rx:
        with socket.create_connection(rx.address) as a, socket.create_connection(rx.address) as b:
            a.sendall(b"< GET 0 ALL >")
            frames = read_until(a, lambda f: f.key == "METER_RATE")
            got = {f.key: f.value for f in frames}
            # QLX-D has no MODEL property (issue 20): GET ALL has none, GET MODEL is REP ERR.
            assert "MODEL" not in got and got["DEVICE_ID"] == "FOH"
            assert got["CHAN_NAME"] == "Lectern" and got["TX_TYPE"] == "QLXD2"
            b.sendall(b"< SET 1 METER_RATE 00100 >")
            samples = read_until(b, lambda f: f.kind == "SAMPLE")
            assert samples[0].key == "METER_RATE" and samples[-1].kind == "SAMPLE"
            assert len(samples[-1].values) == 3

            rx.rename(1, "Pulpit")  # pushed to every client, unasked
            for sock in (a, b):
                frames = read_until(sock, lambda f: f.key == "CHAN_NAME")
                assert ("CHAN_NAME", "Pulpit") in [(f.key, f.value) for f in frames]
            a.sendall(b"< GET 7 CHAN_NAME >< GET 1 NOPE >")
            assert [f.kind for f in read_until(a, lambda f: False, 0.3)] == ["ERR", "ERR"]

            rx.mute()
            a.sendall(b"< GET DEVICE_ID >")
            assert read_until(a, lambda f: True, 0.3) == []
            rx.unmute()

        port = rx.port
        rx.drop()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(rx.address, timeout=1).close()
        rx.restore()
        assert rx.port == port
        with socket.create_connection(rx.address, timeout=1) as c:
            c.sendall(b"< GET DEVICE_ID >")
            assert read_until(c, lambda f: True)[0].value == "FOH"


# ---------------------------------------------------------------- fetch over TCP


def test_fetch_reports_receivers_and_transmitters(app):
    with app.app_context(), SimulatedReceiver("AD4Q", device_id="BAND-RACK", seed=1) as receiver:
        receiver.rename(2, "Kick Mic")
        receiver.set_battery(2, 3, 187)
        receiver.tx_off(4)
        endpoint = DeviceEndpoint(host=receiver.host, port=receiver.port, location_id=None)
        reports = shure_service.fetch([endpoint], timeout=1.0)
        by_id = {r.api_device_id: r for r in reports}
        assert set(by_id) == {"BAND-RACK", "BAND-RACK/ch1", "BAND-RACK/ch2", "BAND-RACK/ch3"}
        rx = by_id["BAND-RACK"]
        assert (rx.kind, rx.model, rx.firmware, rx.online) == ("receiver", "AD4Q", "1.2.12", True)
        assert (rx.ip_address, rx.port) == receiver.address
        tx = by_id["BAND-RACK/ch2"]
        assert tx.kind == "transmitter" and tx.name == "Kick Mic" and tx.model == "AD1"
        assert tx.state["battery_bars"] == 3 and tx.state["battery_minutes"] == 185
        assert tx.state["tx_on"] is True
        assert tx.state["frequency_mhz"] == receiver.channel(2).frequency_khz / 1000
        time.sleep(0.5)  # a few meter samples
        tx = {r.api_device_id: r for r in shure_service.fetch([endpoint], 1.0)}["BAND-RACK/ch2"]
        # Every reading an Axient channel has (issue 20: its own names and SAMPLE layout).
        assert set(tx.state) == set(device_service.STATE_FIELDS) - {"family"} | {
            "rf_level",
            "audio_level",
            "quality",
            "antenna",
        }
        assert tx.state["rf_level"] % 10 == 0 and tx.state["audio_level"] % 10 == 0
        shure_service.shutdown()


def test_hung_receiver_never_delays_the_others(app):
    app.config["DEVICES_SHURE_SILENCE_TIMEOUT"] = 0.6
    with app.app_context(), Fleet(3, seed=9) as fleet:
        endpoints = [DeviceEndpoint(host=h, port=p) for h, p in fleet.endpoints]
        hung, *others = fleet.receivers
        assert all(r.online for r in shure_service.fetch(endpoints, 1.0) if r.kind == "receiver")
        hung.mute()
        started = time.monotonic()
        reports = shure_service.fetch(endpoints, timeout=0.8)
        took = time.monotonic() - started
        assert took < 1.1, took
        online = {r.api_device_id: r.online for r in reports if r.kind == "receiver"}
        assert online == {hung.device_id: False, **{r.device_id: True for r in others}}
        # Not the hung receiver's transmitters either.
        assert not [r for r in reports if r.api_device_id.startswith(hung.device_id + "/")]

        # The silence watchdog reconnects; once it answers again it is back.
        time.sleep(1.0)
        status = {s.port: s for s in shure_service.status()}[hung.port]
        assert status.connects >= 2 and "silent" in status.last_error
        hung.unmute()
        reports = shure_service.fetch(endpoints, timeout=1.0)
        assert all(r.online for r in reports if r.kind == "receiver")


# ---------------------------------------------------------------- through poll_service


def test_discovery_warns_without_auto_provision_then_provisions(app, db, worker, venue, fleet):
    tenant, _, stage = venue
    app.config["DEVICES_AUTO_PROVISION"] = False
    result = poll(app, db, tenant.id)
    assert (result.status, result.device_count, result.online_count) == ("success", 5, 5)
    assert devices_of(db, tenant.id) == {}
    warnings = db.session.scalars(
        select(ActivityLog.summary).where(
            ActivityLog.tenant_id == tenant.id, ActivityLog.status == "warning"
        )
    ).all()
    assert len(warnings) == 5 and all("auto-provisioning is off" in w for w in warnings)

    app.config["DEVICES_AUTO_PROVISION"] = True
    poll(app, db, tenant.id)
    devices = devices_of(db, tenant.id)
    ulxd, qlxd = fleet.receivers
    assert set(devices) == {
        ulxd.device_id,
        f"{ulxd.device_id}/ch1",
        f"{ulxd.device_id}/ch2",
        qlxd.device_id,
        f"{qlxd.device_id}/ch1",
    }
    receiver = devices[ulxd.device_id]
    assert (receiver.kind, receiver.model, receiver.port) == ("receiver", "ULXD4D", ulxd.port)
    mic = devices[f"{qlxd.device_id}/ch1"]
    assert mic.kind == "transmitter" and mic.name == qlxd.channel(1).name
    assert mic.model == "QLXD2" and mic.state["battery_bars"] == 5
    assert all(d.is_online and d.location_id == stage.id for d in devices.values())


def test_dropped_receiver_goes_offline_after_missed_polls_alerts_and_recovers(
    app, db, worker, venue, fleet
):
    tenant, admin, _ = venue
    # Recovery announced at once (confirmation and flaps: tests/test_device_alerts.py).
    app.config["DEVICES_RECOVERY_CONFIRM_SECONDS"] = 0
    poll(app, db, tenant.id)
    down = fleet.receivers[0]
    down.drop()

    first = poll(app, db, tenant.id)
    assert (first.status, first.error_count) == ("partial", 1)
    receiver = devices_of(db, tenant.id)[down.device_id]
    assert receiver.is_online and receiver.missed_polls == 1  # one miss is not an outage
    assert count_topic(db, "device.offline") == 0

    poll(app, db, tenant.id)
    devices = devices_of(db, tenant.id)
    assert not devices[down.device_id].is_online
    assert not devices[f"{down.device_id}/ch1"].is_online  # its transmitters with it
    assert devices[fleet.receivers[1].device_id].is_online
    alerts = db.session.scalars(
        select(Notification).where(
            Notification.recipient_id == admin.id, Notification.type == "device_offline"
        )
    ).all()
    assert any(down.device_id in n.title for n in alerts)

    down.restore()
    back = poll(app, db, tenant.id)
    assert (back.status, back.online_count, back.device_count) == ("success", 5, 5)
    assert devices_of(db, tenant.id)[down.device_id].is_online
    recovered = db.session.scalars(
        select(Notification.title).where(
            Notification.recipient_id == admin.id, Notification.type == "device_recovered"
        )
    ).all()
    assert any(down.device_id in title for title in recovered)


def test_rename_logs_old_and_new_values(app, db, worker, venue, fleet):
    tenant, _, _ = venue
    poll(app, db, tenant.id)
    receiver = fleet.receivers[0]
    old_name = receiver.channel(1).name
    receiver.rename(1, "Pastor Mic")
    poll(app, db, tenant.id)
    mic = devices_of(db, tenant.id)[f"{receiver.device_id}/ch1"]
    assert mic.name == "Pastor Mic" and mic.state["channel_name"] == "Pastor Mic"
    # The rename is pushed too: applied by the poll or just before it, and logged once.
    (log,) = [
        row
        for row in db.session.scalars(
            select(ActivityLog).where(
                ActivityLog.device_id == mic.id, ActivityLog.activity_type == "update"
            )
        )
        if "name" in row.details["new"]
    ]
    assert log.details["old"]["name"] == old_name and log.details["new"]["name"] == "Pastor Mic"
    assert log.details["old"]["channel_name"] == old_name
    assert log.details["new"]["channel_name"] == "Pastor Mic"


def test_meter_jitter_creates_no_updates_but_battery_does(app, db, worker, venue, fleet):
    tenant, _, _ = venue
    poll(app, db, tenant.id)
    time.sleep(0.5)
    poll(app, db, tenant.id)  # the first levels arrive: a real change
    before = count_topic(db, "device.updated")
    time.sleep(1.0)  # five more samples per channel, each jittering by a few dB
    poll(app, db, tenant.id)
    assert count_topic(db, "device.updated") == before

    receiver = fleet.receivers[1]
    receiver.set_battery(1, 1, 42)
    poll(app, db, tenant.id)
    assert count_topic(db, "device.updated") == before + 1
    assert count_topic(db, "device.battery_low") == 1
    mic = devices_of(db, tenant.id)[f"{receiver.device_id}/ch1"]
    assert (mic.state["battery_bars"], mic.state["battery_minutes"]) == (1, 40)


def test_a_poll_writes_a_changed_devices_row_once_and_marks_every_answer_seen(
    app, db, worker, venue, fleet
):
    """A changed device's row takes its new state and its "seen" mark in one UPDATE (two
    would be two row versions); the devices that answered unchanged are marked seen too."""
    from sqlalchemy import event, update

    from extensions import db as ext_db

    tenant, _, _ = venue
    poll(app, db, tenant.id)
    time.sleep(0.5)
    poll(app, db, tenant.id)  # the first levels: from here on only the battery changes
    long_ago = datetime(2026, 1, 1, tzinfo=UTC)
    db.session.execute(
        update(Device)
        .where(Device.tenant_id == tenant.id)
        .values(missed_polls=1, last_seen=long_ago)
    )
    db.session.commit()
    receiver = fleet.receivers[1]
    receiver.set_battery(1, 3, 140)
    mic_id = devices_of(db, tenant.id)[f"{receiver.device_id}/ch1"].id

    writes: dict[int, list[int]] = {}  # by transaction: the device rows its UPDATEs wrote

    def count(conn, cursor, statement, parameters, context, executemany):
        if not statement.startswith("UPDATE devices"):
            return
        where = statement.index(" WHERE ")
        for params in parameters if executemany else [parameters]:
            if isinstance(params, dict):
                ids = [v for k, v in params.items() if k == "device_pk" or k.startswith("id_")]
            else:  # positional: the WHERE clause's are the ids
                ids = list(params[statement[:where].count("?") :])
            writes.setdefault(id(conn.get_transaction()), []).extend(ids)

    event.listen(ext_db.engine, "before_cursor_execute", count)
    try:
        poll(app, db, tenant.id)
    finally:
        event.remove(ext_db.engine, "before_cursor_execute", count)
    devices = devices_of(db, tenant.id)
    mic = devices[f"{receiver.device_id}/ch1"]
    assert (mic.state["battery_bars"], mic.state["battery_minutes"]) == (3, 140)
    # Its new state and its seen mark together: no transaction writes its row twice (the
    # meter pump may apply the pushed change first, in a transaction of its own).
    assert any(mic_id in ids for ids in writes.values())
    assert all(ids.count(mic_id) <= 1 for ids in writes.values()), writes
    assert all(d.missed_polls == 0 for d in devices.values() if d.is_online)
    seen = [d.last_seen for d in devices.values() if d.is_online]
    assert seen and all(at is not None and at.replace(tzinfo=UTC) > long_ago for at in seen)


# ---------------------------------------------------------------- fleet


def test_fleet_life_is_seeded():
    chances = FleetChances(drain=0.5, tx_toggle=0.2, drop=0.2, down_ticks=(1, 2))
    histories = []
    for _ in range(2):
        with Fleet(3, seed=42, chances=chances) as fleet:
            for _ in range(15):
                fleet.step()
            histories.append(
                (
                    [r.device_id for r in fleet.receivers],
                    fleet.history,
                    [c.battery_minutes for r in fleet.receivers for c in r.channels.values()],
                )
            )
    assert histories[0] == histories[1]
    kinds = {what.split()[-1] for _, _, what in histories[0][1]}
    assert {"dropped", "restored", "off"} <= kinds


def test_demo_fleet_registers_endpoints_for_the_demo_tenant(app, db):
    from services.demo import DEMO_TENANT
    from services.manufacturers.simulator import start_demo_fleet

    assert start_demo_fleet(app, 2) is None  # no demo tenant yet
    from models.accounts import Tenant

    demo = Tenant(name=DEMO_TENANT)
    db.session.add(demo)
    db.session.flush()
    db.session.add(Location(tenant_id=demo.id, name="Main stage"))
    db.session.commit()
    fleet = start_demo_fleet(app, 2)
    try:
        db.session.expire_all()
        rows = db.session.scalars(
            select(DeviceEndpoint).where(DeviceEndpoint.tenant_id == demo.id)
        ).all()
        assert {(r.host, r.port) for r in rows} == set(fleet.endpoints)
        assert all(r.enabled and r.location_id is not None for r in rows)
    finally:
        fleet.stop()
    # A second run retires the first run's (ephemeral) ports.
    fleet = start_demo_fleet(app, 2)
    try:
        db.session.expire_all()
        enabled = db.session.scalars(
            select(DeviceEndpoint).where(
                DeviceEndpoint.tenant_id == demo.id, DeviceEndpoint.enabled.is_(True)
            )
        ).all()
        assert {(r.host, r.port) for r in enabled} == set(fleet.endpoints)
    finally:
        fleet.stop()


def test_the_demo_devices_come_online_when_the_demo_fleet_runs(app, db, worker):
    """`make run`: `flask demo load`, then `flask serve` with 4 simulated receivers. The demo's
    devices are those receivers, so the first poll finds them instead of leaving them unseen."""
    from models.accounts import Tenant
    from services.demo import DEMO_RECEIVERS, DEMO_TENANT, load_demo
    from services.manufacturers.simulator import start_demo_fleet

    load_demo()
    db.session.commit()
    demo = db.session.scalar(select(Tenant).where(Tenant.name == DEMO_TENANT))
    names = [device_id for device_id, _ in DEMO_RECEIVERS]
    fleet = start_demo_fleet(app, len(DEMO_RECEIVERS))
    try:
        result = device_service.poll_service(demo.id, "shure")
        drain(app)
    finally:
        fleet.stop()
    assert result.status == "success" and result.online_count == result.device_count
    db.session.expire_all()
    receivers = db.session.scalars(
        select(Device).where(Device.tenant_id == demo.id, Device.kind == "receiver")
    ).all()
    # The same four rows (no duplicates), now online and seen, with their transmitters.
    assert sorted(d.name for d in receivers) == sorted(names)
    assert all(d.is_online and d.last_seen is not None for d in receivers)
    transmitters = db.session.scalar(
        select(func.count())
        .select_from(Device)
        .where(Device.tenant_id == demo.id, Device.kind == "transmitter")
    )
    assert transmitters >= 1


# ---------------------------------------------------------------- CLI


def test_cli_endpoints_poll_sync_and_errors(app, db, venue):
    tenant, _, _ = venue
    # A first poll opens the connection, identifies the family and reads every property
    # within the poll's deadline: on a loaded CI machine 1 s is not always enough, and a
    # poll returns as soon as every receiver answered, so a longer deadline costs nothing.
    app.config["DEVICES_POLL_TIMEOUT"] = 4.0
    runner = app.test_cli_runner()
    with SimulatedReceiver("ULXD4Q", device_id="CLI-RX", seed=2) as receiver:
        address = f"{receiver.host}:{receiver.port}"
        add = ["devices", "endpoints", "add", address, "--tenant", "Venue"]
        added = runner.invoke(args=[*add, "--location", "Stage"])
        assert added.exit_code == 0, added.output
        assert "Added shure endpoint" in added.output and "'Stage'" in added.output
        again = runner.invoke(args=add)
        assert "Updated" in again.output

        listed = runner.invoke(args=["devices", "endpoints", "list", "--tenant", str(tenant.id)])
        assert listed.exit_code == 0 and address in listed.output and "Stage" in listed.output

        polled = runner.invoke(args=["devices", "poll", "--tenant", "Venue"])
        assert polled.exit_code == 0, polled.output
        assert "CLI-RX/ch3" in polled.output
        assert "shure @ Venue: 5 devices, 5 online, 0 errors, status success" in polled.output

        synced = runner.invoke(args=["devices", "sync", "--service", "shure", "-q"])
        assert synced.exit_code == 0, synced.output
        assert "Syncing shure for 'Venue'" in synced.output and "CLI-RX/ch3" not in synced.output

        # Endpoints of a manufacturer without a service: the others are still polled.
        from services.manufacturers.endpoints import upsert_endpoint

        upsert_endpoint(tenant.id, "10.0.0.9", 4000, service_code="acme")
        db.session.commit()
        mixed = runner.invoke(args=["devices", "poll", "-q"])
        assert mixed.exit_code == 1 and "status success" in mixed.output
        assert "No manufacturer service 'acme'" in mixed.output

    for args, message in (
        (["devices", "poll", "--tenant", "Nowhere"], "No tenant 'Nowhere'"),
        (["devices", "sync", "--service", "sennheiser"], "No manufacturer service 'sennheiser'"),
        (["devices", "endpoints", "add", "rx:http", "--tenant", "Venue"], "Bad port"),
        (["devices", "endpoints", "add", "rx", "--tenant", "Venue", "--location", "Moon"], "Moon"),
    ):
        failed = runner.invoke(args=args)
        assert failed.exit_code == 1, (args, failed.output)
        assert message in failed.output and "Traceback" not in failed.output
        assert failed.exception is None or isinstance(failed.exception, SystemExit)


def test_cli_simulate_registers_endpoints(app, db, venue):
    tenant, _, _ = venue
    result = app.test_cli_runner().invoke(
        args=[
            "devices",
            "simulate",
            "--receivers",
            "2",
            "--tenant",
            "Venue",
            "--seed",
            "4",
            "--tick",
            "0.05",
            "--duration",
            "0.3",
        ]
    )
    assert result.exit_code == 0, result.output
    assert "Registered 2 endpoints for tenant 'Venue'" in result.output
    assert "Receivers stopped." in result.output
    rows = db.session.scalars(
        select(DeviceEndpoint).where(DeviceEndpoint.tenant_id == tenant.id)
    ).all()
    assert len(rows) == 2 and all(f"{r.host}:{r.port}" in result.output for r in rows)
