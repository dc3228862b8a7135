"""Page frames are rendered only for topics an open page watches, and no page misses one
for it: not one that opens while a batch commits, nor one whose registration Redis lost."""

from __future__ import annotations

import time

import pytest

from tests.conftest import PASSWORD, Factory, LiveServer, make_app, prod_overrides, shut_down_app
from tests.helpers import Browserless, receive_until


@pytest.fixture
def watch_env(tmp_path, pg_database_url, private_redis):
    from extensions import db

    app = make_app(tmp_path, **prod_overrides(pg_database_url, private_redis.url))
    with app.app_context():
        db.drop_all()
        db.create_all()
    user = Factory(app).user(email="watch@ops.example")
    server = LiveServer(app).start()
    try:
        yield app, user, server
    finally:
        server.stop()
        shut_down_app(app)


def _live(app):
    return app.extensions["switchboard.live"]


def _stream_length(app, topic: str) -> int:
    bus = _live(app).bus
    return bus.redis.xlen(bus._key(topic))


def _frame(topic: str, text: str, rendered: list[str]):
    def render() -> str:
        rendered.append(text)
        return f'<div id="watch-test" hx-swap-oob="true">{text}</div>'

    return topic, f"watch-{text}", render


def _commit_frames(app, frames) -> None:
    from extensions import db
    from services.live import publish_if_watched

    with app.app_context():
        db.session.begin()
        publish_if_watched(frames)
        db.session.commit()


def test_only_the_topics_an_open_page_shows_are_rendered(watch_env):
    from services.live import tenant_topic

    app, user, server = watch_env
    feed, devices = tenant_topic(user.tenant_id, "feed"), tenant_topic(user.tenant_id, "devices")
    page = Browserless(server.url).login(user.email, PASSWORD)
    socket = page.open_socket(page.live_url("/"))  # the dashboard: its feed
    try:
        assert 'id="feed-list"' in socket.recv()  # the snapshot
        rendered: list[str] = []
        _commit_frames(app, [_frame(feed, "shown", rendered), _frame(devices, "nobody", rendered)])
        frames = receive_until(socket, lambda f: "shown" in f, timeout=10)
        assert any("shown" in f for f in frames)
        assert rendered == ["shown"]  # the devices card nobody looks at: not rendered
        assert _stream_length(app, devices) == 0
        # A devices page opens: its topic's next frame is rendered and reaches it.
        other = page.open_socket(page.live_url("/devices/"))
        try:
            other.recv()  # its snapshot
            _commit_frames(app, [_frame(devices, "now-watched", rendered)])
            frames = receive_until(other, lambda f: "now-watched" in f, timeout=10)
            assert any("now-watched" in f for f in frames)
        finally:
            other.close()
    finally:
        socket.close()


def test_a_page_that_opens_while_a_batch_commits_still_gets_its_frame(watch_env):
    """The attack on skipping: the check says nobody watches, a page registers and takes its
    snapshot (before the batch's commit, so without the change), and the batch commits. The
    frame must reach the page anyway."""
    from extensions import db
    from services.live import publish_if_watched, tenant_topic

    app, user, _server = watch_env
    topic = tenant_topic(user.tenant_id, "devices")
    hub = _live(app).hub
    rendered: list[str] = []
    with app.app_context():
        db.session.begin()
        publish_if_watched([_frame(topic, "late", rendered)])
        assert rendered == []  # nobody watched at the check
        page = hub.subscribe([topic], watch=True)  # the page opens (its snapshot comes next)
        try:
            db.session.commit()
            assert rendered == ["late"]
            assert _stream_length(app, topic) == 1
            frame = page.frames.get(timeout=10)
            assert frame.key == "watch-late"
        finally:
            page.close()
    # Nobody opened a page during the next batch: nothing is rendered after its commit.
    _commit_frames(app, [_frame(tenant_topic(user.tenant_id, "activity"), "alone", rendered)])
    assert rendered == ["late"]


def test_a_watch_redis_lost_brings_the_page_a_fresh_snapshot(watch_env):
    app, user, server = watch_env
    hub, bus = _live(app).hub, _live(app).bus
    hub.WATCH_RENEW_SECONDS = 0.3  # renewed often, so the loss is found quickly
    page = Browserless(server.url).login(user.email, PASSWORD)
    socket = page.open_socket(page.live_url("/"))
    try:
        assert 'id="feed-list"' in socket.recv()
        # Redis forgets the registrations (a failover, a flush): frames for the page were
        # skipped until its web process renewed them, so the page is sent its state again.
        bus.redis.delete(bus._watch_keys()[0])
        frames = receive_until(socket, lambda f: 'id="feed-list"' in f, timeout=10)
        assert any('id="feed-list"' in f for f in frames)
    finally:
        socket.close()


def test_the_watch_lasts_while_the_page_is_open_and_ends_after(watch_env):
    from services.live import tenant_topic

    app, user, server = watch_env
    hub, bus = _live(app).hub, _live(app).bus
    hub.WATCH_SECONDS, hub.WATCH_RENEW_SECONDS = 1.0, 0.3
    feed = tenant_topic(user.tenant_id, "feed")
    page = Browserless(server.url).login(user.email, PASSWORD)
    socket = page.open_socket(page.live_url("/"))
    try:
        socket.recv()
        for _ in range(4):  # well past the registration's own second: renewed
            time.sleep(0.5)
            assert feed in bus.watched([feed])[0]
    finally:
        socket.close()
    # Closed: no longer renewed, it runs out (and workers stop rendering for it).
    deadline = time.monotonic() + 10
    while feed in bus.watched([feed])[0] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert feed not in bus.watched([feed])[0]
