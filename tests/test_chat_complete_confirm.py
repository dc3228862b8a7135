"""Ending a conversation from the console asks first, and the header names the visitor."""

from __future__ import annotations

from models.chats import Chat
from services import chats
from tests.conftest import csrf_token_from, login


def test_mark_completed_asks_before_it_ends_the_chat(app, db, client, factory):
    tenant = factory.tenant()
    login(client, factory.user(tenant))
    chat = chats.start_chat(tenant.id, visitor_id="visitor-confirm")
    chat.visitor_name, chat.visitor_email, chat.identity_verified = "Ana", "ana@example.com", True
    db.session.commit()
    page = client.get(f"/chats/{chat.id}").get_data(as_text=True)
    assert "Ana &lt;ana@example.com&gt;" in page and "visitor-confirm" not in page
    token = csrf_token_from(page.encode())

    asked = client.post(f"/chats/{chat.id}/complete", data={"csrf_token": token})
    assert asked.status_code == 200
    assert "Mark this conversation completed?" in asked.get_data(as_text=True)
    db.session.expire_all()
    assert db.session.get(Chat, chat.id).status == "active"

    done = client.post(
        f"/chats/{chat.id}/complete", data={"csrf_token": token, "confirm": "complete"}
    )
    assert done.status_code == 303
    db.session.expire_all()
    assert db.session.get(Chat, chat.id).status == "completed"
