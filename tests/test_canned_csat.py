"""Canned replies (per tenant, admins manage, "/shortcut" fills the reply box) and the CSAT
report on the Metrics page."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from models.base import utcnow
from models.chats import CannedReply, Chat
from tests.conftest import PASSWORD, csrf_token_from, login


@pytest.fixture
def shop(factory):
    tenant = factory.tenant("Shop")
    return tenant, factory.user(tenant, role="admin"), factory.user(tenant, role="agent")


def _client(app, user):
    return login(app.test_client(), user, PASSWORD)


def _chat(db, tenant_id: int, **fields) -> Chat:
    chat = Chat(tenant_id=tenant_id, visitor_id="ab12cd34ef56ab12cd34ef56", **fields)
    db.session.add(chat)
    db.session.commit()
    return chat


def _add(client, shortcut: str, content: str, token: str | None = None):
    page = client.get("/chats/canned")
    data = {"shortcut": shortcut, "content": content}
    data["csrf_token"] = token if token is not None else csrf_token_from(page.data)
    return client.post("/chats/canned", data=data)


# ---------------------------------------------------------------- canned replies


def test_admin_adds_edits_and_deletes_a_canned_reply(app, db, shop):
    tenant, admin, _agent = shop
    client = _client(app, admin)
    assert _add(client, "/Refund", "Refunds take 5 working days.").status_code == 303
    canned = db.session.scalar(select(CannedReply))
    assert (canned.shortcut, canned.tenant_id) == ("refund", tenant.id)
    assert "/refund" in client.get("/chats/canned").get_data(as_text=True)
    # The same shortcut twice is refused with a message, not a 500.
    again = _add(client, "refund", "Other text")
    assert again.status_code == 400 and "already a canned reply" in again.get_data(as_text=True)
    token = csrf_token_from(client.get(f"/chats/canned/{canned.id}").data)
    edited = client.post(
        f"/chats/canned/{canned.id}",
        data={"shortcut": "refund", "content": "Refunds take 3 days.", "csrf_token": token},
    )
    assert edited.status_code == 303
    db.session.expire_all()
    assert db.session.get(CannedReply, canned.id).content == "Refunds take 3 days."
    gone = client.post(f"/chats/canned/{canned.id}/delete", data={"csrf_token": token})
    assert gone.status_code == 303
    db.session.expire_all()
    assert db.session.get(CannedReply, canned.id) is None


def test_bad_shortcut_and_missing_csrf_are_refused(app, db, shop):
    _tenant, admin, _agent = shop
    client = _client(app, admin)
    bad = _add(client, "re fund!", "x")
    assert bad.status_code == 400 and "lower-case letters" in bad.get_data(as_text=True)
    assert _add(client, "refund", "x", token="").status_code == 400
    assert db.session.scalar(select(CannedReply)) is None


def test_agents_cannot_manage_and_other_tenants_cannot_touch(app, db, factory, shop):
    tenant, admin, agent = shop
    other_admin = factory.user(factory.tenant("Rival"), role="admin")
    _add(_client(app, admin), "refund", "Our refund policy")
    canned = db.session.scalar(select(CannedReply))
    agent_client = _client(app, agent)
    assert agent_client.get("/chats/canned").status_code == 403
    rival = _client(app, other_admin)
    assert "Our refund policy" not in rival.get("/chats/canned").get_data(as_text=True)
    token = csrf_token_from(rival.get("/chats/canned").data)
    assert rival.get(f"/chats/canned/{canned.id}").status_code == 404
    assert (
        rival.post(f"/chats/canned/{canned.id}/delete", data={"csrf_token": token}).status_code
        == 404
    )
    # The rival's own chat: "/refund" is not theirs, so nothing is filled in.
    rival_chat = _chat(db, other_admin.tenant_id)
    filled = rival.get(f"/chats/{rival_chat.id}/reply-box?content=/refund")
    assert filled.status_code == 204
    # Nor can they ask for the shop's chat's box.
    shop_chat = _chat(db, tenant.id)
    assert rival.get(f"/chats/{shop_chat.id}/reply-box?content=/refund").status_code == 404


def test_shortcut_fills_the_reply_box(app, db, shop):
    tenant, admin, agent = shop
    _add(_client(app, admin), "hours", 'Open 9–18 <b>every</b> day & "Sunday" too.')
    chat = _chat(db, tenant.id)
    client = _client(app, agent)
    page = client.get(f"/chats/{chat.id}").get_data(as_text=True)
    assert "<code>/hours</code>" in page  # the hint lists the shortcuts
    filled = client.get(f"/chats/{chat.id}/reply-box?content=/hours")
    body = filled.get_data(as_text=True)
    assert filled.status_code == 200
    assert "Open 9–18 &lt;b&gt;every&lt;/b&gt; day &amp; &#34;Sunday&#34; too.</textarea>" in body
    # Anything else the operator types is left alone (no swap).
    assert client.get(f"/chats/{chat.id}/reply-box?content=/hours%20please").status_code == 204
    assert client.get(f"/chats/{chat.id}/reply-box?content=/nope").status_code == 204


@pytest.mark.browser
def test_typing_a_shortcut_in_the_browser_fills_the_box(app, db, live_server, shop):
    from playwright.sync_api import expect

    from tests.browser import chromium, login_page

    tenant, admin, agent = shop
    db.session.add(CannedReply(tenant_id=tenant.id, shortcut="hours", content="Open 9 to 6."))
    db.session.commit()
    chat = _chat(db, tenant.id)
    with chromium() as browser:
        page = login_page(browser, live_server.url, agent.email, PASSWORD)
        page.goto(f"{live_server.url}/chats/{chat.id}")
        box = page.get_by_role("textbox", name="Reply as operator")
        box.press_sequentially("/hours")
        expect(box).to_have_value("Open 9 to 6.")
        expect(box).to_be_focused()
        box.press("End")
        box.press_sequentially(" See you!")
        page.get_by_role("button", name="Send", exact=True).click()
        expect(page.locator(".msg, .message").last).to_contain_text("Open 9 to 6. See you!")


# ---------------------------------------------------------------- CSAT


def test_csat_report_on_the_metrics_page(app, db, factory, shop):
    tenant, admin, agent = shop
    rival = factory.tenant("Rival")
    now = utcnow()
    ratings = [
        (5, agent.id, "Brilliant help"),
        (4, agent.id, None),
        (1, None, "<script>alert(1)</script>Useless bot"),
        (5, None, None),
    ]
    for score, assignee, comment in ratings:
        _chat(
            db,
            tenant.id,
            satisfaction=score,
            assignee_id=assignee,
            satisfaction_comment=comment,
            rated_at=now,
        )
    _chat(db, tenant.id, satisfaction=1, rated_at=now - timedelta(days=60))  # out of range
    _chat(db, rival.id, satisfaction=1, rated_at=now, satisfaction_comment="Rival's comment")
    html = _client(app, admin).get("/metrics/dashboard?days=30").get_data(as_text=True)
    section = html.split('id="csat"')[1].split("</section>")[0]
    assert "<strong>3.75</strong> of 5 average, from 4 ratings" in section
    assert '<th scope="row">5 of 5</th><td>2</td><td>50%</td>' in section
    assert '<th scope="row">1 of 5</th><td>1</td><td>25%</td>' in section
    assert '<th scope="row">3 of 5</th><td>0</td><td>0%</td>' in section
    agent_name = agent.name or agent.email
    assert f"<td>{agent_name}</td><td>2</td><td>4.50</td>" in section
    assert "<td>Assistant (no operator)</td><td>2</td><td>3.00</td>" in section
    assert "Brilliant help" in section
    assert "&lt;script&gt;alert(1)&lt;/script&gt;Useless bot" in section
    assert "<script>alert(1)" not in html
    assert "Rival&#39;s comment" not in html and "Rival's comment" not in html
    # Over 90 days, the older rating counts too.
    wide = _client(app, admin).get("/metrics/dashboard?days=90").get_data(as_text=True)
    assert "from 5 ratings" in wide


def test_csat_empty_state(app, shop):
    _tenant, admin, _agent = shop
    html = _client(app, admin).get("/metrics/dashboard?days=7").get_data(as_text=True)
    assert 'id="csat-empty"' in html and "No ratings in these 7 days" in html
