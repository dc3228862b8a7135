"""In a real browser: the visitor's transcript stays on screen, whatever the connection does.

The widget runs on a customer's site (another origin); the console is the live server.
"""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from models.chats import Chat, Message
from tests.browser import chromium, say, widget_page
from tests.fake_openai import FakeOpenAI, Script
from tests.test_browser_widget import _allow, host_site, shop  # noqa: F401 - fixtures

pytestmark = pytest.mark.browser

SHORT = "Our shop opens at nine."
LONG = " ".join(f"word{n}" for n in range(60)) + "."
W = "#switchboard-chat "


@pytest.fixture
def upstream(app):
    fake = FakeOpenAI(Script(reply=SHORT)).start()
    app.config.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="test-key")
    yield fake
    fake.stop()


def _saved(db, sender: str) -> list[Message]:
    db.session.expire_all()
    return db.session.scalars(
        select(Message).where(Message.sender == sender).order_by(Message.id)
    ).all()


def _wait(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def test_ending_the_chat_keeps_the_transcript_and_asks_for_a_rating_once(
    app,
    db,
    worker,
    live_server,
    upstream,
    shop,  # noqa: F811
):
    with host_site(live_server.url, shop.widget_key) as site, chromium() as browser:
        _allow(db, shop, site)
        page = widget_page(browser, site)
        say(page, "When are you open?")
        expect(page.locator(W + ".msg.assistant")).to_have_text(SHORT)
        page.locator(W + ".head button", has_text="End chat").click()
        # The conversation stays, with the rating under it.
        expect(page.locator(W + ".rate")).to_be_visible()
        expect(page.locator(W + ".msg.visitor")).to_have_text("When are you open?")
        expect(page.locator(W + ".msg.assistant")).to_have_text(SHORT)
        page.locator(W + ".rate button").nth(3).click()
        expect(page.locator(W + ".note", has_text="Thank you")).to_be_visible()
        expect(page.locator(W + ".rate")).to_be_hidden()

        # After a reload the rated chat is shown again, ended, and does not ask again.
        page.reload()
        page.locator(W + ".launcher").click()
        expect(page.locator(W + ".msg.assistant")).to_have_text(SHORT)
        expect(page.locator(W + ".note", has_text="rated it 4")).to_be_visible()
        expect(page.locator(W + ".rate")).to_be_hidden()

        # Writing again starts a new chat, visibly; the old one is not silently re-opened.
        say(page, "One more question")
        expect(page.locator(W + ".note.divider")).to_have_text("New conversation")
        expect(page.locator(W + ".msg.assistant")).to_have_count(2)
        expect(page.locator(W + ".msg.visitor")).to_have_text(
            ["When are you open?", "One more question"]
        )

        def chats() -> list[tuple]:
            db.session.expire_all()
            rows = db.session.scalars(select(Chat).order_by(Chat.id)).all()
            return [(c.status, c.satisfaction, c.message_count) for c in rows]

        # The reply's last delta can reach the page a moment before the reply is saved.
        deadline = time.monotonic() + 10
        while chats()[-1:] != [("active", None, 2)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert chats() == [("completed", 4, 2), ("active", None, 2)]


def test_a_message_typed_while_connecting_is_sent_once_connected(
    app,
    db,
    worker,
    live_server,
    upstream,
    shop,  # noqa: F811
):
    with host_site(live_server.url, shop.widget_key) as site, chromium() as browser:
        _allow(db, shop, site)
        context = browser.new_context()
        # The first connection is held back for a moment, as on a slow network.
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.add_init_script(
            """(() => {
              const Real = window.WebSocket;
              window.WebSocket = function (url, protocols) {
                const ws = new Real(url, protocols);
                const add = ws.addEventListener.bind(ws);
                ws.addEventListener = (type, fn, opts) => add(type, (event) => {
                  if (type !== "message") return fn(event);
                  setTimeout(() => fn(event), 1500);
                }, opts);
                return ws;
              };
              window.WebSocket.OPEN = Real.OPEN;
            })();"""
        )
        page.goto(site + "/")
        page.locator(W + ".launcher").click()
        say(page, "Are you there?")  # before the session is up
        expect(page.locator(W + ".note", has_text="Reconnecting")).to_have_count(0)
        expect(page.locator(W + ".msg.assistant")).to_have_text(SHORT)
        expect(page.locator(W + ".msg.visitor")).to_have_text("Are you there?")
        assert [m.content for m in _saved(db, "visitor")] == ["Are you there?"]


@pytest.fixture
def slow_upstream(app):
    fake = FakeOpenAI(Script(reply=LONG, chunk_delay=0.05)).start()
    app.config.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="test-key")
    yield fake
    fake.stop()


# The page's WebSocket, wrapped so the test can drop the connection and keep the widget from
# reconnecting for a while (its attempts then fail at once, as on a dead network).
CONTROLLED_SOCKETS = """(() => {
  const Real = window.WebSocket;
  window.__sockets = [];
  window.__offline = false;
  window.WebSocket = function (url, protocols) {
    const ws = new Real(window.__offline ? "ws://127.0.0.1:9/offline" : url, protocols);
    window.__sockets.push(ws);
    return ws;
  };
  window.WebSocket.OPEN = Real.OPEN;
  window.__dropConnection = () => {
    window.__offline = true;
    window.__sockets.forEach((ws) => ws.close());
  };
})();"""


def test_a_reply_that_finished_while_disconnected_shows_once_without_a_stop_button(
    app,
    db,
    worker,
    live_server,
    slow_upstream,
    shop,  # noqa: F811
):
    with host_site(live_server.url, shop.widget_key) as site, chromium() as browser:
        _allow(db, shop, site)
        page = browser.new_context().new_page()
        page.set_default_timeout(15_000)
        page.add_init_script(CONTROLLED_SOCKETS)
        page.goto(site + "/")
        page.locator(W + ".launcher").click()
        say(page, "Tell me a long story")
        reply = page.locator(W + ".msg.assistant").last
        expect(reply).to_contain_text("word3")
        expect(page.locator(W + ".stop")).to_be_visible()
        page.evaluate("window.__dropConnection()")
        assert "word59." not in reply.inner_text()  # it dropped mid-reply
        # The reply finishes and is saved while the widget is away; then it comes back.
        assert _wait(lambda: _saved(db, "assistant"), timeout=20)
        page.evaluate("window.__offline = false")
        expect(reply).to_have_text(LONG, timeout=30_000)
        expect(page.locator(W + ".msg.assistant")).to_have_count(1)
        expect(page.locator(W + ".stop")).to_be_hidden()


def test_a_stopped_reply_is_saved_and_shown_as_stopped(
    app,
    db,
    worker,
    live_server,
    slow_upstream,
    shop,  # noqa: F811
):
    with host_site(live_server.url, shop.widget_key) as site, chromium() as browser:
        _allow(db, shop, site)
        page = widget_page(browser, site)
        say(page, "Tell me a long story")
        reply = page.locator(W + ".msg.assistant").last
        expect(reply).to_contain_text("word3")
        page.locator(W + ".stop").click()
        expect(reply.locator(".interrupted")).to_contain_text("stopped")
        expect(page.locator(W + ".stop")).to_be_hidden()
        saved = _wait(lambda: _saved(db, "assistant"))
        assert saved and saved[0].interrupted == "stopped"
        assert "word59." not in saved[0].content
        # After a reload the saved reply still says it was stopped.
        page.reload()
        page.locator(W + ".launcher").click()
        expect(page.locator(W + ".msg.assistant .interrupted")).to_contain_text("stopped")
