"""An open /ws/live page that misses frames notices: each topic's frames are numbered on the
bus, and the relay answers a gap in the numbers with a fresh snapshot (issue 18)."""

from __future__ import annotations

import pytest

from tests.conftest import PASSWORD, Factory, LiveServer, make_app, prod_overrides, shut_down_app
from tests.helpers import Browserless, receive_until


def _frame(text: str) -> str:
    from events.live import encode

    return encode(f"gap-test-{text}", html=f'<div id="gap-test" hx-swap-oob="true">{text}</div>')


@pytest.fixture
def page_env(tmp_path, pg_database_url, private_redis):
    from extensions import db

    app = make_app(tmp_path, **prod_overrides(pg_database_url, private_redis.url))
    with app.app_context():
        db.drop_all()
        db.create_all()
    user = Factory(app).user(email="gaps@ops.example")
    server = LiveServer(app).start()
    page = Browserless(server.url).login(user.email, PASSWORD)
    socket = page.open_socket(page.live_url())
    assert 'id="feed-list"' in socket.recv()  # the snapshot
    try:
        yield app, user, socket, private_redis
    finally:
        socket.close()
        server.stop()
        shut_down_app(app)


def _bus_and_topic(app, user):
    from services.live import tenant_topic

    return app.extensions["switchboard.live"].bus, tenant_topic(user.tenant_id, "feed")


def test_in_order_frames_bring_no_snapshot(page_env):
    app, user, socket, _ = page_env
    bus, topic = _bus_and_topic(app, user)
    for n in range(3):
        bus.publish(topic, _frame(f"in order {n}"))
    frames = receive_until(socket, lambda f: "in order 2" in f, timeout=10)
    assert not any('id="feed-list"' in f for f in frames)


def test_a_lost_frame_brings_a_fresh_snapshot(page_env):
    app, user, socket, _ = page_env
    bus, topic = _bus_and_topic(app, user)
    bus.publish(topic, _frame("first"))
    receive_until(socket, lambda f: "first" in f, timeout=10)
    # A frame numbered but never written (its publisher died between the two): the next
    # frame's number skips one.
    bus.redis.incr(bus._number_key(topic))
    bus.publish(topic, _frame("after the gap"))
    frames = receive_until(socket, lambda f: 'id="feed-list"' in f, timeout=10)
    assert any('id="feed-list"' in f for f in frames)


def test_redis_restarted_empty_brings_a_fresh_snapshot(page_env):
    app, user, socket, redis = page_env
    bus, topic = _bus_and_topic(app, user)
    bus.publish(topic, _frame("before"))
    receive_until(socket, lambda f: "before" in f, timeout=10)
    redis.stop()
    redis.start()  # empty: frames published meanwhile (none reached the page) are gone
    frames = receive_until(socket, lambda f: 'id="feed-list"' in f, timeout=20)
    assert any('id="feed-list"' in f for f in frames)
