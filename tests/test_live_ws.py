"""/ws/live over a real socket: snapshot first, tenant-scoped frames, Origin and token checks."""

from __future__ import annotations

import re

import pytest
import websocket

from models.chats import Agent
from tests.conftest import PASSWORD
from tests.helpers import Browserless, receive_for, receive_until


@pytest.fixture
def two_tenants(factory):
    alice = factory.user(factory.tenant("Alpha"), email="alice@alpha.example")
    bob = factory.user(factory.tenant("Beta"), email="bob@beta.example")
    return alice, bob


def _create_agent(app, tenant_id: int, name: str) -> None:
    from extensions import db

    with app.app_context():
        db.session.add(Agent(tenant_id=tenant_id, name=name))
        db.session.commit()


def test_snapshot_then_live_frames_for_own_tenant_only(app, worker, live_server, two_tenants):
    alice, bob = two_tenants
    a = Browserless(live_server.url).login(alice.email, PASSWORD)
    b = Browserless(live_server.url).login(bob.email, PASSWORD)
    ws_a = a.open_socket(a.live_url())
    ws_b = b.open_socket(b.live_url())
    try:
        snapshot = ws_a.recv()
        assert 'id="feed-list"' in snapshot and 'hx-swap-oob="true"' in snapshot
        ws_b.recv()  # bob's snapshot

        _create_agent(app, alice.tenant_id, "Alpha night desk")
        frames = receive_until(ws_a, lambda f: "Alpha night desk" in f)
        assert 'hx-swap-oob="afterbegin"' in frames[-1]
        # Nothing of Alpha's reaches Beta's socket.
        assert not any("Alpha night desk" in f for f in receive_for(ws_b, 1.0))
    finally:
        ws_a.close()
        ws_b.close()


def _close_code(ws) -> int | None:
    """The close code the server sends first thing (no snapshot, no frames before it)."""
    try:
        opcode, data = ws.recv_data(control_frame=True)
    except websocket.WebSocketConnectionClosedException:
        return None
    finally:
        ws.shutdown()
    if opcode == websocket.ABNF.OPCODE_CLOSE and len(data) >= 2:
        return int.from_bytes(data[:2], "big")
    return None


def test_policy_violations_close_with_1008(live_server, two_tenants):
    alice, bob = two_tenants
    a = Browserless(live_server.url).login(alice.email, PASSWORD)
    b = Browserless(live_server.url).login(bob.email, PASSWORD)
    alice_url = a.live_url()

    # Bob replays Alice's signed topics: refused (the token names Alice and her tenant).
    ws = b.open_socket(alice_url)
    assert _close_code(ws) == 1008

    # A tampered token: refused.
    ws = a.open_socket(alice_url[:-3] + "xyz")
    assert _close_code(ws) == 1008

    # Not logged in: refused.
    anonymous = Browserless(live_server.url)
    ws = anonymous.open_socket(alice_url)
    assert _close_code(ws) == 1008

    # Wrong Origin: refused.
    ws = a.open_socket(alice_url, origin="http://evil.example")
    assert _close_code(ws) == 1008


def test_burst_is_coalesced_into_few_messages(app, worker, live_server, two_tenants):
    from events import emit
    from extensions import db

    alice, _ = two_tenants
    app.config["LIVE_COALESCE_MS"] = 150
    a = Browserless(live_server.url).login(alice.email, PASSWORD)
    ws = a.open_socket(a.live_url())
    try:
        ws.recv()  # snapshot
        with app.app_context():
            for n in range(30):
                emit("note.posted", tenant_id=alice.tenant_id, payload={"label": f"burst {n}"})
            db.session.commit()
        frames = receive_until(ws, lambda f: "burst 29" in f, timeout=10)
        frames += receive_for(ws, 0.5)
        delivered = [n for f in frames for n in re.findall(r"burst (\d+)<", f)]
        assert sorted(map(int, delivered)) == list(range(30))  # every event arrives once...
        assert len(frames) < 30  # ...in fewer socket messages than events
    finally:
        ws.close()


def test_hub_that_fell_behind_the_stream_trim_asks_for_a_new_snapshot(redis_url):
    """Frames trimmed away before the hub read them must not vanish silently."""
    from events.live import Hub, RedisBus
    from tests.conftest import cleanup_redis, redis_prefix

    prefix = redis_prefix()
    bus = RedisBus(redis_url, prefix=prefix + "live:", maxlen=100)
    bus.READ_COUNT = 50
    hub = Hub(bus)
    try:
        kept = hub.subscribe(["t1:devices"])
        position = hub._positions["t1:devices"]
        for n in range(20):
            bus.publish("t1:devices", f"frame {n}")
        # A small lag: nothing was trimmed, no alarm.
        hub._detect_gaps({"t1:devices": position}, bus.read({"t1:devices": position}))
        assert kept.overflowed is False
        for n in range(400):  # far more than the stream keeps
            bus.publish("t1:devices", f"frame {n}")
        hub._detect_gaps({"t1:devices": position}, bus.read({"t1:devices": position}))
        assert kept.overflowed is True  # the socket sends a fresh snapshot
    finally:
        hub.stop()
        cleanup_redis(redis_url, prefix, "unused-namespace")
