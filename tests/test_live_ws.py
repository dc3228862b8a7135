"""/ws/live over a real socket: snapshot first, tenant-scoped frames, Origin and token checks."""

from __future__ import annotations

import re
import threading
import time

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
        hub.stop()  # this test reads for the hub, at its own pace
        hub._thread.join(timeout=5)
        for n in range(20):
            bus.publish("t1:devices", f"frame {n}")
        # A small lag: nothing was trimmed, no alarm.
        hub._handle(bus.read_numbered({"t1:devices": hub._positions["t1:devices"]}))
        assert kept.overflowed is False
        for n in range(400):  # far more than the stream keeps
            bus.publish("t1:devices", f"frame {n}")
        hub._handle(bus.read_numbered({"t1:devices": hub._positions["t1:devices"]}))
        assert kept.overflowed is True  # the socket sends a fresh snapshot
    finally:
        hub.stop()
        cleanup_redis(redis_url, prefix, "unused-namespace")


def test_a_commits_live_frames_reach_the_bus_together_in_order(prod_app):
    """Frames published after commit go out in one round trip once the commit's callbacks
    have run: all of them, in order, and none from a rolled-back savepoint or transaction."""
    import json

    from extensions import db
    from services.live import bus, publish_after_commit

    with prod_app.app_context():
        topic = "t1:devices"
        start = bus().last_id(topic)
        for n in range(5):
            publish_after_commit(topic, f"k{n}", html=f"<p>{n}</p>")
        savepoint = db.session.begin_nested()
        publish_after_commit(topic, "undone", html="<p>undone</p>")
        savepoint.rollback()
        publish_after_commit(topic, "k5", html="<p>5</p>")
        assert bus().read({topic: start}) == []  # nothing before the commit
        db.session.commit()
        keys = [json.loads(data)["key"] for _, _, data in bus().read({topic: start})]
        assert keys == ["k0", "k1", "k2", "k3", "k4", "k5"]

        publish_after_commit(topic, "rolled-back", html="<p>no</p>")
        db.session.rollback()
        db.session.commit()
        assert [json.loads(d)["key"] for _, _, d in bus().read({topic: start})][-1] == "k5"


def _publish_notes(app, topic: str, texts: list[str], first: int = 0) -> None:
    from services.live import publish

    with app.app_context():
        for n, text in enumerate(texts, start=first):
            publish(topic, f"note-{n}", html=f'<li id="note-{n}" hx-swap-oob="true">{text}</li>')


def test_browser_style_deflate_socket_reads_every_message(app, live_server, two_tenants):
    """Clients that negotiate permessage-deflate (every browser) get compressed messages they
    can inflate one after another, the snapshot included."""
    from services.live import tenant_topic

    alice, _ = two_tenants
    a = Browserless(live_server.url).login(alice.email, PASSWORD)
    ws = a.open_deflate_socket(a.live_url())
    try:
        assert ws.extension.enabled()
        snapshot = ws.recv()
        assert snapshot and 'id="feed-list"' in snapshot
        texts = [f"note {n} " + "repeated words compress well " * 20 for n in range(60)]
        seen: list[str] = []
        for start in (0, 20, 40):  # several messages, several ticks
            topic = tenant_topic(alice.tenant_id, "feed")
            _publish_notes(app, topic, texts[start : start + 20], start)
            time.sleep(0.1)
        while len(seen) < len(texts):
            message = ws.recv()
            assert message is not None, f"got {len(seen)} of {len(texts)} notes"
            seen += re.findall(r">(note \d+ [^<]*)</li>", message)
        assert seen == texts
        # They travelled compressed: far fewer bytes than the text.
        assert ws.wire_bytes < sum(map(len, texts)) / 3
    finally:
        ws.close()


def test_socket_that_stops_reading_holds_back_no_one_and_gets_a_snapshot(
    app, live_server, two_tenants
):
    import os

    from services.live import tenant_topic

    alice, _ = two_tenants
    app.config["LIVE_SUBSCRIPTION_BUFFER"] = 40
    a = Browserless(live_server.url).login(alice.email, PASSWORD)
    slow = a.open_deflate_socket(a.live_url(), recv_buffer=4096)
    fast = a.open_socket(a.live_url())
    try:
        assert 'id="feed-list"' in slow.recv()  # then it stops reading
        fast.recv()  # snapshot
        # Hard to compress notes (16 MB), far more than the kernel buffers between the server
        # and the slow socket hold (the sender's grows to 4 MB). The fast socket reads all along.
        texts = [f"note {n} {os.urandom(40_000).hex()}" for n in range(200)]
        got: list[str] = []

        def read_fast() -> None:
            for frame in receive_until(fast, lambda f: "note 199 " in f, timeout=30):
                got.extend(re.findall(r">(note \d+ [0-9a-f]+)</li>", frame))

        reader = threading.Thread(target=read_fast)
        reader.start()
        for start in range(0, len(texts), 5):  # 4 MB/s
            topic = tenant_topic(alice.tenant_id, "feed")
            _publish_notes(app, topic, texts[start : start + 5], start)
            time.sleep(0.1)
        reader.join(timeout=40)
        assert got == texts  # the fast socket got everything, in order, meanwhile

        # The slow one reads again: what was on the wire, then a fresh snapshot.
        messages = []
        while (message := slow.recv(timeout=3)) is not None:
            messages.append(message)
        snapshots = [m for m in messages if 'id="feed-list"' in m]
        assert snapshots, "the client that fell behind got no new snapshot"
        delivered = sum(len(re.findall(r">note \d+ ", m)) for m in messages)
        assert delivered < len(texts)  # it did fall behind
    finally:
        slow.close()
        fast.close()


def test_pings_to_a_backed_up_socket_never_land_inside_a_message(app, live_server, two_tenants):
    """simple-websocket pings every socket (LIVE_PING_SECONDS) from its reader thread; the
    broadcaster may be halfway through a message for a client that reads slowly. The ping
    must go between messages, or the browser sees a broken stream."""
    import os

    from services.live import tenant_topic

    alice, _ = two_tenants
    app.config["SOCK_SERVER_OPTIONS"] = {**app.config["SOCK_SERVER_OPTIONS"], "ping_interval": 1.0}
    # 20 MB: more than the kernel's buffers hold (the sender's grows to 4 MB), so the
    # broadcaster writes what fits and keeps the rest: messages stay half-written.
    texts = [f"note {n} {os.urandom(50_000).hex()}" for n in range(200)]
    a = Browserless(live_server.url).login(alice.email, PASSWORD)
    slow = a.open_deflate_socket(a.live_url(), recv_buffer=4096)
    try:
        assert 'id="feed-list"' in slow.recv()
        topic = tenant_topic(alice.tenant_id, "feed")

        def publish() -> None:
            for start in range(0, len(texts), 10):  # a message of ~10 notes per tick
                _publish_notes(app, topic, texts[start : start + 10], start)
                time.sleep(0.03)

        publisher = threading.Thread(target=publish)
        publisher.start()
        slow.read_slowly(4.0, pause=0.002)  # pings come due all along; this client answers them
        publisher.join()
        seen = []
        while (message := slow.recv(timeout=3)) is not None:
            seen += re.findall(r">(note \d+ [0-9a-f]+)</li>", message)
        assert slow.close_code not in (1002, 1007), "the stream was corrupted"
        assert seen and seen == texts[: len(seen)]  # whole notes, in order
    finally:
        slow.close()


def test_tls_served_by_the_app_itself_relays_from_the_socket_thread(app, tmp_path, two_tenants):
    """When the web process terminates TLS itself, the broadcaster cannot write the socket
    without blocking; such a socket is served by its own thread, with the same behaviour."""
    import ssl

    from services.live import tenant_topic
    from tests.conftest import LiveServer, self_signed_certificate

    cert, key = self_signed_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = LiveServer(app, ssl_context=context).start()
    alice, _ = two_tenants
    try:
        a = Browserless(server.url, ca_file=str(cert)).login(alice.email, PASSWORD)
        ws = a.open_socket(a.live_url())
        try:
            assert 'id="feed-list"' in ws.recv()
            texts = [f"note {n} over tls" for n in range(30)]
            _publish_notes(app, tenant_topic(alice.tenant_id, "feed"), texts)
            frames = receive_until(ws, lambda f: "note 29 over tls" in f)
            seen = [t for f in frames for t in re.findall(r">(note \d+ over tls)</li>", f)]
            assert seen == texts
            assert app.extensions["switchboard.live"].pages.peer_count() == 0  # not its socket
        finally:
            ws.close()
    finally:
        server.stop()


def test_pipelined_script_loads_itself_once_and_keeps_call_order(redis_url):
    """Redis that does not know the script (a restart, SCRIPT FLUSH) answers NOSCRIPT:
    the calls are sent again after loading it, every result in call order."""
    import uuid

    import redis
    from redis.exceptions import ResponseError

    from events.live import PipelinedScript
    from tests.conftest import redis_prefix

    client = redis.Redis.from_url(redis_url)
    key = redis_prefix() + "counter"
    # A text of its own, so no other test has loaded it.
    script = PipelinedScript(
        client, f"-- {uuid.uuid4()}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])"
    )
    try:
        assert client.script_exists(script.sha) == [False]
        assert script.run_many([([key], [1]), ([key], [2]), ([key], [3])]) == [1, 3, 6]
        assert client.script_exists(script.sha) == [True]
        assert script.run_many([([key], [10])]) == [16]
        broken = PipelinedScript(client, f"-- {uuid.uuid4()}\nreturn redis.call('NOPE')")
        with pytest.raises(ResponseError):
            broken.run_many([([key], [])])
    finally:
        client.delete(key)
        client.close()
