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
from tests.browser import chromium
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
