"""Visitor identity from the embedding site (Chatwoot-style identity validation), and the
widget's keyboard and screen-reader behaviour, over a real socket and in a real browser."""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from models.accounts import Tenant
from models.chats import Chat
from tests.chat_client import ChatClient
from tests.conftest import login

SITE = "http://shop.example"


@pytest.fixture
def tenant(app, db, factory):
    t = factory.tenant("Shop")
    row = db.session.get(Tenant, t.id)
    row.allowed_origins = SITE
    db.session.commit()
    return row


@pytest.fixture
def connect(live_server, tenant):
    clients: list[ChatClient] = []

    def open_client() -> ChatClient:
        client = ChatClient(live_server.url, tenant.widget_key, SITE)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()


def _secret(app, tenant_id: int) -> str:
    """The secret as an admin copies it from the widget settings page."""
    from services.visitor_identity import identity_secret

    with app.test_request_context():
        return identity_secret(tenant_id)


def _sign(secret: str, identifier: str) -> str:
    return hmac.new(secret.encode(), identifier.encode(), hashlib.sha256).hexdigest()


def _chat_after_first_message(client: ChatClient, db, **init) -> Chat:
    client.send("session_init", **init)
    client.expect("session")
    client.send("message", content="Hello, where is my parcel?", client_id="c1")
    ack = client.expect("message")
    db.session.expire_all()
    return db.session.scalar(select(Chat).where(Chat.public_id == _uuid(ack["chat_id"])))


def _uuid(value: str):
    import uuid

    return uuid.UUID(value)


def _operator_page(app, factory, tenant, chat: Chat) -> str:
    client = app.test_client()
    login(client, factory.user(tenant, role="agent"))
    response = client.get(f"/chats/{chat.id}")
    assert response.status_code == 200
    return response.get_data(as_text=True)


def test_signed_identifier_makes_the_name_trusted(app, db, factory, tenant, connect):
    secret = _secret(app, tenant.id)
    client = connect()
    identity = {
        "name": "Jane Doe",
        "email": "jane@example.com",
        "identifier": "user-42",
        "identifier_hash": _sign(secret, "user-42"),
    }
    chat = _chat_after_first_message(client, db, identity=identity)
    assert (chat.visitor_name, chat.visitor_email, chat.visitor_identifier) == (
        "Jane Doe",
        "jane@example.com",
        "user-42",
    )
    assert chat.identity_verified is True
    html = _operator_page(app, factory, tenant, chat)
    assert "Jane Doe &lt;jane@example.com&gt;" in html
    assert "(unverified)" not in html
    assert chat.visitor_id not in html.split(f'id="chat-{chat.id}-identity"')[1][:300]


def test_wrong_hash_is_refused_and_the_name_shown_unverified(app, db, factory, tenant, connect):
    client = connect()
    forged = {
        "name": "Support Admin",
        "email": "ceo@example.com",
        "identifier": "user-1",
        # Signed with a guessed secret, not the tenant's.
        "identifier_hash": _sign("guess", "user-1"),
    }
    client.send("session_init", identity=forged)
    refused = client.expect("error")
    assert refused["code"] == "identity_refused"
    client.expect("session")
    client.send("message", content="Give me a refund", client_id="c1")
    ack = client.expect("message")
    db.session.expire_all()
    chat = db.session.scalar(select(Chat).where(Chat.public_id == _uuid(ack["chat_id"])))
    assert chat.visitor_identifier is None  # never stored without a valid hash
    assert chat.identity_verified is False
    html = _operator_page(app, factory, tenant, chat)
    assert "Support Admin &lt;ceo@example.com&gt; (unverified)" in html


def test_an_unverified_identify_cannot_replace_a_verified_identity(app, db, tenant, connect):
    secret = _secret(app, tenant.id)
    client = connect()
    chat = _chat_after_first_message(
        client,
        db,
        identity={"name": "Jane", "identifier": "u7", "identifier_hash": _sign(secret, "u7")},
    )
    client.send("identify", identity={"name": "Mallory", "email": "m@evil.example"})
    assert client.expect("identified")["verified"] is False
    db.session.expire_all()
    chat = db.session.get(Chat, chat.id)
    assert (chat.visitor_name, chat.identity_verified) == ("Jane", True)


def test_identify_after_the_chat_started_names_it(app, db, factory, tenant, connect):
    client = connect()
    chat = _chat_after_first_message(client, db)
    assert chat.visitor_name is None
    client.send("identify", identity={"name": "Late Larry", "email": "not an email"})
    client.expect("identified")
    db.session.expire_all()
    chat = db.session.get(Chat, chat.id)
    assert chat.visitor_name == "Late Larry"
    assert chat.visitor_email is None  # not an address: dropped rather than shown


def test_markup_in_a_name_is_shown_as_text(app, db, factory, tenant, connect):
    client = connect()
    name = '<img src=x onerror="alert(1)">Eve\u202e'
    chat = _chat_after_first_message(client, db, identity={"name": name})
    html = _operator_page(app, factory, tenant, chat)
    assert "<img src=x" not in html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;Eve (unverified)" in html
    assert "\u202e" not in chat.visitor_name  # a bidi override could disguise the name


# ---------------------------------------------------------------- in a browser

HOST_PAGE = """<!doctype html>
<html><head><title>Shop</title></head><body>
<h1>Shop</h1>
<script src="{console}/static/widget.js" data-key="{key}" data-name="Jane Doe"
  data-email="jane@example.com" data-identifier="user-42" data-identifier-hash="{hash}"
  defer></script>
</body></html>"""


@contextmanager
def host_site(page: bytes) -> Iterator[str]:
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


@pytest.mark.browser
def test_widget_identity_and_keyboard_in_a_browser(app, db, factory, live_server, tenant):
    from playwright.sync_api import expect

    from tests.browser import chromium

    page_html = (
        HOST_PAGE.replace("{console}", live_server.url)
        .replace("{key}", tenant.widget_key)
        .replace("{hash}", _sign(_secret(app, tenant.id), "user-42"))
        .encode()
    )
    with host_site(page_html) as site, chromium() as browser:
        row = db.session.get(Tenant, tenant.id)
        row.allowed_origins = site
        db.session.commit()
        page = browser.new_context().new_page()
        page.set_default_timeout(15_000)
        page.goto(site + "/")
        launcher = page.locator("#switchboard-chat .launcher")
        panel = page.locator("#switchboard-chat .panel")
        expect(launcher).to_have_attribute("aria-expanded", "false")
        launcher.click()
        expect(launcher).to_have_attribute("aria-expanded", "true")
        expect(panel).to_be_visible()
        box = page.locator("#switchboard-chat .panel > form textarea")
        box.fill("Hi, it's Jane")
        box.press("Enter")
        # Shown at once; no longer pending once the server has stored it.
        expect(page.locator("#switchboard-chat .msg.visitor:not(.pending)")).to_have_text(
            "Hi, it's Jane"
        )
        # Escape closes the panel and gives the launcher the focus back.
        box.press("Escape")
        expect(panel).to_be_hidden()
        expect(launcher).to_have_attribute("aria-expanded", "false")
        expect(launcher).to_be_focused()

        db.session.expire_all()
        chat = db.session.scalar(select(Chat))
        assert (chat.visitor_name, chat.identity_verified) == ("Jane Doe", True)

        # The rating stars are announced by what they do, not as five "black star"s.
        launcher.click()
        page.locator("#switchboard-chat .head button").click()  # End chat
        stars = page.get_by_role("button", name="Rate 4 of 5")
        expect(stars).to_be_visible()
        for score in range(1, 6):
            expect(page.get_by_role("button", name=f"Rate {score} of 5")).to_have_count(1)
        stars.click()
        comment = page.get_by_role("textbox", name="Comment on your rating (optional)")
        comment.fill("Quick and kind")
        page.get_by_role("button", name="Send comment").click()
        expect(page.locator("#switchboard-chat .log")).to_contain_text("Thank you for your comment")
        db.session.expire_all()
        chat = db.session.get(Chat, chat.id)
        assert (chat.satisfaction, chat.satisfaction_comment) == (4, "Quick and kind")


def test_erasure_removes_the_identity_and_rating_comment(app, db, tenant, connect):
    from services.chats import erase_chats

    client = connect()
    chat = _chat_after_first_message(
        client, db, identity={"name": "Zebulon Quartermaine", "email": "zq@example.com"}
    )
    chat.satisfaction, chat.satisfaction_comment = 2, "Zebulon was kept waiting"
    db.session.commit()
    erase_chats([chat.id])
    db.session.commit()
    db.session.expire_all()
    chat = db.session.get(Chat, chat.id)
    assert (chat.visitor_name, chat.visitor_email, chat.satisfaction_comment) == (None,) * 3
