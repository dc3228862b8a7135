"""The inbox's assignment and unread state: who owns a chat, "mine / unassigned / all" views,
what each operator has not read yet, and the nav's count of it, live."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from models.audit import AuditLog
from models.chats import Chat
from tests.conftest import PASSWORD, csrf_token_from, drain, login


def _chat(app, tenant_id: int, *lines: str, assignee_id: int | None = None) -> int:
    from extensions import db
    from services import chats

    with app.app_context():
        chat = chats.start_chat(tenant_id, visitor_id="v" * 12, user_id=None, session_id="s")
        chat.assignee_id = assignee_id
        db.session.flush()
        for line in lines:
            chats.add_message(chat, "visitor", line)
        db.session.commit()
        return chat.id


def _row(html: str, chat_id: int) -> str:
    match = re.search(rf'<tr id="chat-row-{chat_id}"[^>]*>.*?</tr>', html, re.S)
    assert match, f"no row for chat {chat_id}"
    return match.group(0)


def _nav_count(html: str) -> str:
    match = re.search(r'<span id="chats-unread"[^>]*>([^<]*)</span>', html)
    assert match, "no unread count in the nav"
    return match.group(1).strip()


def test_an_agent_assigns_a_chat_to_a_colleague_and_it_is_audited(app, db, worker, client, factory):
    tenant = factory.tenant("Bakery")
    agent = factory.user(tenant, role="agent", email="a@bakery.example")
    colleague = factory.user(tenant, role="agent", email="c@bakery.example")
    chat_id = _chat(app, tenant.id, "hello")
    login(client, agent)
    page = client.get(f"/chats/{chat_id}")
    assert 'name="assignee_id"' in page.get_data(as_text=True)
    token = csrf_token_from(page.data)

    # No CSRF token: refused, nothing changes.
    assert (
        client.post(f"/chats/{chat_id}/assign", data={"assignee_id": colleague.id}).status_code
        == 400
    )
    response = client.post(
        f"/chats/{chat_id}/assign", data={"assignee_id": colleague.id, "csrf_token": token}
    )
    assert response.status_code == 303
    drain(app)
    db.session.expire_all()
    assert db.session.get(Chat, chat_id).assignee_id == colleague.id
    audited = db.session.scalars(
        select(AuditLog).where(
            AuditLog.object_type == "chat",
            AuditLog.object_id == str(chat_id),
            AuditLog.actor_user_id == agent.id,
        )
    ).all()
    assert any("assignee_id" in (row.details or {}).get("changes", {}) for row in audited), [
        (r.action, r.details) for r in db.session.scalars(select(AuditLog)).all()
    ]

    # Unassigning is an empty choice.
    client.post(f"/chats/{chat_id}/assign", data={"assignee_id": "", "csrf_token": token})
    db.session.expire_all()
    assert db.session.get(Chat, chat_id).assignee_id is None


def test_no_one_assigns_across_tenants(app, db, client, factory):
    tenant, other = factory.tenant("Bakery"), factory.tenant("Rival")
    agent = factory.user(tenant, role="agent")
    outsider = factory.user(other, role="agent")
    mine, theirs = _chat(app, tenant.id, "hi"), _chat(app, other.id, "hi")
    login(client, agent)
    token = csrf_token_from(client.get(f"/chats/{mine}").data)
    # Another tenant's operator is no choice here.
    response = client.post(
        f"/chats/{mine}/assign", data={"assignee_id": outsider.id, "csrf_token": token}
    )
    assert response.status_code == 400
    # Nor is a deactivated colleague.
    gone = factory.user(tenant, role="agent")
    with app.app_context():
        from extensions import db as _db
        from models.accounts import User

        _db.session.get(User, gone.id).is_active_user = False
        _db.session.commit()
    response = client.post(
        f"/chats/{mine}/assign", data={"assignee_id": gone.id, "csrf_token": token}
    )
    assert response.status_code == 400
    assert (
        client.post(
            f"/chats/{mine}/assign", data={"assignee_id": "x", "csrf_token": token}
        ).status_code
        == 400
    )
    # Another tenant's chat does not exist for this operator.
    response = client.post(
        f"/chats/{theirs}/assign", data={"assignee_id": agent.id, "csrf_token": token}
    )
    assert response.status_code == 404
    db.session.expire_all()
    assert db.session.get(Chat, mine).assignee_id is None
    assert db.session.get(Chat, theirs).assignee_id is None


def test_mine_unassigned_and_all_views_with_their_counts(app, client, factory):
    tenant = factory.tenant("Bakery")
    me = factory.user(tenant, role="agent")
    colleague = factory.user(tenant, role="agent")
    mine = _chat(app, tenant.id, "mine", assignee_id=me.id)
    theirs = _chat(app, tenant.id, "theirs", assignee_id=colleague.id)
    nobody = _chat(app, tenant.id, "nobody")
    login(client, me)

    def ids(view: str | None) -> set[int]:
        html = client.get("/chats/" + (f"?view={view}" if view else "")).get_data(as_text=True)
        return {int(n) for n in re.findall(r'<tr id="chat-row-(\d+)"', html)}

    assert ids(None) == ids("all") == {mine, theirs, nobody}
    assert ids("mine") == {mine}
    assert ids("unassigned") == {nobody}
    assert ids("bogus") == {mine, theirs, nobody}
    html = client.get("/chats/?view=mine").get_data(as_text=True)
    assert re.search(r"Mine\s*<span class=\"view-count\" id=\"view-count-mine\">1</span>", html)
    assert re.search(
        r"Unassigned\s*<span class=\"view-count\" id=\"view-count-unassigned\">1</span>", html
    )
    assert re.search(r"All\s*<span class=\"view-count\" id=\"view-count-all\">3</span>", html)
    # The pager keeps the view.
    also_mine = _chat(app, tenant.id, "mine too", assignee_id=me.id)
    app.config["LIST_PAGE_SIZE"] = 1
    html = client.get("/chats/?view=mine").get_data(as_text=True)
    assert re.findall(r'<tr id="chat-row-(\d+)"', html) == [str(also_mine)]
    older = re.search(r'<a [^>]*rel="next" href="([^"]+)"', html).group(1).replace("&amp;", "&")
    assert "view=mine" in older
    html = client.get(older).get_data(as_text=True)
    assert re.findall(r'<tr id="chat-row-(\d+)"', html) == [str(mine)]


def test_unread_is_per_operator_and_opening_a_chat_reads_it_for_that_operator_only(
    app, db, factory
):
    tenant, other = factory.tenant("Bakery"), factory.tenant("Rival")
    alice = factory.user(tenant, role="agent")
    bob = factory.user(tenant, role="agent")
    factory.user(other, role="agent")
    chat_id = _chat(app, tenant.id, "hello?")
    _chat(app, other.id, "not yours")
    a, b = app.test_client(), app.test_client()
    login(a, alice)
    login(b, bob)

    for operator in (a, b):
        html = operator.get("/chats/").get_data(as_text=True)
        assert "unread" in _row(html, chat_id).split(">", 1)[0]
        assert _nav_count(html) == "1"  # the other tenant's chat counts for no one here

    a.get(f"/chats/{chat_id}")
    html = a.get("/chats/").get_data(as_text=True)
    assert "unread" not in _row(html, chat_id).split(">", 1)[0]
    assert _nav_count(html) == ""
    html = b.get("/chats/").get_data(as_text=True)
    assert "unread" in _row(html, chat_id).split(">", 1)[0]
    assert _nav_count(html) == "1"

    # A new visitor message makes it unread again for Alice; her own reply does not.
    from extensions import db as _db
    from services import chats

    with app.app_context():
        chat = _db.session.get(Chat, chat_id)
        chats.add_message(chat, "operator", "hi, how can I help?")
        _db.session.commit()
    assert _nav_count(a.get("/chats/").get_data(as_text=True)) == ""
    with app.app_context():
        chat = _db.session.get(Chat, chat_id)
        chats.add_message(chat, "visitor", "my order")
        _db.session.commit()
    html = a.get("/chats/").get_data(as_text=True)
    assert "unread" in _row(html, chat_id).split(">", 1)[0]
    assert _nav_count(html) == "1"

    # A completed chat waits for no one.
    with app.app_context():
        chats.complete_chat(_db.session.get(Chat, chat_id))
        _db.session.commit()
    assert _nav_count(b.get("/chats/").get_data(as_text=True)) == ""


# ------------------------------------------------------------------ in a browser


@pytest.mark.browser
def test_a_visitor_message_makes_the_row_unread_and_bumps_the_nav_count_live(
    app, db, worker, live_server, factory
):
    from tests.browser import chromium, login_page
    from tests.chat_client import ChatClient  # noqa: F401 - the widget's API, as a visitor

    tenant = factory.tenant("Bakery")
    alice = factory.user(tenant, role="agent", email="alice@bakery.example")
    read_id = _chat(app, tenant.id, "first")
    with chromium() as browser:
        page = login_page(browser, live_server.url, alice.email, PASSWORD)
        page.goto(f"{live_server.url}/chats/{read_id}")  # read: nothing unread
        page.goto(f"{live_server.url}/chats/")
        page.locator("#live").wait_for(state="attached")
        expect(page.locator("#chats-unread")).to_have_text("")
        expect(page.locator(f"#chat-row-{read_id}")).not_to_have_class(re.compile(r"\bunread\b"))
        page.wait_for_timeout(500)  # the socket is open

        from extensions import db as _db
        from services import chats

        with app.app_context():
            chat = _db.session.get(Chat, read_id)
            chats.add_message(chat, "visitor", "are you there?")
            _db.session.commit()
        expect(page.locator("#chats-unread")).to_have_text("1")
        expect(page.locator(f"#chat-row-{read_id}")).to_have_class(re.compile(r"\bunread\b"))
        # The whole row stays current too, and the count is the same on another page.
        expect(page.locator(f"#chat-row-{read_id}")).to_contain_text("are you there?")
        page.goto(f"{live_server.url}/devices/")
        expect(page.locator("#chats-unread")).to_have_text("1")
