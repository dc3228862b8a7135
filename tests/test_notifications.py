"""Notifications through the real spine: rules, recipients, dedupe, preferences, email, pages,
and the bell's live count."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select

from events import emit
from models.notifications import Notification, NotificationPreference
from services import chats
from tests.conftest import PASSWORD, csrf_token_from, drain, free_port, login
from tests.helpers import Browserless, receive_until


@pytest.fixture
def team(factory):
    tenant = factory.tenant("Acme")
    admin = factory.user(tenant, role="admin", email="ada@acme.example")
    admin2 = factory.user(tenant, role="admin", email="bo@acme.example")
    agent = factory.user(tenant, role="agent", email="cy@acme.example")
    return tenant, admin, admin2, agent


def _escalate(db, tenant_id: int, chat_id: int, excerpt: str = "This is awful") -> None:
    emit(
        "escalation.triggered",
        tenant_id=tenant_id,
        entity="chat",
        entity_id=chat_id,
        payload={"excerpt": excerpt, "label": "Negative message"},
    )
    db.session.commit()


def _notes(db, user_id: int, kind: str | None = None) -> list[Notification]:
    stmt = select(Notification).where(Notification.recipient_id == user_id)
    if kind:
        stmt = stmt.where(Notification.type == kind)
    db.session.expire_all()
    return list(db.session.scalars(stmt.order_by(Notification.id)))


def test_escalation_notifies_tenant_admins_once_within_the_window(app, db, worker, team, factory):
    tenant, admin, admin2, agent = team
    stranger = factory.user(factory.tenant("Other"), role="admin")
    _escalate(db, tenant.id, 41, "I want a refund now")
    _escalate(db, tenant.id, 41, "Still waiting!")  # same chat: a duplicate inside the window
    drain(app)
    for user in (admin, admin2):
        notes = _notes(db, user.id, "escalation")
        assert len(notes) == 1
        assert notes[0].body == "I want a refund now" and notes[0].link == "/chats/41"
        assert notes[0].read_at is None and notes[0].tenant_id == tenant.id
    assert _notes(db, agent.id) == []  # agents are not tenant admins
    assert _notes(db, stranger.id) == []  # never another tenant's users

    _escalate(db, tenant.id, 42)  # another chat is another subject
    drain(app)
    assert len(_notes(db, admin.id, "escalation")) == 2


def test_a_zero_window_lets_every_duplicate_through(app, db, worker, team):
    tenant, admin, _, _ = team
    app.config["NOTIFY_DEDUPE_SECONDS"] = 0
    _escalate(db, tenant.id, 7)
    _escalate(db, tenant.id, 7)
    drain(app)
    assert len(_notes(db, admin.id, "escalation")) == 2


def test_negative_visitor_messages_notify_admins_once(app, db, worker, team):
    tenant, admin, admin2, agent = team
    chat = chats.start_chat(tenant.id, visitor_id="visitor-unhappy1")
    chats.add_message(chat, "visitor", "This is terrible, the product is broken and I am furious.")
    db.session.commit()
    drain(app)
    chats.add_message(db.session.merge(chat), "visitor", "Awful service, I hate this, useless!")
    db.session.commit()
    drain(app)
    notes = _notes(db, admin.id, "escalation")
    assert len(notes) == 1 and "furious" in notes[0].body
    assert notes[0].link == f"/chats/{chat.id}"
    assert len(_notes(db, admin2.id, "escalation")) == 1
    assert _notes(db, agent.id) == []


def test_preferences_turn_a_type_off_in_the_app(app, client, db, worker, team):
    tenant, admin, admin2, _ = team
    login(client, admin)
    page = client.get("/notifications/preferences")
    assert page.status_code == 200 and b"in_app:escalation" in page.data
    form = {"csrf_token": csrf_token_from(page.data)}
    # Everything stays on except escalations in the app (unticked boxes are not sent).
    for kind in ("device_offline", "generation_failed"):
        form[f"in_app:{kind}"] = "1"
        form[f"email:{kind}"] = "1"
    response = client.post("/notifications/preferences", data=form)
    assert response.status_code == 303
    pref = db.session.scalars(
        select(NotificationPreference).where(
            NotificationPreference.user_id == admin.id,
            NotificationPreference.type == "escalation",
        )
    ).one()
    assert (pref.in_app, pref.email) == (False, False)
    _escalate(db, tenant.id, 9)
    drain(app)
    assert _notes(db, admin.id, "escalation") == []
    assert len(_notes(db, admin2.id, "escalation")) == 1  # their preferences are their own


class SmtpSink:
    """A real SMTP server (aiosmtpd) on a free port, collecting messages."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list = []
        self.arrived = threading.Event()
        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd API
                from email import message_from_bytes, policy

                message = message_from_bytes(envelope.content, policy=policy.default)
                sink.messages.append((envelope.rcpt_tos, message))
                sink.arrived.set()
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> SmtpSink:
        self.controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self.controller.stop()


def test_email_goes_through_smtp_when_configured(app, db, worker, team):
    tenant, admin, admin2, _ = team
    db.session.add(NotificationPreference(user_id=admin2.id, type="escalation", email=False))
    db.session.commit()
    with SmtpSink() as smtp:
        app.config["SMTP_URL"] = f"smtp://127.0.0.1:{smtp.port}"
        app.config["PUBLIC_URL"] = "https://ops.example.com/"
        _escalate(db, tenant.id, 5, "The receiver exploded")
        drain(app)
        deadline = time.monotonic() + 10
        while len(smtp.messages) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        drain(app)
    assert len(smtp.messages) == 1  # admin2 opted out of email
    recipients, message = smtp.messages[0]
    assert recipients == [admin.email]
    assert message["Subject"].startswith("[Switchboard]")
    body = message.get_content()
    assert "The receiver exploded" in body and "https://ops.example.com/chats/5" in body


def test_without_smtp_nothing_is_emailed_and_nothing_fails(app, db, worker, team):
    tenant, admin, _, _ = team
    assert not app.config.get("SMTP_URL")
    _escalate(db, tenant.id, 6)
    drain(app)
    assert len(_notes(db, admin.id)) == 1
    from models.events import ProcessedEvent

    failed = db.session.scalar(
        select(func.count()).select_from(ProcessedEvent).where(ProcessedEvent.status == "failed")
    )
    assert failed == 0


def test_page_filters_marks_read_and_hides_other_users(app, client, db, worker, team):
    tenant, admin, admin2, _ = team
    _escalate(db, tenant.id, 1)
    _escalate(db, tenant.id, 2)
    emit(
        "device.offline_alert",
        tenant_id=tenant.id,
        entity="device_record",
        entity_id=3,
        payload={"name": "Stage left", "detail": "no answer for 3 polls"},
    )
    db.session.commit()
    drain(app)
    login(client, admin)
    page = client.get("/notifications/")
    assert page.data.count(b'class="feed-item unread"') == 3
    assert b'aria-label="3 unread notifications"' in page.data  # the bell
    only_devices = client.get("/notifications/?type=device_offline")
    assert b"Stage left" in only_devices.data and b"/chats/1" not in only_devices.data

    first = _notes(db, admin.id)[0]
    token = csrf_token_from(page.data)
    assert client.post(f"/notifications/{first.id}/read", data={}).status_code == 400  # no CSRF
    response = client.post(f"/notifications/{first.id}/read", data={"csrf_token": token})
    assert response.status_code == 303
    unread = client.get("/notifications/?unread=1")
    assert unread.data.count(b'class="feed-item unread"') == 2
    # Someone else's notification cannot be read, or even confirmed to exist.
    theirs = _notes(db, admin2.id)[0]
    assert (
        client.post(f"/notifications/{theirs.id}/read", data={"csrf_token": token}).status_code
        == 404
    )
    assert _notes(db, admin2.id)[0].read_at is None

    client.post("/notifications/read-all", data={"csrf_token": token})
    assert all(n.read_at is not None for n in _notes(db, admin.id))
    assert b'aria-label="0 unread notifications"' in client.get("/notifications/").data


def test_bell_count_arrives_live_on_the_socket(app, worker, live_server, team):
    tenant, admin, _, _ = team
    session = Browserless(live_server.url).login(admin.email, PASSWORD)
    ws = session.open_socket(session.live_url("/"))
    try:
        first = receive_until(ws, lambda f: 'id="bell"' in f)
        assert 'data-unread="0"' in first[-1]
        with app.app_context():
            from extensions import db

            _escalate(db, tenant.id, 77)
        frames = receive_until(ws, lambda f: 'data-unread="1"' in f, timeout=10)
        assert 'hx-swap-oob="true"' in frames[-1]
    finally:
        ws.close()
