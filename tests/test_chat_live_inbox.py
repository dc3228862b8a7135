"""The operator's live inbox: everything the visitor says reaches the console without a reload;
and reply timeouts that fit a streamed answer.

Browser tests put a visitor (the widget on another origin) and an operator (/chats/<id>, the
chat list) side by side. The coalescer tests drive the process's broadcaster with real frames
through the real in-process hub and read what a page socket receives. The timeout tests talk
to the widget's real socket, with a local OpenAI-compatible server as the model.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import websocket
from playwright.sync_api import expect
from sqlalchemy import select

from events.fanout import Broadcaster, Wire, coalesce
from events.live import Frame
from models.chats import Chat, Message
from services import chats
from tests.browser import chromium, login_page, say, widget_page
from tests.chat_client import ChatClient
from tests.conftest import PASSWORD
from tests.fake_openai import FakeOpenAI, Script
from tests.test_browser_widget import _allow, host_site, shop  # noqa: F401 - fixtures

VISITOR_LINES = [
    "Hello there, I have a question",
    "My order has not arrived and I am furious about it",
    "It was supposed to come on Monday",
    "This is terrible service, really awful",
    "Thanks, that is great, I love it",
]


# ------------------------------------------------------------------ the coalescer, unit


def _frame(n: int, key: str, html: str) -> Frame:
    return Frame("t1:chat:1", f"{n}-0", key, html)


def test_coalescing_keeps_an_append_when_a_replace_of_the_same_message_follows():
    append = _frame(1, "append:message-7", "<li id=message-7>hi</li>")
    replace = _frame(2, "message-7", "<li id=message-7 hx-swap-oob=true>hi 😡</li>")
    assert coalesce([append, replace]) == [append, replace]


def test_coalescing_keeps_an_append_when_the_replace_came_first():
    replace = _frame(1, "message-7", "<li>hi 😡</li>")
    append = _frame(2, "append:message-7", "<li>hi</li>")
    # The replace follows the append it needs on the page.
    assert coalesce([replace, append]) == [append, replace]
    other = _frame(3, "message-8", "<li>other</li>")
    assert coalesce([replace, other, append]) == [other, append, replace]


def test_coalescing_merges_replaces_of_one_thing_and_never_appends():
    frames = [
        _frame(1, "chat-header-1", "count 1"),
        _frame(2, "append:message-1", "one"),
        _frame(3, "chat-header-1", "count 2"),
        _frame(4, "append:message-2", "two"),
        _frame(5, "append:message-2", "two"),  # the same append delivered twice
        _frame(6, "chat-header-1", "count 3"),
    ]
    assert [f.html for f in coalesce(frames)] == ["one", "two", "count 3"]


class _PageSocket:
    """What the broadcaster needs of a page's socket: a real connected socket and an event."""

    def __init__(self) -> None:
        self.sock, self.client = socket.socketpair()
        self.event = threading.Event()

    def received(self, until: str, timeout: float = 5.0) -> str:
        self.client.settimeout(0.2)
        data, deadline = b"", time.monotonic() + timeout
        while until.encode() not in data and time.monotonic() < deadline:
            try:
                data += self.client.recv(65536)
            except TimeoutError:
                pass
        return data.decode(errors="replace")


@pytest.mark.parametrize("gap", [0.0, 0.08])
@pytest.mark.parametrize("replace_first", [False, True])
def test_page_gets_every_new_message_and_its_update_whatever_the_order_and_timing(
    app, db, factory, gap, replace_first
):
    """The chat's live frames as the handlers publish them (a message's "created" append and
    its sentiment "updated" replace), through the real hub and broadcaster to a page socket."""
    from services import chat_live, chats
    from services.live import hub

    tenant = factory.tenant("Coalesce Co")
    chat = chats.start_chat(tenant.id, visitor_id="v" * 12, user_id=None, session_id="s")
    db.session.commit()
    messages = [chats.add_message(chat, "visitor", f"line {n}") for n in range(5)]
    db.session.commit()
    topic = chats.chat_topic(tenant.id, chat.id)
    broadcaster = Broadcaster(hub(), {"LIVE_SUBSCRIPTION_BUFFER": 100, "LIVE_COALESCE_MS": 50})
    page = _PageSocket()
    peer = broadcaster.attach(page, [topic], Wire())
    try:
        broadcaster.start(peer, "<snapshot/>")
        for message in messages:
            for updated in (True, False) if replace_first else (False, True):
                message.sentiment_label = "negative" if updated else None
                chat_live.publish_message(message, updated=updated)
                if gap:
                    time.sleep(gap)
        got = page.received(until=f'id="message-{messages[-1].id}" hx-swap-oob="true"')
        got += page.received(until="line 4</div>\n</li>\n</ol>", timeout=1)
        for message in messages:
            # The append (into the conversation) and the replace (the badge) both arrive.
            assert f'<li id="message-{message.id}" class=' in got, got
            assert f'<li id="message-{message.id}" hx-swap-oob="true"' in got, got
    finally:
        broadcaster.stop()
        broadcaster.detach(peer)
        page.sock.close()
        page.client.close()


# ------------------------------------------------------------------ in a browser

pytest_browser = pytest.mark.browser


@pytest.fixture
def upstream(app):
    fake = FakeOpenAI(Script(reply="Thanks for telling us; we will look into it.")).start()
    app.config.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="test-key")
    yield fake
    fake.stop()


@pytest.fixture
def operator(factory, shop):  # noqa: F811
    return factory.user(shop, role="agent", email="ops@bakery.example")


def _say(page, text: str) -> None:
    say(page, text)
    expect(page.locator("#switchboard-chat .msg.visitor", has_text=text)).to_have_count(1)


def _the_chat(db) -> Chat:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        db.session.expire_all()
        chat = db.session.scalar(select(Chat))
        if chat is not None:
            return chat
        time.sleep(0.05)
    raise AssertionError("the first message created no chat")


@pytest_browser
def test_operator_sees_every_visitor_message_and_the_count_live(
    app,
    db,
    worker,
    live_server,
    upstream,
    shop,  # noqa: F811
    operator,
):
    with host_site(live_server.url, shop.widget_key) as site, chromium() as browser:
        _allow(db, shop, site)
        visitor = widget_page(browser, site)
        _say(visitor, VISITOR_LINES[0])
        chat = _the_chat(db)
        ops = login_page(browser, live_server.url, operator.email, PASSWORD)
        ops.goto(f"{live_server.url}/chats/{chat.id}")
        ops.locator("#live").wait_for(state="attached")
        conversation = ops.locator(f"#conversation-{chat.id}")
        expect(conversation.locator(".msg-visitor")).to_have_count(1)
        expect(conversation.locator(".msg-assistant")).to_have_count(1)
        ops.wait_for_timeout(300)  # its socket is open and the snapshot applied

        for line in VISITOR_LINES[1:]:
            _say(visitor, line)
            expect(visitor.locator("#switchboard-chat .msg.assistant")).to_have_count(
                VISITOR_LINES.index(line) + 1
            )
        # Every visitor message is on the operator's page, in order, without a reload, with
        # its sentiment badge; the header counts them all.
        expect(conversation.locator(".msg-visitor .msg-body")).to_have_text(VISITOR_LINES)
        expect(conversation.locator(".msg-assistant")).to_have_count(5)
        furious = conversation.locator(".msg-visitor", has_text="furious")
        expect(furious.locator(".badge-sentiment-negative")).to_have_count(1)
        header = ops.locator(f"#chat-header-{chat.id}")
        expect(header.locator("dt:has-text('Messages') + dd")).to_have_text("10")


@pytest_browser
def test_operator_sees_the_visitor_typing(
    app,
    db,
    worker,
    live_server,
    upstream,
    shop,  # noqa: F811
    operator,
):
    with host_site(live_server.url, shop.widget_key) as site, chromium() as browser:
        _allow(db, shop, site)
        visitor = widget_page(browser, site)
        _say(visitor, VISITOR_LINES[0])
        chat = _the_chat(db)
        ops = login_page(browser, live_server.url, operator.email, PASSWORD)
        ops.goto(f"{live_server.url}/chats/{chat.id}")
        ops.locator("#live").wait_for(state="attached")
        ops.wait_for_timeout(300)
        typing = ops.locator(f"#chat-{chat.id}-visitor-typing")
        expect(typing).not_to_contain_text("typing")
        visitor.locator("#switchboard-chat textarea").press_sequentially("Where is my")
        expect(typing).to_contain_text("Visitor is typing")
        # The message itself replaces the indicator.
        visitor.locator("#switchboard-chat textarea").press("Enter")
        expect(ops.locator(f"#conversation-{chat.id} .msg-visitor")).to_have_count(2)
        expect(typing).not_to_contain_text("typing")


@pytest_browser
def test_chat_list_row_updates_live(
    app,
    db,
    worker,
    live_server,
    upstream,
    shop,  # noqa: F811
    operator,
):
    with host_site(live_server.url, shop.widget_key) as site, chromium() as browser:
        _allow(db, shop, site)
        ops = login_page(browser, live_server.url, operator.email, PASSWORD)
        ops.goto(f"{live_server.url}/chats/")
        ops.locator("#live").wait_for(state="attached")
        ops.wait_for_timeout(300)
        counts = {v: ops.locator(f"#view-count-{v}") for v in ("all", "mine", "unassigned")}
        expect(counts["all"]).to_have_text("0")
        visitor = widget_page(browser, site)
        _say(visitor, VISITOR_LINES[0])
        chat = _the_chat(db)
        row = ops.locator(f"#chat-row-{chat.id}")
        expect(row).to_contain_text(VISITOR_LINES[0][:20])  # its title
        # The views' counts follow without a reload: a new chat, nobody's yet.
        expect(counts["all"]).to_have_text("1")
        expect(counts["unassigned"]).to_have_text("1")
        expect(counts["mine"]).to_have_text("0")
        _say(visitor, VISITOR_LINES[1])
        expect(visitor.locator("#switchboard-chat .msg.assistant")).to_have_count(2)
        expect(row.locator("td.message-count")).to_have_text("4")
        expect(row.locator("td.last-message")).to_contain_text("Thanks for telling us")
        expect(row.locator(".badge-sentiment-negative")).to_have_count(1)
        # A lead hands the chat to this operator (elsewhere): Mine and Unassigned follow.
        chats.assign(db.session.get(Chat, chat.id), operator.id)
        db.session.commit()
        expect(counts["mine"]).to_have_text("1")
        expect(counts["unassigned"]).to_have_text("0")
        expect(counts["all"]).to_have_text("1")


# ------------------------------------------------------------------ timeouts that fit streaming
# Over the widget's real socket, against the local OpenAI-compatible server.

STEADY = " ".join(f"part{n}" for n in range(16)) + "."


@pytest.fixture
def model(app):
    fake = FakeOpenAI(Script(reply=STEADY)).start()
    app.config.update(
        OPENAI_BASE_URL=fake.base_url,
        OPENAI_API_KEY="test-key",
        CHAT_FIRST_TOKEN_TIMEOUT=3.0,
        CHAT_STREAM_IDLE_TIMEOUT=1.0,
    )
    yield fake
    fake.stop()


@pytest.fixture
def widget(db, live_server, shop):  # noqa: F811
    """Opens widget sockets (as a page on an allowed origin would)."""
    site = "http://shop.example"
    _allow(db, shop, site)
    clients: list[ChatClient] = []

    def open_client() -> ChatClient:
        clients.append(ChatClient(live_server.url, shop.widget_key, site))
        return clients[-1]

    yield open_client
    for client in clients:
        client.close()


def _ask(widget, text: str = "Tell me everything"):
    client = widget()
    client.send("session_init")
    client.expect("session")
    client.send("message", content=text)
    client.expect("message")
    return client


def _saved_reply(app) -> Message:
    from extensions import db

    with app.app_context():
        reply = db.session.scalar(select(Message).where(Message.sender == "assistant"))
        db.session.expunge_all()
        return reply


def _no_error(client, timeout: float = 0.5) -> None:
    """No error frame came with the reply, nor comes within `timeout`."""
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            client.recv(left)
    except websocket.WebSocketTimeoutException:
        pass
    assert [f for f in client.frames if f.get("type") == "error"] == []


def test_a_slow_but_steady_reply_is_not_cut(app, worker, model, widget):
    """Four seconds of steady text: longer than the first-token timeout, and than the old
    whole-reply CHAT_RESPONSE_TIMEOUT a deployment may still set, but never quiet for long."""
    model.script.chunk_delay = 0.25
    app.config["CHAT_RESPONSE_TIMEOUT"] = 2.0
    client = _ask(widget)
    deltas, done = client.collect_reply(timeout=20)
    assert "".join(d["text"] for d in deltas) == STEADY
    assert done["message"]["interrupted"] is None
    _no_error(client)
    saved = _saved_reply(app)
    assert saved.content == STEADY and saved.interrupted is None


def test_a_reply_that_goes_quiet_is_saved_and_labelled_cut(app, worker, model, widget):
    model.script.stall_after_tokens = 3
    model.script.stall_mid_seconds = 30
    client = _ask(widget)
    started = time.monotonic()
    deltas, done = client.collect_reply(timeout=20)
    assert time.monotonic() - started < 5  # the idle timeout (1 s), not the model's 30 s
    text = "".join(d["text"] for d in deltas)
    assert text and STEADY.startswith(text) and text != STEADY
    # The widget is told the reply was cut (not that the assistant is unavailable) ...
    assert done["message"]["interrupted"] == "cut"
    _no_error(client)
    # ... and the stored message says so too.
    saved = _saved_reply(app)
    assert saved.content == text and saved.interrupted == "cut"


def test_no_first_token_in_time_is_reported_unavailable(app, worker, model, widget):
    model.script.stall_seconds = 30
    client = _ask(widget)
    started = time.monotonic()
    _, done = client.collect_reply(timeout=20)
    assert time.monotonic() - started < 6  # the first-token timeout (3 s)
    assert "unavailable" in done["message"]["html"]
    assert client.expect("error")["code"] == "assistant_unavailable"


def test_a_429_waits_as_long_as_the_provider_asks(app, worker, model, widget):
    model.script.fail_first, model.script.fail_status, model.script.retry_after = 1, 429, "1"
    client = _ask(widget)
    deltas, done = client.collect_reply(timeout=20)
    assert "".join(d["text"] for d in deltas) == STEADY
    assert len(model.records) == 2
    assert model.records[1].at - model.records[0].at >= 0.95


def test_a_429_asking_longer_than_the_first_token_timeout_gives_up_at_once(
    app, worker, model, widget
):
    model.script.fail_first, model.script.fail_status, model.script.retry_after = 99, 429, "60"
    client = _ask(widget)
    started = time.monotonic()
    _, done = client.collect_reply(timeout=20)
    assert time.monotonic() - started < 2.5  # no waiting for a retry that cannot be in time
    assert "unavailable" in done["message"]["html"]
    assert len(model.records) == 1
