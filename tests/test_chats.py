"""Chats beyond the socket: sentiment and tone, archiving with summaries, the console, the CLI."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from models.accounts import Tenant
from models.base import utcnow
from models.chats import Agent, Chat, Message
from models.events import OutboxEvent
from services import chats
from tests.conftest import csrf_token_from, drain, login


@pytest.fixture
def shop(app, db, factory):
    tenant = factory.tenant("Shop")
    agent = Agent(
        tenant_id=tenant.id, name="Helper", is_default=True, temperature=0.3, max_tokens=300
    )
    db.session.add(agent)
    db.session.commit()
    admin = factory.user(tenant, role="admin")
    return tenant, agent, admin


def _chat_with(db, tenant_id: int, *lines: tuple[str, str]) -> Chat:
    chat = chats.start_chat(tenant_id, visitor_id="visitor-123456")
    for sender, text in lines:
        chats.add_message(chat, sender, text)
    db.session.commit()
    return chat


def test_new_chat_gets_defaults_and_default_agent(db, shop):
    tenant, agent, _ = shop
    chat = chats.start_chat(tenant.id, visitor_id="visitor-abcdefgh")
    db.session.commit()
    assert chat.agent_id == agent.id
    assert chat.settings["auto_response"] is True and chat.settings["temperature"] == 0.3
    other = Agent(
        tenant_id=tenant.id, name="Formal", temperature=0.1, max_tokens=99, provider="local"
    )
    db.session.add(other)
    db.session.flush()
    chats.change_agent(chat, other)
    db.session.commit()
    assert chat.settings["temperature"] == 0.1 and chat.settings["max_tokens"] == 99
    assert chat.settings["provider"] == "local"


def test_negative_message_is_analysed_escalated_and_sets_an_empathetic_tone(app, db, worker, shop):
    tenant, _, _ = shop
    chat = _chat_with(
        db, tenant.id, ("visitor", "This is terrible, your product is broken and I am furious.")
    )
    drain(app)
    db.session.expire_all()
    message = db.session.scalars(
        select(Message).where(Message.chat_id == chat.id, Message.sender == "visitor")
    ).one()
    assert message.sentiment_label == "negative" and message.sentiment_score < 0
    topics = db.session.scalars(select(OutboxEvent.topic).where(OutboxEvent.tenant_id == tenant.id))
    assert {"message.analyzed", "escalation.triggered"} <= set(topics)
    assert db.session.get(Chat, chat.id).agent_settings["tone"] == "empathetic"

    chats.add_message(db.session.get(Chat, chat.id), "visitor", "Thanks, that is great, I love it!")
    db.session.commit()
    drain(app)
    db.session.expire_all()
    assert db.session.get(Chat, chat.id).agent_settings["tone"] == "friendly"


def test_idle_chat_is_archived_with_a_summary(app, db, worker, shop):
    tenant, _, _ = shop
    chat = _chat_with(
        db,
        tenant.id,
        ("visitor", "My wireless receiver keeps dropping the signal during shows."),
        ("assistant", "Check the antenna placement and scan for a clean frequency."),
        ("visitor", "The frequency scan fixed the receiver dropouts."),
    )
    fresh = _chat_with(db, tenant.id, ("visitor", "Just arrived."))
    drain(app)  # let the automatic replies land first: they count as activity
    chat = db.session.get(Chat, chat.id)
    chat.last_activity = utcnow() - timedelta(hours=25)
    db.session.commit()

    from tasks.chats import archive_inactive_chats

    archive_inactive_chats()
    db.session.expire_all()
    archived = db.session.get(Chat, chat.id)
    assert archived.status == "archived" and archived.archived_at is not None
    assert "receiver" in archived.summary.lower()
    assert db.session.get(Chat, fresh.id).status == "active"
    event = db.session.scalars(
        select(OutboxEvent).where(OutboxEvent.topic == "chat.archived")
    ).one()
    assert event.entity_id == chat.id and event.payload["summary"] == archived.summary[:300]


def test_console_lists_filters_and_searches_chats(app, db, client, shop, factory):
    tenant, agent, admin = shop
    first = _chat_with(db, tenant.id, ("visitor", "Where is my parcel?"))
    second = _chat_with(db, tenant.id, ("visitor", "The microphone hums"))
    second.status = "completed"
    db.session.commit()
    other_tenant = factory.tenant("Elsewhere")
    _chat_with(db, other_tenant.id, ("visitor", "Where is my parcel, elsewhere?"))
    login(client, admin)

    page = client.get("/chats/").get_data(as_text=True)
    assert f"chat-row-{first.id}" in page and f"chat-row-{second.id}" in page
    assert "elsewhere" not in page
    found = client.get("/chats/?q=parcel").get_data(as_text=True)
    assert f"chat-row-{first.id}" in found and f"chat-row-{second.id}" not in found
    done = client.get("/chats/?status=completed", headers={"HX-Request": "true"})
    body = done.get_data(as_text=True)
    assert f"chat-row-{second.id}" in body and f"chat-row-{first.id}" not in body
    assert "<html" not in body and "HX-Request" in done.headers["Vary"]
    assert "No chats match" in client.get("/chats/?q=nothing-like-this").get_data(as_text=True)
    assert client.get("/chats/?from=not-a-date").status_code == 400


def test_operator_reply_and_takeover(app, db, client, shop):
    tenant, _, admin = shop
    chat = _chat_with(db, tenant.id, ("visitor", "Can a person help me?"))
    login(client, admin)
    page = client.get(f"/chats/{chat.id}")
    token = csrf_token_from(page.data)
    response = client.post(f"/chats/{chat.id}/takeover", data={"on": "1", "csrf_token": token})
    assert response.status_code == 303
    db.session.expire_all()
    assert db.session.get(Chat, chat.id).settings["human_takeover"] is True
    assert not chats.should_auto_reply(db.session.get(Chat, chat.id))
    response = client.post(
        f"/chats/{chat.id}/reply", data={"content": "I am here.", "csrf_token": token}
    )
    assert response.status_code == 303
    reply = db.session.scalars(select(Message).where(Message.sender == "operator")).one()
    assert reply.content == "I am here." and reply.chat_id == chat.id
    # Without the CSRF token nothing happens.
    assert client.post(f"/chats/{chat.id}/reply", data={"content": "x"}).status_code == 400


def test_other_tenants_chat_is_404(app, db, client, shop, factory):
    tenant, _, _ = shop
    chat = _chat_with(db, tenant.id, ("visitor", "secret"))
    stranger = factory.user(factory.tenant("Other"), role="admin")
    login(client, stranger)
    assert client.get(f"/chats/{chat.id}").status_code == 404
    token = csrf_token_from(client.get("/chats/").data)
    assert (
        client.post(
            f"/chats/{chat.id}/reply", data={"content": "x", "csrf_token": token}
        ).status_code
        == 404
    )


def test_widget_settings_validate_origins(app, db, client, shop):
    tenant, _, admin = shop
    login(client, admin)
    page = client.get("/chats/settings")
    token = csrf_token_from(page.data)
    assert b"widget.js" in page.data
    bad = client.post(
        "/chats/settings", data={"allowed_origins": "javascript:alert(1)", "csrf_token": token}
    )
    assert bad.status_code == 200 and b"Not an origin" in bad.data
    ok = client.post(
        "/chats/settings", data={"allowed_origins": "https://shop.example/\n", "csrf_token": token}
    )
    assert ok.status_code == 303
    assert db.session.get(Tenant, tenant.id).allowed_origins == "https://shop.example"


def test_agents_page_creates_and_switches_the_default(app, db, client, shop):
    tenant, agent, admin = shop
    login(client, admin)
    token = csrf_token_from(client.get("/chats/agents/new").data)
    response = client.post(
        "/chats/agents/new",
        data={
            "name": "Night shift",
            "provider": "openai",
            "model": "m",
            "temperature": "0.5",
            "max_tokens": "200",
            "system_prompt": "Be brief.",
            "is_default": "y",
            "is_active": "y",
            "csrf_token": token,
        },
    )
    assert response.status_code == 303
    db.session.expire_all()
    defaults = db.session.scalars(
        select(Agent.name).where(Agent.tenant_id == tenant.id, Agent.is_default.is_(True))
    ).all()
    assert defaults == ["Night shift"]


def test_cli_validate_fix_export_and_anonymize(app, db, runner, shop, factory):
    tenant, _, admin = shop
    chat = _chat_with(db, tenant.id, ("visitor", "hello"), ("assistant", "hi there"))
    chat.user_id = admin.id
    chat.message_count = 7  # drift
    db.session.commit()
    result = runner.invoke(args=["chats", "validate"])
    assert "message_count is wrong: 1" in result.output
    result = runner.invoke(args=["chats", "validate", "--fix"])
    assert result.exit_code == 0
    db.session.expire_all()
    assert db.session.get(Chat, chat.id).message_count == 2

    exported = runner.invoke(args=["chats", "export", "--chat-id", str(chat.public_id)])
    data = json.loads(exported.output)
    assert [m["content"] for m in data["messages"]] == ["hello", "hi there"]
    missing = runner.invoke(args=["chats", "export", "--chat-id", "nope"])
    assert missing.exit_code != 0 and "No chat" in missing.output

    result = runner.invoke(args=["chats", "anonymize", "--user-id", str(admin.id)])
    assert result.exit_code == 0
    db.session.expire_all()
    anonymised = db.session.get(Chat, chat.id)
    assert anonymised.user_id is None
    contents = db.session.scalars(select(Message.content).where(Message.chat_id == chat.id)).all()
    # The whole conversation goes: the assistant's replies quote and answer the visitor.
    assert contents == ["[removed]", "[removed]"]


def test_cli_cleanup_deletes_only_old_finished_chats(app, db, runner, shop):
    tenant, _, _ = shop
    old = _chat_with(db, tenant.id, ("visitor", "old"))
    old.status, old.last_activity = "archived", utcnow() - timedelta(days=400)
    recent = _chat_with(db, tenant.id, ("visitor", "recent"))
    db.session.commit()
    dry = runner.invoke(args=["chats", "cleanup", "--days", "365", "--dry-run"])
    assert "Would delete 1 chats and 1 messages" in dry.output
    assert db.session.get(Chat, old.id) is not None
    runner.invoke(args=["chats", "cleanup", "--days", "365"])
    db.session.expire_all()
    assert db.session.get(Chat, old.id) is None and db.session.get(Chat, recent.id) is not None
    assert db.session.scalar(select(Message).where(Message.content == "old")) is None


def test_a_reply_is_generated_once(app, db, shop, monkeypatch):
    import time

    from tasks.chats import generate_reply

    tenant, _, _ = shop
    chat = _chat_with(db, tenant.id, ("visitor", "Hello, anyone there?"))
    visitor_message = db.session.scalar(select(Message.id).where(Message.chat_id == chat.id))
    # A claim that lapses at once, so the second run gets past it to the saved-reply check.
    monkeypatch.setattr(chats, "REPLY_CLAIM_SECONDS", 0.01)

    generate_reply(visitor_message)
    time.sleep(0.05)
    generate_reply(visitor_message)  # redelivered: the reply exists, nothing more is said
    generate_reply(visitor_message + 1000)  # no such message: nothing happens

    db.session.expire_all()
    replies = db.session.scalars(
        select(Message).where(Message.chat_id == chat.id, Message.sender == "assistant")
    ).all()
    assert len(replies) == 1
    assert replies[0].in_response_to_id == visitor_message and replies[0].content
