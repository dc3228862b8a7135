"""Escalation as operators live it: it reaches the people on duty and the chat's assignee,
marks the chat in the inbox until an operator resolves it, and the reply to the angry
message is itself empathetic. Demo chats are not answered a second time."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from models.accounts import Tenant, User
from models.audit import AuditLog
from models.chats import Agent, Chat, Message
from models.notifications import Notification
from services import chats
from services.assistant import TONE_INSTRUCTIONS
from tests.chat_client import ChatClient
from tests.conftest import csrf_token_from, drain, login
from tests.fake_openai import FakeOpenAI, Script

SITE = "http://shop.example"
ANGRY = "This is terrible, your product is broken and I am furious."


@pytest.fixture
def shop(app, db, factory):
    tenant = factory.tenant("Shop")
    row = db.session.get(Tenant, tenant.id)
    row.allowed_origins = SITE
    db.session.add(
        Agent(
            tenant_id=tenant.id,
            name="Helper",
            model="fake-model",
            is_default=True,
            system_prompt="You help shoppers.",
        )
    )
    db.session.commit()
    return db.session.get(Tenant, tenant.id)


@pytest.fixture
def upstream(app):
    fake = FakeOpenAI(Script(reply="I am sorry to hear that.")).start()
    app.config.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="test-key")
    yield fake
    fake.stop()


def _set_on_duty(db, user, on: bool = True) -> None:
    db.session.get(User, user.id).on_duty = on
    db.session.commit()


def _escalation_notes(db, user_id: int) -> list[Notification]:
    db.session.expire_all()
    return list(
        db.session.scalars(
            select(Notification).where(
                Notification.recipient_id == user_id, Notification.type == "escalation"
            )
        )
    )


def _visitor_says(db, chat_id: int, text: str) -> None:
    chats.add_message(db.session.get(Chat, chat_id), "visitor", text)
    db.session.commit()


def test_escalation_reaches_the_assignee_and_on_duty_agents_not_only_admins(
    app, db, worker, shop, factory
):
    admin = factory.user(shop, role="admin")
    on_duty_agent = factory.user(shop, role="agent")
    off_duty_agent = factory.user(shop, role="agent")
    assignee = factory.user(shop, role="agent")
    _set_on_duty(db, on_duty_agent)
    chat = chats.start_chat(shop.id, visitor_id="visitor-1")
    chat.settings = {**chat.settings, "auto_response": False}
    db.session.commit()

    # The operator who takes the chat over becomes its assignee.
    client = login(app.test_client(), assignee)
    page = client.get(f"/chats/{chat.id}")
    response = client.post(
        f"/chats/{chat.id}/takeover", data={"on": "1", "csrf_token": csrf_token_from(page.data)}
    )
    assert response.status_code == 303
    db.session.expire_all()
    assert db.session.get(Chat, chat.id).assignee_id == assignee.id

    _visitor_says(db, chat.id, ANGRY)
    drain(app)
    assert len(_escalation_notes(db, on_duty_agent.id)) == 1
    assert len(_escalation_notes(db, assignee.id)) == 1
    assert _escalation_notes(db, off_duty_agent.id) == []
    assert _escalation_notes(db, admin.id) == []  # off duty, and somebody else is on duty


def test_nobody_on_duty_still_reaches_the_admins(app, db, worker, shop, factory):
    admin = factory.user(shop, role="admin")
    agent = factory.user(shop, role="agent")
    chat = chats.start_chat(shop.id, visitor_id="visitor-2")
    chat.settings = {**chat.settings, "auto_response": False}
    db.session.commit()
    _visitor_says(db, chat.id, ANGRY)
    drain(app)
    assert len(_escalation_notes(db, admin.id)) == 1
    assert _escalation_notes(db, agent.id) == []


def test_on_duty_is_toggled_on_the_account_page(app, db, shop, factory):
    agent = factory.user(shop, role="agent")
    client = login(app.test_client(), agent)
    page = client.get("/account")
    assert b"Off duty" in page.data
    refused = client.post("/account/on-duty", data={"on": "1"})
    assert refused.status_code == 400  # no CSRF token
    response = client.post(
        "/account/on-duty", data={"on": "1", "csrf_token": csrf_token_from(page.data)}
    )
    assert response.status_code == 303
    db.session.expire_all()
    assert db.session.get(User, agent.id).on_duty is True
    assert b"On duty" in client.get("/account").data


def test_escalated_chat_is_badged_filtered_and_stays_until_an_operator_resolves_it(
    app, db, worker, shop, factory
):
    admin = factory.user(shop, role="admin")
    angry = chats.start_chat(shop.id, visitor_id="visitor-3")
    calm = chats.start_chat(shop.id, visitor_id="visitor-4")
    for chat in (angry, calm):
        chat.settings = {**chat.settings, "auto_response": False}
    db.session.commit()
    angry_id, calm_id = angry.id, calm.id
    _visitor_says(db, angry_id, ANGRY)
    _visitor_says(db, calm_id, "Where is my parcel?")
    drain(app)
    db.session.expire_all()
    chat = db.session.get(Chat, angry_id)
    assert chat.escalated_at is not None and chat.escalation_reason.startswith("negative")

    client = login(app.test_client(), admin)
    listing = client.get("/chats/").get_data(as_text=True)
    assert 'class="badge escalated' in listing
    assert listing.index(f'id="chat-row-{angry_id}"') < listing.index(f'id="chat-row-{calm_id}"')
    only = client.get("/chats/?escalated=1").get_data(as_text=True)
    assert f'id="chat-row-{angry_id}"' in only and f'id="chat-row-{calm_id}"' not in only

    # A mildly positive follow-up does not resolve anything.
    _visitor_says(db, angry_id, "Ok thanks, that is a bit better.")
    drain(app)
    db.session.expire_all()
    assert db.session.get(Chat, angry_id).escalated_at is not None

    detail = client.get(f"/chats/{angry_id}")
    text = detail.get_data(as_text=True)
    assert "Resolve escalation" in text and "Escalated" in text
    assert client.post(f"/chats/{angry_id}/resolve-escalation").status_code == 400  # no CSRF
    db.session.expire_all()
    assert db.session.get(Chat, angry_id).escalated_at is not None
    response = client.post(
        f"/chats/{angry_id}/resolve-escalation",
        data={"csrf_token": csrf_token_from(detail.data)},
    )
    assert response.status_code == 303
    drain(app)
    db.session.expire_all()
    resolved = db.session.get(Chat, angry_id)
    assert resolved.escalated_at is None and resolved.escalation_reason is None
    assert "Resolve escalation" not in client.get(f"/chats/{angry_id}").get_data(as_text=True)
    audited = db.session.scalars(
        select(AuditLog).where(
            AuditLog.object_type == "chat",
            AuditLog.object_id == str(angry_id),
            AuditLog.actor_user_id == admin.id,
        )
    ).all()
    assert any("escalated_at" in (row.details or {}).get("changes", {}) for row in audited)


def test_the_reply_to_an_angry_first_message_is_empathetic_every_time(
    app, worker, upstream, shop, live_server
):
    empathetic = TONE_INSTRUCTIONS["en"]["empathetic"]
    for attempt in range(8):
        client = ChatClient(live_server.url, shop.widget_key, SITE, visitor=f"angry-{attempt}")
        try:
            client.send("session_init")
            client.expect("session")
            client.send("message", content=ANGRY)
            client.expect("message")
            client.collect_reply()
        finally:
            client.close()
    drain(app)
    prompts = [r.body["messages"][0]["content"] for r in upstream.records if r.body.get("stream")]
    assert len(prompts) == 8
    assert sum(empathetic in prompt for prompt in prompts) == 8


def test_demo_chats_are_not_answered_twice(app, db, worker, upstream):
    from services.demo import load_demo

    load_demo()
    db.session.commit()
    drain(app)
    drain(app)
    db.session.expire_all()
    for chat in db.session.scalars(select(Chat)):
        visitor = db.session.scalars(
            select(Message.id).where(Message.chat_id == chat.id, Message.sender == "visitor")
        ).all()
        answers = db.session.scalars(
            select(Message).where(Message.chat_id == chat.id, Message.sender == "assistant")
        ).all()
        assert len(answers) == len(visitor), (chat.title, [a.content for a in answers])
        assert all(a.in_response_to_id in visitor for a in answers)


@pytest.mark.browser
def test_operator_sees_the_escalation_arrive_live_and_resolves_it(
    app, db, worker, live_server, shop, factory
):
    from playwright.sync_api import expect

    from tests.browser import chromium, login_page
    from tests.conftest import PASSWORD

    admin = factory.user(shop, role="admin", email="duty@shop.example")
    chat = chats.start_chat(shop.id, visitor_id="visitor-live")
    chat.settings = {**chat.settings, "auto_response": False}
    db.session.commit()
    chat_id = chat.id
    _visitor_says(db, chat_id, "Where is my parcel?")
    drain(app)
    with chromium() as browser:
        page = login_page(browser, live_server.url, admin.email, PASSWORD)
        page.goto(live_server.url + "/chats/")
        row = page.locator(f"#chat-row-{chat_id}")
        expect(row).to_be_visible()
        page.locator("#live").wait_for(state="attached")
        expect(row.locator(".badge.escalated")).to_have_count(0)

        _visitor_says(db, chat_id, ANGRY)
        expect(row.locator(".badge.escalated")).to_have_text("Escalated")  # no reload

        row.get_by_role("link").click()
        page.get_by_role("button", name="Resolve escalation").click()
        page.wait_for_url(f"{live_server.url}/chats/{chat_id}")
        expect(page.locator(f"#chat-header-{chat_id} .badge.escalated")).to_have_count(0)
        expect(page.get_by_role("button", name="Resolve escalation")).to_have_count(0)
        page.goto(live_server.url + "/chats/?escalated=1")
        expect(page.locator(f"#chat-row-{chat_id}")).to_have_count(0)
