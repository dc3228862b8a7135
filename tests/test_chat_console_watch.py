"""A reply's console fragments (its message in the chat's page, the chat's list row and page
header) are rendered for open pages only, over the Redis bus: an operator who has the chat or
the list open sees the reply end live, and a reply nobody watches costs no rendering."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from models.chats import Chat, Message
from tests.conftest import PASSWORD, Factory
from tests.fake_openai import FakeOpenAI, Script
from tests.helpers import Browserless, receive_until
from tests.test_chat_faults import REPLY, _prod_chat_app, chat_stack
from tests.test_chat_socket import _open_chat


@pytest.fixture
def upstream():
    fake = FakeOpenAI(Script(reply=REPLY)).start()
    yield fake
    fake.stop()


@pytest.fixture
def console_env(tmp_path, pg_database_url, private_redis, upstream):
    from extensions import db
    from models.accounts import Tenant

    app, key = _prod_chat_app(tmp_path, pg_database_url, private_redis, upstream)
    with app.app_context():
        tenant = db.session.scalar(select(Tenant).where(Tenant.widget_key == key))
        db.session.expunge(tenant)
    operator = Factory(app).user(tenant, role="agent", email="operator@shop.example")
    with chat_stack(app, key) as (server, connect):
        yield app, server, operator, connect


def _frames(app, topic: str) -> list[dict]:
    bus = app.extensions["switchboard.live"].bus
    return [json.loads(fields[b"d"]) for _id, fields in bus.redis.xrange(bus._key(topic))]


def _settle(app, *topics: str, quiet: float = 0.6, most: float = 15.0) -> None:
    """Wait until the topics have had no new frame for `quiet` seconds: the handlers of
    what came before (the visitor message's sentiment badge updates the chat's header) are
    done and cannot land among the frames a test counts."""
    import time

    bus = app.extensions["switchboard.live"].bus
    lengths, since, give_up = None, time.monotonic(), time.monotonic() + most
    while time.monotonic() < give_up:
        now = [bus.redis.xlen(bus._key(topic)) for topic in topics]
        if now != lengths:
            lengths, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


def _chat_pk(app) -> int:
    from extensions import db

    with app.app_context():
        return db.session.scalar(select(Chat.id).order_by(Chat.id.desc()).limit(1))


def test_an_operator_who_opens_the_chat_mid_reply_sees_it_end_live(console_env, upstream):
    """The person's way: a visitor asks, the assistant is answering, and an operator opens
    the chat and the chat list meanwhile. Both pages show the reply's end without a reload."""
    app, server, operator, connect = console_env
    upstream.script.tokens_per_second = 20  # 41 tokens: two seconds of reply
    visitor, _chat_id = _open_chat(connect, "Tell me everything.")
    first = visitor.expect("delta")  # the reply is streaming
    assert first["seq"] == 1
    pk = _chat_pk(app)
    console = Browserless(server.url).login(operator.email, PASSWORD)
    chat_page = console.open_socket(console.live_url(f"/chats/{pk}"))
    chat_list = console.open_socket(console.live_url("/chats/"))
    try:
        assert "Tell me everything." in chat_page.recv()  # the page's snapshot
        assert "view-count-unassigned" in chat_list.recv()  # its snapshot
        visitor.collect_reply()
        with app.app_context():
            from extensions import db

            saved = db.session.scalar(select(Message.id).where(Message.sender == "assistant"))
        # The saved message itself (not the streaming copy) joins the conversation.
        shown = f'id="message-{saved}" class="msg msg-assistant"'
        frames = receive_until(chat_page, lambda f: shown in f)
        assert any(shown in f and "word39." in f for f in frames)
        rows = receive_until(chat_list, lambda f: f"chat-row-{pk}" in f and "word0 word1" in f)
        assert any("word0 word1" in f for f in rows)
    finally:
        chat_page.close()
        chat_list.close()


def test_a_reply_nobody_watches_renders_nothing_for_the_console(console_env):
    """No page shows the chat or the list: the reply's end publishes the widget's `done`
    frame (with the whole message) and no console fragment. Once a page watches, they come."""
    from extensions import db
    from services.chat_live import ReplyStream
    from services.chats import chat_topic
    from services.live import tenant_topic

    app, _server, operator, connect = console_env
    visitor, _chat_id = _open_chat(connect, "Hello?")
    visitor.collect_reply()
    pk = _chat_pk(app)
    topic, rows = chat_topic(operator.tenant_id, pk), tenant_topic(operator.tenant_id, "chats")
    hub = app.extensions["switchboard.live"].hub
    _settle(app, topic, rows)

    def end_a_reply(reply_id: str, text: str) -> tuple[list[dict], list[dict]]:
        with app.app_context():
            asked = db.session.scalar(select(Message).where(Message.chat_id == pk).limit(1))
            message = Message(
                tenant_id=operator.tenant_id,
                chat_id=pk,
                sender="assistant",
                content=text,
                in_response_to_id=asked.id,
            )
            db.session.add(message)
            db.session.commit()
            before = len(_frames(app, topic)), len(_frames(app, rows))
            stream = ReplyStream(operator.tenant_id, pk, reply_id)
            stream.delta(text)
            stream.done(message, usage=None)
        return _frames(app, topic)[before[0] :], _frames(app, rows)[before[1] :]

    on_chat, on_list = end_a_reply("r-unwatched", "Nobody reads this live.")
    (done,) = [f for f in on_chat if f["key"] == "done-r-unwatched"]
    assert done["json"]["message"]["html"]  # the widget gets the whole message
    assert "html" not in done  # the console's copy: nobody to show it to
    assert not [f for f in on_chat if f["key"].startswith("chat-header-")]
    assert on_list == []

    page = hub.subscribe([topic, rows], watch=True)  # an operator opens the chat and list
    try:
        on_chat, on_list = end_a_reply("r-watched", "Somebody reads this live.")
        (done,) = [f for f in on_chat if f["key"] == "done-r-watched"]
        assert "Somebody reads this live." in done["html"]
        assert [f for f in on_chat if f["key"] == f"chat-header-{pk}"]
        assert [f["key"] for f in on_list] == [f"chat-row-{pk}"]
    finally:
        page.close()


@pytest.mark.browser
def test_in_a_browser_over_redis_the_operator_sees_replies_end_watched_or_not(
    console_env, upstream
):
    """Chromium, over the Redis bus: a phone visitor's first reply ends with no operator
    looking (no console fragments rendered); the operator opens the chat afterwards and sees
    it; a second, hostile question while the operator watches streams in and ends as the
    saved message, once, with the streaming copy gone."""
    from playwright.sync_api import expect

    from extensions import db
    from models.accounts import Tenant
    from tests.browser import chromium, login_page, say, widget_page
    from tests.test_browser_widget import host_site

    app, server, operator, _connect = console_env
    upstream.script.tokens_per_second = 20  # two seconds a reply
    with app.app_context():
        tenant = db.session.get(Tenant, operator.tenant_id)
        key = tenant.widget_key
    with host_site(server.url, key) as site, chromium() as browser:
        with app.app_context():
            db.session.get(Tenant, operator.tenant_id).allowed_origins = site
            db.session.commit()
        phone = widget_page(browser, site, phone=True)
        say(phone, "Hello there")
        expect(phone.locator("#switchboard-chat .msg.assistant")).to_have_text(REPLY)

        console = login_page(browser, server.url, operator.email, PASSWORD)
        console.goto(server.url + f"/chats/{_chat_pk(app)}")
        expect(console.locator(".msg.msg-assistant")).to_have_count(1)
        expect(console.locator(".msg.msg-assistant")).to_contain_text("word39.")

        say(phone, '<img src=x onerror="window.pwned=1">And again?')
        expect(console.locator(".msg.msg-visitor .msg-body").last).to_have_text(
            '<img src=x onerror="window.pwned=1">And again?'
        )
        streaming = console.locator(".streaming-slot .msg-assistant.streaming")
        expect(streaming).to_contain_text("word0")
        expect(console.locator(".msg.msg-assistant:not(.streaming)")).to_have_count(2)
        expect(console.locator(".msg.msg-assistant:not(.streaming)").last).to_contain_text(
            "word39."
        )
        expect(streaming).to_have_count(0)
        expect(phone.locator("#switchboard-chat .msg.assistant")).to_have_count(2)
        assert console.evaluate("window.pwned") is None
        assert phone.evaluate("window.pwned") is None
