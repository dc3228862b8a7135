"""The notifications list, a webhook's deliveries and the Metrics page change live over
/ws/live, for their own user or tenant only; feed items link to what they are about; keyset
lists page both ways ("Newer", "First page")."""

from __future__ import annotations

import re

import pytest

from events import emit
from models.webhooks import WebhookEndpoint
from tests.conftest import PASSWORD, login
from tests.helpers import Browserless, receive_for, receive_until
from tests.test_webhook_delivery import Receiver


@pytest.fixture
def two_tenants(factory):
    alpha = factory.tenant("Alpha")
    beta = factory.tenant("Beta")
    ada = factory.user(alpha, role="admin", email="ada@alpha.example")
    bo = factory.user(alpha, role="admin", email="bo@alpha.example")
    cy = factory.user(beta, role="admin", email="cy@beta.example")
    return alpha, beta, ada, bo, cy


def _emit(app, topic: str, tenant_id: int, **fields) -> None:
    from extensions import db

    with app.app_context():
        emit(topic, tenant_id=tenant_id, **fields)
        db.session.commit()


def _open(live_server, user, path: str):
    session = Browserless(live_server.url).login(user.email, PASSWORD)
    ws = session.open_socket(session.live_url(path))
    receive_for(ws, 0.3)  # the snapshots
    return ws


def test_a_new_notification_appears_on_its_recipients_list_only(
    app, worker, live_server, two_tenants
):
    alpha, beta, ada, _bo, cy = two_tenants
    ws_ada = _open(live_server, ada, "/notifications/")
    ws_cy = _open(live_server, cy, "/notifications/")
    try:
        _emit(
            app,
            "escalation.triggered",
            alpha.id,
            entity="chat",
            entity_id=41,
            payload={"excerpt": "Alpha is upset", "label": "Negative message"},
        )
        frames = receive_until(ws_ada, lambda f: 'id="notification-list"' in f, timeout=10)
        row = frames[-1]
        assert 'hx-swap-oob="afterbegin"' in row and re.search(r'id="notification-\d+"', row)
        # Beta's admin is in another tenant: nothing of Alpha's reaches their list.
        assert not any("notification-list" in f for f in receive_for(ws_cy, 1.0))
    finally:
        ws_ada.close()
        ws_cy.close()


def test_a_users_notification_rows_go_to_that_user_alone(app, worker, live_server, factory):
    tenant = factory.tenant("Gamma")
    admin = factory.user(tenant, role="admin", email="admin@gamma.example")
    agent = factory.user(tenant, role="agent", email="agent@gamma.example")
    ws_agent = _open(live_server, agent, "/notifications/")
    ws_admin = _open(live_server, admin, "/notifications/")
    try:
        # Escalations go to the tenant's admins, not to an agent.
        _emit(app, "escalation.triggered", tenant.id, entity="chat", entity_id=5, payload={})
        receive_until(ws_admin, lambda f: 'id="notification-list"' in f, timeout=10)
        assert not any("notification-list" in f for f in receive_for(ws_agent, 1.0))
    finally:
        ws_agent.close()
        ws_admin.close()


def test_a_webhook_attempt_appears_on_the_endpoints_deliveries_list(
    app, worker, live_server, two_tenants
):
    from extensions import db

    alpha, beta, ada, _bo, cy = two_tenants
    receiver = Receiver()
    try:
        with app.app_context():
            endpoint = WebhookEndpoint(tenant_id=alpha.id, url=receiver.url, topics=["test.*"])
            other = WebhookEndpoint(tenant_id=beta.id, url=receiver.url, topics=["test.*"])
            db.session.add_all([endpoint, other])
            db.session.commit()
            endpoint_id, other_id = endpoint.id, other.id
        ws_ada = _open(live_server, ada, f"/webhooks/{endpoint_id}")
        ws_cy = _open(live_server, cy, f"/webhooks/{other_id}")
        try:
            _emit(app, "test.ping", alpha.id, entity="test", entity_id=7, payload={})
            frames = receive_until(ws_ada, lambda f: 'id="delivery-' in f, timeout=15)
            assert 'id="deliveries" hx-swap-oob="true"' in frames[-1]
            assert "test.ping" in frames[-1]
            assert not any("deliveries" in f for f in receive_for(ws_cy, 1.0))
        finally:
            ws_ada.close()
            ws_cy.close()
    finally:
        receiver.stop()


def test_metrics_page_counters_update_for_its_tenant_only(app, worker, live_server, two_tenants):
    alpha, _beta, ada, _bo, cy = two_tenants
    app.config["METRICS_LIVE_DELAY_MS"] = 100
    ws_ada = _open(live_server, ada, "/metrics/dashboard?days=7")
    ws_cy = _open(live_server, cy, "/metrics/dashboard?days=7")
    try:
        for n in range(3):
            _emit(app, "chat.created", alpha.id, entity="chat", entity_id=900 + n, payload={})
        frames = receive_until(ws_ada, lambda f: "3 chats," in f, timeout=15)
        assert 'id="metrics-live" hx-swap-oob="true"' in frames[-1]
        assert "<svg" in frames[-1]  # the charts come with the counters
        assert not any("metrics-live" in f for f in receive_for(ws_cy, 1.0))
    finally:
        ws_ada.close()
        ws_cy.close()


def test_feed_items_link_to_their_chat_device_or_project(app, client, factory):
    from extensions import db

    tenant = factory.tenant("Links")
    user = factory.user(tenant)
    with app.app_context():
        emit("chat.updated", tenant_id=tenant.id, entity="chat", entity_id=11, payload={})
        emit("device.updated", tenant_id=tenant.id, entity="device", entity_id=12, payload={})
        emit("project.created", tenant_id=tenant.id, entity="project", entity_id=13, payload={})
        emit(
            "message.created",
            tenant_id=tenant.id,
            entity="message",
            entity_id=99,
            payload={"fields": {"chat_id": 14}},
        )
        db.session.commit()
    login(client, user)
    page = client.get("/").get_data(as_text=True)
    for href in ("/chats/11", "/devices/12", "/projects/13", "/chats/14"):
        assert f'href="{href}"' in page, href


def _hrefs(html: str, text: str) -> list[str]:
    return [
        href.replace("&amp;", "&")
        for href in re.findall(rf'<a[^>]*href="([^"]+)"[^>]*>{text}</a>', html)
    ]


def test_keyset_lists_have_newer_and_first_page_links_past_the_first_page(app, client, factory):
    from extensions import db
    from models.audit import AuditLog
    from models.base import utcnow
    from models.notifications import Notification

    tenant = factory.tenant("Pages")
    user = factory.user(tenant)
    app.config.update(LIST_PAGE_SIZE=3, FEED_PAGE_SIZE=3)
    with app.app_context():
        for n in range(8):
            db.session.add(
                Notification(
                    tenant_id=tenant.id,
                    recipient_id=user.id,
                    type="escalation",
                    subject=f"s{n}",
                    title=f"Note {n}",
                    body="",
                    link="",
                    created_at=utcnow(),
                )
            )
            emit("note.posted", tenant_id=tenant.id, payload={"label": f"event {n}"})
            db.session.add(AuditLog(tenant_id=tenant.id, action="test.step", object_type="test"))
        db.session.commit()
    login(client, user)

    for path in ("/notifications/", "/"):
        first = client.get(path).get_data(as_text=True)
        assert not _hrefs(first, "Newer") and not _hrefs(first, "First page"), path
        older = _hrefs(first, "Older") or re.findall(r'href="([^"]*before=\d+)"', first)
        assert older, path
        second = client.get(older[0].replace("&amp;", "&"))
        assert second.status_code == 200
        html = second.get_data(as_text=True)
        assert _hrefs(html, "First page") == [path], path
        newer = _hrefs(html, "Newer")
        assert newer, path
        # "Newer" from the second page shows the first page's items again.
        back = client.get(newer[0]).get_data(as_text=True)
        shown = re.findall(r"(?:Note|event) (\d)<", back)
        assert shown == re.findall(r"(?:Note|event) (\d)<", first), path

    for path in ("/audit/", f"/webhooks/{_endpoint(app, tenant.id)}", "/devices/activity"):
        assert client.get(path).status_code == 200
        deeper = client.get(f"{path}?before=1000000").get_data(as_text=True)
        assert _hrefs(deeper, "First page") == [path], path
        assert _hrefs(deeper, "Newer"), path
        first = client.get(path).get_data(as_text=True)
        assert not _hrefs(first, "First page") and not _hrefs(first, "Newer"), path


def _endpoint(app, tenant_id: int) -> int:
    from extensions import db

    with app.app_context():
        endpoint = WebhookEndpoint(tenant_id=tenant_id, url="https://hooks.example/x", topics=[])
        db.session.add(endpoint)
        db.session.commit()
        return endpoint.id
