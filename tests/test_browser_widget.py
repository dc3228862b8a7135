"""In a real browser: the chat widget embedded in someone else's website.

The host page is served by its own HTTP server on another port, i.e. another origin than the
console; it loads `/static/widget.js` from the console with one script tag, exactly as a
customer would paste it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from models.accounts import Tenant
from models.chats import Agent, Message
from tests.browser import chromium, say, widget_page
from tests.fake_openai import FakeOpenAI, Script

pytestmark = pytest.mark.browser

REPLY = "Our shop opens at nine and closes at six, every day except Sunday."

HOST_PAGE = """<!doctype html>
<html><head><title>Bakery</title>
<style>button { background: rgb(255, 0, 0) !important; font-size: 40px; }
div { color: green; }</style>
</head><body>
<h1>Our bakery</h1>
<script src="{console}/static/widget.js" data-key="{key}" defer></script>
</body></html>"""


@contextmanager
def host_site(console_url: str, key: str) -> Iterator[str]:
    """A customer's website on its own origin, embedding the widget."""
    page = HOST_PAGE.replace("{console}", console_url).replace("{key}", key).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def upstream(app):
    # Slow enough per token that the page can be seen mid-stream.
    fake = FakeOpenAI(Script(reply=REPLY, chunk_delay=0.12)).start()
    app.config.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="test-key")
    yield fake
    fake.stop()


@pytest.fixture
def shop(app, db, factory):
    tenant = factory.tenant("Bakery")
    db.session.add(Agent(tenant_id=tenant.id, name="Baker", model="fake-model", is_default=True))
    db.session.commit()
    return db.session.get(Tenant, tenant.id)


def _allow(db, tenant: Tenant, origin: str) -> None:
    tenant = db.session.get(Tenant, tenant.id)
    tenant.allowed_origins = origin
    db.session.commit()


def test_widget_on_another_origin_streams_the_reply(app, db, worker, live_server, upstream, shop):
    with host_site(live_server.url, shop.widget_key) as site, chromium() as browser:
        assert site != live_server.url  # another origin than the console
        _allow(db, shop, site)
        page = browser.new_context().new_page()
        page.set_default_timeout(15_000)
        page.goto(site + "/")
        launcher = page.locator("#switchboard-chat .launcher")
        # The host page's `button { background: red !important }` does not reach into the widget.
        expect(launcher).to_have_css("background-color", "rgb(47, 91, 234)")
        launcher.click()
        page.locator("#switchboard-chat textarea").fill("When are you open?")
        page.locator("#switchboard-chat textarea").press("Enter")
        expect(page.locator("#switchboard-chat .msg.visitor")).to_have_text("When are you open?")

        reply = page.locator("#switchboard-chat .msg.assistant").last
        # Mid-stream: part of the reply is on screen, not all of it.
        expect(reply).to_contain_text("Our shop")
        partial = reply.inner_text()
        assert partial and len(partial) < len(REPLY)
        expect(reply).to_have_text(REPLY)
        # The page never navigated; the saved reply is the streamed one.
        assert page.url == site + "/"

        def saved() -> list[str]:
            db.session.expire_all()
            return db.session.scalars(
                select(Message.content).where(Message.sender == "assistant")
            ).all()

        # The last delta can reach the page a moment before the reply is committed.
        deadline = time.monotonic() + 10
        while not saved() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert saved() == [REPLY]


def test_widget_on_an_origin_not_allowed_says_so(app, db, live_server, shop):
    with host_site(live_server.url, shop.widget_key) as site, chromium() as browser:
        _allow(db, shop, "https://somewhere-else.example")
        page = browser.new_context().new_page()
        page.set_default_timeout(15_000)
        page.goto(site + "/")
        page.locator("#switchboard-chat .launcher").click()
        expect(page.locator("#switchboard-chat .note.error")).to_have_text(
            "Chat is not available on this site."
        )


@pytest.mark.parametrize("events_delay_ms", [0, 250], ids=["events-at-once", "events-delayed"])
def test_operator_watches_a_phone_visitor_live(
    app, db, worker, live_server, upstream, shop, factory, events_delay_ms
):
    """A visitor on a phone writes something hostile; the operator, on the inbox and then in
    the chat, sees the new chat, the unread count, the visitor's words as text and the reply
    as it streams, without reloading. The same when the message's events are held back until
    the reply has started (CHAT_EVENTS_DELAY_MS, 20 ms in production; longer here)."""
    from tests.browser import login_page
    from tests.conftest import PASSWORD

    app.config["CHAT_EVENTS_DELAY_MS"] = events_delay_ms
    operator = factory.user(shop, role="agent")
    hostile = '<img src=x onerror="window.pwned=1">Where is my bread?'
    with host_site(live_server.url, shop.widget_key) as site, chromium() as browser:
        _allow(db, shop, site)
        console = login_page(browser, live_server.url, operator.email, PASSWORD)
        frames: list = []
        console.on("websocket", lambda ws: ws.on("framereceived", lambda data: frames.append(data)))
        console.goto(live_server.url + "/chats/")
        while not frames:  # the inbox's live snapshot: from here on it follows the tenant
            console.wait_for_timeout(50)

        phone = widget_page(browser, site, phone=True)
        say(phone, hostile)
        expect(phone.locator("#switchboard-chat .msg.visitor")).to_have_text(hostile)
        width = phone.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1]  # the open widget fits the phone

        # The inbox: the new chat's row and the unread count arrive by themselves.
        row = console.locator("tr[id^=chat-row-]").first
        expect(row).to_contain_text("Where is my bread?")
        expect(console.locator("#chats-unread")).to_have_text("1")
        # The inbox was empty when it loaded: the table shows itself, the empty note goes.
        expect(row).to_be_visible()
        expect(console.locator("#chat-list .empty")).to_be_hidden()
        row.locator("a").click()
        expect(console.locator(".msg.msg-visitor .msg-body")).to_have_text(hostile)
        expect(console.locator(".msg.msg-assistant").last).to_contain_text(REPLY)

        # A second question while the operator watches: message and reply stream in.
        say(phone, "And on Sunday?")
        expect(console.locator(".msg.msg-visitor .msg-body").last).to_have_text("And on Sunday?")
        streaming = console.locator(".streaming-slot .msg-assistant.streaming")
        expect(streaming).to_contain_text("Our shop")
        expect(console.locator(".msg.msg-assistant")).to_have_count(2)
        expect(console.locator(".msg.msg-assistant").last).to_contain_text(REPLY)
        expect(phone.locator("#switchboard-chat .msg.assistant")).to_have_count(2)
        expect(phone.locator("#switchboard-chat .msg.assistant").last).to_have_text(REPLY)
        # Nothing the visitor wrote ran, on either side.
        assert phone.evaluate("window.pwned") is None
        assert console.evaluate("window.pwned") is None
        assert console.locator(".msg-visitor img").count() == 0


def test_both_sides_see_the_assistant_typing_while_the_model_is_slow_to_start(
    app, db, worker, live_server, upstream, shop, factory
):
    """The typing frame goes out with the reply's first round of frames, not from the reply's
    own thread: while the model has not said a word, the visitor on a phone and the operator
    watching the chat must still see that the assistant is typing, and then the reply."""
    from tests.browser import login_page
    from tests.conftest import PASSWORD

    upstream.script.stall_seconds = 2.0  # the model's first byte comes late
    operator = factory.user(shop, role="agent")
    with host_site(live_server.url, shop.widget_key) as site, chromium() as browser:
        _allow(db, shop, site)
        phone = widget_page(browser, site, phone=True)
        say(phone, "Is the rye bread in?")
        typing = phone.locator("#switchboard-chat .note", has_text="Assistant is typing")
        expect(typing).to_be_visible(timeout=1_500)  # well before the model answers
        assert phone.locator("#switchboard-chat .msg.assistant").count() == 0
        expect(phone.locator("#switchboard-chat .msg.assistant")).to_have_text(REPLY)
        expect(typing).to_have_count(0)

        # The operator opens the chat and watches the next question.
        console = login_page(browser, live_server.url, operator.email, PASSWORD)
        chat_id = db.session.scalar(select(Message.chat_id).order_by(Message.id.desc()))
        console.goto(f"{live_server.url}/chats/{chat_id}")
        expect(console.locator(".msg.msg-assistant")).to_have_count(1)
        console.wait_for_timeout(500)  # the page's live socket follows the chat
        say(phone, "And the sourdough?")
        slot = console.locator(".streaming-slot")
        expect(slot).to_contain_text("Assistant is typing", timeout=1_500)
        expect(typing).to_be_visible(timeout=1_500)
        expect(console.locator(".msg.msg-assistant")).to_have_count(2)
        expect(console.locator(".msg.msg-assistant").last).to_contain_text(REPLY)
        expect(phone.locator("#switchboard-chat .msg.assistant")).to_have_count(2)
