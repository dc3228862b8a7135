"""Every Shure family read the way the hardware speaks (issue 20, section 1).

The per-family tests talk to a scripted receiver over real TCP that answers with literal frames
in the forms of Shure's command-string documents (ULX-D, Axient Digital, SLX-D), not with the
project's simulator, so a misreading shared by the client and the simulator cannot hide here.
The lifecycle tests (alerts, identity, pages) use the simulator, which speaks each family too.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time

import pytest
from sqlalchemy import func, select

from models.devices import ActivityLog, Device, DeviceEndpoint, Location
from models.events import OutboxEvent
from models.notifications import Notification
from services import devices as device_service
from services.manufacturers import shure_protocol as proto
from services.manufacturers.shure import ShureService, ShureSettings
from services.manufacturers.shure import service as shure_service
from services.manufacturers.simulator import SimulatedReceiver, attach_endpoints
from tests.conftest import drain, login
from tests.helpers import handlers_only, shure_app

OVERRIDES = {
    "DEVICES_AUTO_PROVISION": True,
    "DEVICES_POLL_TIMEOUT": 1.5,
    "DEVICES_OFFLINE_AFTER_MISSES": 2,
    "DEVICES_POLL_INTERVAL": 3600.0,
    "DEVICES_SHURE_METER_RATE_MS": 100,
    "DEVICES_SHURE_SILENCE_TIMEOUT": 2.0,
    "DEVICES_SHURE_CONNECT_TIMEOUT": 1.0,
    "DEVICES_SHURE_BACKOFF_INITIAL": 0.1,
    "DEVICES_SHURE_BACKOFF_MAX": 0.3,
}
FAST = ShureSettings(
    meter_rate_ms=100,
    silence_timeout=2.0,
    connect_timeout=1.0,
    backoff_initial=0.1,
    backoff_max=0.3,
    identify_timeout=0.3,
)


# ---------------------------------------------------------------- a scripted receiver


class ScriptedReceiver:
    """A TCP server that answers each command with fixed frames and, once a METER_RATE is
    set, sends its SAMPLE lines every 50 ms. An unknown command gets `unknown` (REP ERR, as a
    receiver answers a property it does not have, or nothing)."""

    def __init__(
        self,
        answers: dict[bytes, bytes],
        samples: bytes = b"",
        unknown: bytes = b"< REP ERR >",
    ) -> None:
        self.answers, self.samples, self.unknown = answers, samples, unknown
        self.received: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.address = self._listener.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> ScriptedReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        clients: dict[socket.socket, proto.FrameParser] = {}
        metering: set[socket.socket] = set()
        next_sample = 0.0
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.02):
                    if key.fileobj is self._listener:
                        try:
                            conn, _ = self._listener.accept()
                        except BlockingIOError:
                            continue
                        clients[conn] = proto.FrameParser()
                        selector.register(conn, selectors.EVENT_READ)
                        continue
                    conn = key.fileobj
                    try:
                        data = conn.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        selector.unregister(conn)
                        clients.pop(conn, None)
                        metering.discard(conn)
                        conn.close()
                        continue
                    try:
                        for frame in clients[conn].feed(data):
                            command = frame.encode()
                            self.received.append(command)
                            if frame.key == "METER_RATE":
                                metering.add(conn)
                            reply = self.answers.get(command)
                            conn.sendall(self.unknown if reply is None else reply)
                    except OSError:
                        # The client hung up with commands still unanswered (it gives up on
                        # a receiver that answers nothing but errors): drop it, keep serving.
                        selector.unregister(conn)
                        clients.pop(conn, None)
                        metering.discard(conn)
                        conn.close()
                if metering and self.samples and time.monotonic() >= next_sample:
                    next_sample = time.monotonic() + 0.05
                    for conn in list(metering):
                        try:
                            conn.sendall(self.samples)
                        except OSError:
                            metering.discard(conn)
        finally:
            for conn in clients:
                conn.close()
            selector.close()
            self._listener.close()


def fetch_twice(app, receiver: ScriptedReceiver) -> tuple[dict, list]:
    """Reports by api_device_id once the receiver has metered a few samples (in an app
    context: its device network policy admits the loopback receivers)."""
    service = ShureService(FAST)
    endpoint = DeviceEndpoint(host=receiver.address[0], port=receiver.address[1])
    try:
        with app.app_context():
            service.fetch([endpoint], timeout=1.5)
            time.sleep(0.6)
            reports = {r.api_device_id: r for r in service.fetch([endpoint], timeout=1.5)}
        return reports, service.status()
    finally:
        service.shutdown()


def fetch_one(app, receiver: ScriptedReceiver) -> dict:
    return fetch_twice(app, receiver)[0]


METER_ON = b"< SET 0 METER_RATE 00100 >"

# ULX-D: no MODEL property (GET MODEL is REP ERR); BATT_BARS / BATT_RUN_TIME; RF_INT_DET;
# SAMPLE x ALL <antenna> <RF dBm+128> <audio dBFS+50>.
ULXD_ALL = (
    b"< REP DEVICE_ID {STAGE-L                        } >"
    b"< REP FW_VER {2.7.6             } >"
    b"< REP HIGH_DENSITY OFF >"
    b"< REP 1 CHAN_NAME {Vox 1                          } >"
    b"< REP 1 TX_TYPE ULXD2 >"
    b"< REP 1 BATT_BARS 004 >"
    b"< REP 1 BATT_RUN_TIME 00215 >"
    b"< REP 1 FREQUENCY 0578350 >"
    b"< REP 1 GROUP_CHAN 01,05 >"
    b"< REP 1 AUDIO_GAIN 030 >"
    b"< REP 1 AUDIO_MUTE OFF >"
    b"< REP 1 RF_INT_DET CRITICAL >"
    b"< REP 1 ENCRYPTION_WARNING ON >"
    b"< REP 1 TX_OFFSET 006 >"
    b"< REP 1 TX_PWR_LOCK ON >"
    b"< REP 1 TX_MENU_LOCK OFF >"
    b"< REP 2 CHAN_NAME {Vox 2                          } >"
    b"< REP 2 TX_TYPE UNKN >"
    b"< REP 2 BATT_BARS 255 >"
    b"< REP 2 BATT_RUN_TIME 65535 >"
)
ULXD_SAMPLES = b"< SAMPLE 1 ALL AX 098 039 >< SAMPLE 2 ALL XX 000 000 >"

# Axient Digital: MODEL answered; TX_MODEL, TX_BATT_BARS / TX_BATT_MINS, INTERFERENCE_STATUS,
# ENCRYPTION_STATUS, TX_OFFSET (+12), TX_LOCK; SAMPLE x ALL qual audBitmap audPeak audRms
# antStatus rfBitmapA rssiA rfBitmapB rssiB, levels +120.
AXIENT_MODEL = b"< REP MODEL {AD4D                            } >"
AXIENT_ALL = (
    AXIENT_MODEL + b"< REP DEVICE_ID {BAND-RACK                      } >"
    b"< REP FW_VER {1.2.12                  } >"
    b"< REP 1 CHAN_NAME {Kick                           } >"
    b"< REP 1 TX_MODEL AD2 >"
    b"< REP 1 TX_BATT_BARS 001 >"
    b"< REP 1 TX_BATT_MINS 00045 >"
    b"< REP 1 FREQUENCY 0612025 >"
    b"< REP 1 GROUP_CHANNEL 02,11 >"
    b"< REP 1 AUDIO_GAIN 018 >"
    b"< REP 1 AUDIO_MUTE ON >"
    b"< REP 1 INTERFERENCE_STATUS DETECTED >"
    b"< REP 1 ENCRYPTION_STATUS OK >"
    b"< REP 1 TX_OFFSET 015 >"
    b"< REP 1 TX_LOCK ALL >"
)
AXIENT_SAMPLES = b"< SAMPLE 1 ALL 004 031 104 100 BX 031 065 000 000 >"

# SLX-D: MODEL answered; TX_TYPE, TX_BATT_BARS / TX_BATT_MINS; SAMPLE x ALL audPeak audRms
# rfRssi, all +120; no mute, no interference detection.
SLXD_MODEL = b"< REP MODEL {SLXD4D                          } >"
SLXD_ALL = (
    SLXD_MODEL + b"< REP DEVICE_ID {PULPIT                         } >"
    b"< REP FW_VER {2.0.15.2                } >"
    b"< REP 1 CHAN_NAME {Lectern                        } >"
    b"< REP 1 TX_TYPE SLXD2 >"
    b"< REP 1 TX_BATT_BARS 003 >"
    b"< REP 1 TX_BATT_MINS 00120 >"
    b"< REP 1 FREQUENCY 0482125 >"
    b"< REP 1 GROUP_CHAN 03,07 >"
    b"< REP 1 AUDIO_GAIN 012 >"
)
SLXD_SAMPLES = b"< SAMPLE 1 ALL 104 102 060 >"


def scripted(family_all: bytes, model_reply: bytes, device_id: bytes, samples: bytes):
    return ScriptedReceiver(
        {
            b"< GET MODEL >": model_reply,
            b"< GET 0 ALL >": family_all,
            b"< GET FW_VER >": b"",
            METER_ON: b"< REP 1 METER_RATE 00100 >",
            b"< GET DEVICE_ID >": b"< REP DEVICE_ID {" + device_id + b"} >",
        },
        samples=samples,
    )


# ---------------------------------------------------------------- documented frames, parsed


def test_documented_sample_lines_read_with_each_familys_layout():
    (ulxd,) = proto.parse("< SAMPLE 1 ALL AX 098 039 >")
    assert proto.parse_sample("ulxd", ulxd.values) == proto.Sample(
        antenna="AX", rf_dbm=-30, audio_dbfs=-11
    )
    (axient,) = proto.parse("< SAMPLE 1 ALL 005 031 104 100 BB 031 065 031 072 >")
    assert proto.parse_sample("axient", axient.values) == proto.Sample(
        antenna="BB", rf_dbm=-48, audio_dbfs=-20, audio_peak_dbfs=-16, quality=5
    )
    (slxd,) = proto.parse("< SAMPLE 2 ALL 104 102 060 >")
    assert proto.parse_sample("slxd", slxd.values) == proto.Sample(
        rf_dbm=-60, audio_dbfs=-18, audio_peak_dbfs=-16
    )
    # Another family's line is not read as this one's (the bug: AD and SLX-D as ULX-D).
    assert proto.parse_sample("ulxd", axient.values) is None
    assert proto.parse_sample("ulxd", slxd.values) is None
    assert proto.parse_sample("slxd", ulxd.values) is None
    assert proto.family_for_model("AD4Q") is proto.AXIENT
    assert proto.family_for_model("SLXD4D") is proto.SLXD
    assert proto.family_for_model("something else") is None


def test_ulxd_is_identified_by_rep_err_and_read_with_its_own_names(app):
    with scripted(ULXD_ALL, b"< REP ERR >", b"STAGE-L", ULXD_SAMPLES) as rx:
        reports = fetch_one(app, rx)
    receiver = reports["STAGE-L"]
    assert (receiver.model, receiver.firmware, receiver.online) == ("ULXD4D", "2.7.6", True)
    assert receiver.state["family"] == "ULX-D"
    tx = reports["STAGE-L/ch1"]
    assert (tx.model, tx.channel) == ("ULXD2", 1)
    s = tx.state
    assert (s["battery_bars"], s["battery_minutes"]) == (4, 215)
    assert (s["group_channel"], s["audio_gain_db"], s["audio_muted"]) == ("1,5", 12, False)
    assert (s["interference"], s["encryption_warning"]) == (True, True)
    assert (s["tx_offset_db"], s["tx_lock"], s["antenna"]) == (6, "power", "AX")
    assert (s["rf_level"], s["audio_level"]) == (-30, -20)  # -30 dBm, -11 dBFS in 10 dB steps
    assert "STAGE-L/ch2" not in reports  # TX_TYPE UNKN: no transmitter on channel 2
    # The MODEL question went alone and first, so its REP ERR could not be anything else's.
    assert rx.received[0] == b"< GET MODEL >"


def test_axient_digital_battery_interference_and_meters(app):
    with scripted(AXIENT_ALL, AXIENT_MODEL, b"BAND-RACK", AXIENT_SAMPLES) as rx:
        reports = fetch_one(app, rx)
    assert reports["BAND-RACK"].model == "AD4D"
    s = reports["BAND-RACK/ch1"].state
    # TX_BATT_BARS / TX_BATT_MINS: the bars were None before, so no low-battery alert.
    assert (s["battery_bars"], s["battery_minutes"]) == (1, 45)
    assert (s["interference"], s["encryption_warning"], s["audio_muted"]) == (True, False, True)
    assert (s["tx_offset_db"], s["tx_lock"], s["group_channel"]) == (3, "all", "2,11")
    assert (s["quality"], s["antenna"], s["audio_gain_db"]) == (4, "BX", 0)
    assert (s["rf_level"], s["audio_level"]) == (-60, -20)  # -55 dBm / -20 dBFS, not -120 / +50
    assert reports["BAND-RACK/ch1"].model == "AD2"


def test_slxd_battery_and_meters(app):
    with scripted(SLXD_ALL, SLXD_MODEL, b"PULPIT", SLXD_SAMPLES) as rx:
        reports = fetch_one(app, rx)
    assert reports["PULPIT"].model == "SLXD4D"
    tx = reports["PULPIT/ch1"]
    s = tx.state
    assert tx.model == "SLXD2"
    assert (s["battery_bars"], s["battery_minutes"]) == (3, 120)
    assert (s["rf_level"], s["audio_level"]) == (-60, -20)  # -60 dBm / -18 dBFS
    assert (s["group_channel"], s["audio_gain_db"]) == ("3,7", -6)
    assert not {"interference", "audio_muted", "quality"} & set(s)  # SLX-D has none


def test_a_receiver_that_ignores_get_model_is_read_as_ulxd(app):
    with ScriptedReceiver(
        {
            b"< GET 0 ALL >": ULXD_ALL,
            METER_ON: b"",
            b"< GET DEVICE_ID >": b"< REP DEVICE_ID {STAGE-L} >",
        },
        samples=ULXD_SAMPLES,
        unknown=b"",  # silence instead of REP ERR
    ) as rx:
        reports = fetch_one(app, rx)
    assert reports["STAGE-L"].online and reports["STAGE-L"].model == "ULXD4D"
    assert reports["STAGE-L/ch1"].state["rf_level"] == -30


# ---------------------------------------------------------------- hostile receivers


HOSTILE = (
    b"< SAMPLE 1 ALL AX 09 >"  # truncated
    b"< SAMPLE 1 ALL AX 99999999999999999999999 039 >"  # huge
    b"< SAMPLE 1 ALL AX \xd9\xa3\xd9\xa3 \xd9\xa3 >"  # Arabic-Indic digits
    b"< SAMPLE 1 ALL \xc3\x84X 098 039 >"  # non-ASCII antenna
    b"< SAMPLE 1 ALL 005 031 104 100 BB 031 065 031 >"  # an Axient line cut short
    b"< SAMPLE 99 ALL AX 098 039 >< SAMPLE 0 ALL AX 098 039 >"
    b"< REP \xd9\xa3 TX_TYPE ULXD2 >"  # channel "3" in Arabic-Indic digits
    b"< REP 1 BATT_BARS \xd9\xa4 >< REP 1 BATT_RUN_TIME 999999999999999999 >"
    b"< REP 1 TX_OFFSET 99999 >< REP 1 GROUP_CHAN 1,2,3 >< REP 1 AUDIO_GAIN -5 >"
    b"< REP 1 RF_INT_DET MAYBE >< REP 42 CHAN_NAME {x} >< REP ERR >< REP ERR >"
    b"< REP 1 CHAN_NAME {Vox \xe2\x98\x83\x00\x1b[31m} >"  # non-ASCII, control bytes
)


def test_hostile_frames_never_crash_the_client_nor_become_readings(app):
    answers = {
        b"< GET 0 ALL >": b"< REP DEVICE_ID {EVIL} >< REP 1 TX_TYPE ULXD2 >" + HOSTILE,
        b"< GET DEVICE_ID >": b"< REP DEVICE_ID {EVIL} >" + HOSTILE,
        METER_ON: HOSTILE,
    }
    with ScriptedReceiver(answers, samples=HOSTILE) as rx:
        reports, (status,) = fetch_twice(app, rx)
    assert status.state == "connected" and status.errors >= 3  # alive, the ERRs counted
    assert reports["EVIL"].online
    s = reports["EVIL/ch1"].state
    assert s["battery_bars"] is None and s["battery_minutes"] is None
    assert "rf_level" not in s and "audio_level" not in s  # nothing from the broken samples
    assert not {"tx_offset_db", "group_channel", "audio_gain_db", "interference"} & set(s)
    assert set(reports) == {"EVIL", "EVIL/ch1"}  # no channel 99, 42, 0 or 3
    assert reports["EVIL/ch1"].name == "Vox [31m"  # printable ASCII only


def test_rep_err_to_everything_leaves_the_receiver_offline_not_the_client_broken(app):
    with ScriptedReceiver({}, unknown=b"< REP ERR >" * 3) as rx:
        service = ShureService(FAST)
        endpoint = DeviceEndpoint(host=rx.address[0], port=rx.address[1])
        try:
            with app.app_context():
                reports = service.fetch([endpoint], timeout=1.0)
            (status,) = service.status()
        finally:
            service.shutdown()
    assert [r.online for r in reports] == [False]
    assert status.state == "connected" and status.errors >= 3


# ---------------------------------------------------------------- lifecycle: alerts, identity


@pytest.fixture
def app(tmp_path):
    with shure_app(tmp_path, OVERRIDES) as application:
        yield application


@pytest.fixture
def worker(app):
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


def devices_of(db, tenant_id) -> dict[str, Device]:
    rows = db.session.scalars(select(Device).where(Device.tenant_id == tenant_id))
    return {d.api_device_id: d for d in rows}


def count_topic(db, topic: str) -> int:
    return db.session.scalar(select(func.count()).where(OutboxEvent.topic == topic))


def notifications(db, admin, kind: str) -> list[Notification]:
    return db.session.scalars(
        select(Notification).where(Notification.recipient_id == admin.id, Notification.type == kind)
    ).all()


def test_axient_low_battery_and_interference_alert_once_and_show_on_the_pages(
    app, db, worker, venue, client
):
    tenant, admin, stage = venue
    with SimulatedReceiver("AD4D", device_id="BAND-RACK", channel_names=["Kick", "Snare"]) as rx:
        attach_endpoints(tenant.id, [rx.address], location_id=stage.id)
        db.session.commit()
        poll(app, db, tenant.id)
        kick = devices_of(db, tenant.id)["BAND-RACK/ch1"]
        assert kick.state["battery_bars"] == 5 and kick.state["interference"] is False

        rx.set_battery(1, 1, 30)
        poll(app, db, tenant.id)
        assert [n.title for n in notifications(db, admin, "device_battery_low")] == [
            "Battery low: Kick"
        ]

        rx.set_interference(1)
        poll(app, db, tenant.id)
        poll(app, db, tenant.id)  # still there: no second alert
        rx.set_interference(1, False)
        poll(app, db, tenant.id)
        rx.set_interference(1)  # back within the dedupe window: still one notification
        poll(app, db, tenant.id)
        assert count_topic(db, "device.interference") == 2
        alerts = notifications(db, admin, "device_interference")
        assert [n.title for n in alerts] == ["RF interference: Kick"]
        kick = devices_of(db, tenant.id)["BAND-RACK/ch1"]
        assert kick.state["interference"] is True

        login(client, admin)
        page = client.get(f"/devices/{kick.id}").get_data(as_text=True)
        assert "Interference detected" in page and "Group / channel" in page
        assert "Axient Digital" in client.get(
            f"/devices/{devices_of(db, tenant.id)['BAND-RACK'].id}"
        ).get_data(as_text=True)
        board = client.get("/devices/").get_data(as_text=True)
        assert "Interference detected" in board and "G/C " in board


def test_two_receivers_with_one_device_id_stay_two_devices(app, db, worker, venue):
    tenant, _, stage = venue
    with (
        SimulatedReceiver("ULXD4D", device_id="RACK", channel_names=["A1", "A2"]) as left,
        SimulatedReceiver("ULXD4D", device_id="RACK", channel_names=["B1", "B2"]) as right,
    ):
        attach_endpoints(tenant.id, [left.address, right.address], location_id=stage.id)
        db.session.commit()
        for _ in range(3):
            poll(app, db, tenant.id)
        devices = devices_of(db, tenant.id)
        receivers = [d for d in devices.values() if d.kind == "receiver"]
        assert sorted((d.ip_address, d.port) for d in receivers) == sorted(
            [left.address, right.address]
        )
        assert {d.name for d in receivers} == {"RACK"}
        channel_names = sorted(d.name for d in devices.values() if d.kind == "transmitter")
        assert channel_names == ["A1", "A2", "B1", "B2"]
        assert all(d.is_online for d in devices.values())

        # A process that has never heard the first receiver (a restart while it is down)
        # knows it only by address; the second one's "RACK" must not take over its device.
        shure_service.shutdown()
        left.drop()
        for _ in range(2):
            poll(app, db, tenant.id)
        devices = devices_of(db, tenant.id)
        by_address = {(d.ip_address, d.port): d for d in devices.values() if d.kind == "receiver"}
        assert set(by_address) == {left.address, right.address}
        assert not by_address[left.address].is_online and by_address[right.address].is_online
        # Neither receiver's data lands on the other: no address ever "changed".
        changed_address = db.session.scalars(
            select(ActivityLog).where(ActivityLog.activity_type == "update")
        ).all()
        assert not any("ip_address" in (a.details.get("new") or {}) for a in changed_address)
        assert "'port'" not in str([a.details for a in changed_address])


def test_a_renamed_device_id_is_the_same_device(app, db, worker, venue):
    tenant, admin, stage = venue
    with SimulatedReceiver("QLXD4", device_id="OLD-NAME", channel_names=["Lectern"]) as rx:
        attach_endpoints(tenant.id, [rx.address], location_id=stage.id)
        db.session.commit()
        poll(app, db, tenant.id)
        before = devices_of(db, tenant.id)
        assert set(before) == {"OLD-NAME", "OLD-NAME/ch1"}
        rx.device_id = "NEW-NAME"  # renamed on the front panel
        for _ in range(3):  # more than DEVICES_OFFLINE_AFTER_MISSES
            poll(app, db, tenant.id)
        after = devices_of(db, tenant.id)
        assert set(after) == set(before)  # no new device
        assert after["OLD-NAME"].name == "NEW-NAME" and after["OLD-NAME"].is_online
        assert after["OLD-NAME/ch1"].is_online
        assert count_topic(db, "device.offline") == 0
        assert count_topic(db, "device.discovered") == 2
        assert notifications(db, admin, "device_offline") == []
