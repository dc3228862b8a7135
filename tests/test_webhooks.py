"""Outgoing webhooks against a real local HTTP server: signature, retries, give-up, disabling,
and the admin pages (create, tenant isolation, roles, re-send)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from events import emit
from models.events import OutboxEvent
from models.webhooks import WebhookDelivery, WebhookEndpoint
from tests.conftest import csrf_token_from, drain, free_port, login


class Receiver:
    """A local HTTP server that records every request and answers with planned codes."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.plan: list[int] = []
        self.default = 200
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    code = receiver.plan.pop(0) if receiver.plan else receiver.default
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.stop()


@pytest.fixture
def fast(app):
    app.config.update(
        WEBHOOK_RETRY_MIN_MS=50,
        WEBHOOK_RETRY_MAX_MS=200,
        WEBHOOK_TIMEOUT_SECONDS=3,
        WEBHOOK_MAX_ATTEMPTS=3,
        WEBHOOK_DISABLE_AFTER_FAILURES=5,
    )
    return app


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _endpoint(db, tenant, url, topics):
    endpoint = WebhookEndpoint(tenant_id=tenant.id, url=url, topics=topics)
    db.session.add(endpoint)
    db.session.commit()
    return endpoint.id, endpoint.secret


def _deliveries(db, endpoint_id):
    db.session.expire_all()
    return db.session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint_id)
        .order_by(WebhookDelivery.id)
    ).all()


def _ping(db, tenant, topic="test.ping", **payload):
    event_id = emit(topic, tenant_id=tenant.id, payload=payload, entity="test", entity_id=7)
    db.session.commit()
    return event_id


def _verify(request, secret):
    headers = request["headers"]
    timestamp = headers["X-Switchboard-Timestamp"]
    assert abs(int(timestamp) - time.time()) < 60
    expected = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + request["body"], hashlib.sha256
    ).hexdigest()
    assert headers["X-Switchboard-Signature"] == f"sha256={expected}"
    return json.loads(request["body"])


def test_matching_event_is_posted_signed(app, db, worker, fast, factory, receiver):
    from models.chats import Chat

    tenant = factory.tenant()
    other = factory.tenant()
    endpoint_id, secret = _endpoint(db, tenant, receiver.url, ["chat.*"])
    _endpoint(db, other, receiver.url + "/other", ["*"])  # another tenant's: never gets ours

    chat = Chat(tenant_id=tenant.id, title="Hello")
    db.session.add(chat)
    db.session.commit()
    _ping(db, tenant, topic="device_record.updated")  # does not match chat.*
    drain(app)

    ours = [r for r in receiver.requests if r["path"] == "/hook"]
    assert len(ours) == 1
    body = _verify(ours[0], secret)
    assert ours[0]["headers"]["X-Switchboard-Event"] == "chat.created"
    assert ours[0]["headers"]["Content-Type"] == "application/json"
    assert body["topic"] == "chat.created"
    assert body["tenant_id"] == tenant.id and body["entity"] == "chat"
    assert body["entity_id"] == chat.id
    assert set(body) == {"id", "topic", "tenant_id", "entity", "entity_id", "payload", "created_at"}
    assert "secret" not in ours[0]["body"].decode()
    (delivery,) = _deliveries(db, endpoint_id)
    assert delivery.succeeded and delivery.final and delivery.status_code == 200
    assert delivery.attempt == 1 and str(delivery.event_id) == body["id"]
    assert delivery.latency_ms is not None

    # A wrong secret does not verify.
    with pytest.raises(AssertionError):
        _verify(ours[0], "whsec_wrong")


def test_500_then_200_is_retried(app, db, worker, fast, factory, receiver):
    tenant = factory.tenant()
    endpoint_id, secret = _endpoint(db, tenant, receiver.url, ["test.*"])
    receiver.plan = [500]
    event_id = _ping(db, tenant, n=1)
    drain(app)
    wait_for(lambda: len(_deliveries(db, endpoint_id)) == 2)

    first, second = _deliveries(db, endpoint_id)
    assert first.status_code == 500 and not first.succeeded and not first.final
    assert first.outcome == "will retry"
    assert second.status_code == 200 and second.succeeded and second.final
    assert (first.attempt, second.attempt) == (1, 2)
    assert len(receiver.requests) == 2
    bodies = [_verify(r, secret) for r in receiver.requests]
    assert bodies[0]["id"] == bodies[1]["id"] == str(event_id)
    assert bodies[1]["payload"] == {"n": 1}
    assert db.session.get(WebhookEndpoint, endpoint_id).consecutive_failures == 0


def test_always_500_gives_up_and_disables(app, db, worker, fast, factory, receiver):
    app.config["WEBHOOK_DISABLE_AFTER_FAILURES"] = 1
    tenant = factory.tenant()
    endpoint_id, _ = _endpoint(db, tenant, receiver.url, ["test.ping"])
    receiver.default = 500
    _ping(db, tenant)
    drain(app)
    wait_for(lambda: any(d.final for d in _deliveries(db, endpoint_id)))
    drain(app)

    rows = _deliveries(db, endpoint_id)
    assert [d.attempt for d in rows] == [1, 2, 3]
    assert [d.final for d in rows] == [False, False, True]
    assert all(d.status_code == 500 and not d.succeeded for d in rows)
    assert "gave up after 3 attempts" in rows[-1].error
    assert rows[-1].outcome == "gave up"
    assert len(receiver.requests) == 3

    endpoint = db.session.get(WebhookEndpoint, endpoint_id)
    assert endpoint.is_active is False and endpoint.consecutive_failures == 1
    assert "Disabled" in endpoint.disabled_reason
    disabled = db.session.scalars(
        select(OutboxEvent).where(OutboxEvent.topic == "webhook_endpoint.disabled")
    ).all()
    assert len(disabled) == 1
    assert disabled[0].entity_id == endpoint_id and disabled[0].tenant_id == tenant.id

    # Disabled: later events are not sent.
    _ping(db, tenant)
    drain(app)
    assert len(receiver.requests) == 3


def test_4xx_is_final_and_counts_once(app, db, worker, fast, factory, receiver):
    tenant = factory.tenant()
    endpoint_id, _ = _endpoint(db, tenant, receiver.url, ["test.ping"])
    receiver.default = 410
    _ping(db, tenant)
    drain(app)
    (row,) = wait_for(lambda: _deliveries(db, endpoint_id))
    assert row.status_code == 410 and row.final and not row.succeeded
    assert db.session.get(WebhookEndpoint, endpoint_id).consecutive_failures == 1
    assert db.session.get(WebhookEndpoint, endpoint_id).is_active is True


def test_network_error_is_retried(app, db, worker, fast, factory):
    app.config["WEBHOOK_MAX_ATTEMPTS"] = 2
    tenant = factory.tenant()
    endpoint_id, _ = _endpoint(db, tenant, f"http://127.0.0.1:{free_port()}/closed", ["test.*"])
    _ping(db, tenant)
    drain(app)
    wait_for(lambda: any(d.final for d in _deliveries(db, endpoint_id)))

    rows = _deliveries(db, endpoint_id)
    assert [d.attempt for d in rows] == [1, 2]
    assert all(d.status_code is None and "network error" in d.error for d in rows)
    assert [d.final for d in rows] == [False, True]


def test_admin_pages_create_isolate_and_resend(app, client, worker, fast, factory, receiver):
    tenant = factory.tenant()
    admin = factory.user(tenant, role="admin")
    agent = factory.user(tenant, role="agent")
    outsider = factory.user(factory.tenant(), role="admin")

    login(client, admin)
    page = client.get("/webhooks/")
    assert page.status_code == 200
    token = csrf_token_from(page.data)

    # Validation: not http(s), escaped on the way back.
    bad = client.post(
        "/webhooks/", data={"csrf_token": token, "url": "javascript:<b>x</b>", "topics": ""}
    )
    assert bad.status_code == 422
    assert b"<b>x</b>" not in bad.data and b"http://" in bad.data
    # Without the CSRF token the form is refused.
    assert client.post("/webhooks/", data={"url": receiver.url}).status_code == 400

    created = client.post(
        "/webhooks/", data={"csrf_token": token, "url": receiver.url, "topics": "test.ping, x.*"}
    )
    assert created.status_code == 303
    location = created.headers["Location"]
    with app.app_context():
        from extensions import db

        endpoint = db.session.scalars(select(WebhookEndpoint)).one()
        endpoint_id, secret = endpoint.id, endpoint.secret
        assert endpoint.topics == ["test.ping", "x.*"] and endpoint.tenant_id == tenant.id
        emit("test.ping", tenant_id=tenant.id, payload={"a": 1})
        db.session.commit()
    assert location.endswith(f"/webhooks/{endpoint_id}")
    drain(app)
    assert len(receiver.requests) == 1

    detail = client.get(f"/webhooks/{endpoint_id}")
    assert detail.status_code == 200
    assert secret.encode() in detail.data and b"delivered" in detail.data
    assert client.get(f"/webhooks/{endpoint_id}?before=1").status_code == 200  # keyset page

    with app.app_context():
        from extensions import db

        (delivery,) = db.session.scalars(select(WebhookDelivery)).all()
        delivery_id = delivery.id
    token = csrf_token_from(detail.data)
    resent = client.post(
        f"/webhooks/{endpoint_id}/deliveries/{delivery_id}/resend", data={"csrf_token": token}
    )
    assert resent.status_code == 303
    drain(app)
    assert len(receiver.requests) == 2
    first, second = (_verify(r, secret) for r in receiver.requests)
    assert first["id"] == second["id"]
    with app.app_context():
        from extensions import db

        rows = db.session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
        assert [r.is_resend for r in rows] == [False, True]
        assert rows[1].succeeded

    # Rotate the secret: new requests are signed with the new one.
    rotated = client.post(f"/webhooks/{endpoint_id}/rotate-secret", data={"csrf_token": token})
    assert rotated.status_code == 303
    with app.app_context():
        from extensions import db

        new_secret = db.session.get(WebhookEndpoint, endpoint_id).secret
    assert new_secret != secret

    # Edit: deactivate.
    saved = client.post(
        f"/webhooks/{endpoint_id}",
        data={"csrf_token": token, "url": receiver.url, "topics": "test.*"},
    )
    assert saved.status_code == 303
    with app.app_context():
        from extensions import db

        endpoint = db.session.get(WebhookEndpoint, endpoint_id)
        assert endpoint.is_active is False and endpoint.topics == ["test.*"]

    # Another tenant's admin: 404 everywhere; an agent: 403.
    other = app.test_client()
    login(other, outsider)
    assert other.get(f"/webhooks/{endpoint_id}").status_code == 404
    other_token = csrf_token_from(other.get("/webhooks/").data)
    assert (
        other.post(
            f"/webhooks/{endpoint_id}/deliveries/{delivery_id}/resend",
            data={"csrf_token": other_token},
        ).status_code
        == 404
    )
    assert (
        other.post(
            f"/webhooks/{endpoint_id}/rotate-secret", data={"csrf_token": other_token}
        ).status_code
        == 404
    )
    assert secret.encode() not in other.get("/webhooks/").data

    agent_client = app.test_client()
    login(agent_client, agent)
    assert agent_client.get("/webhooks/").status_code == 403
    assert agent_client.get(f"/webhooks/{endpoint_id}").status_code == 403


def test_private_addresses_are_refused_unless_allowed(
    app, db, client, worker, fast, factory, monkeypatch
):
    import socket

    from services import webhooks as svc

    # No DNS here: the public name gets a public answer, every other lookup the real one.
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "hooks.example.com":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    app.config["WEBHOOK_ALLOW_PRIVATE_NETWORKS"] = False
    with app.test_request_context():
        for url in (
            "http://127.0.0.1:6379/",
            "http://localhost/hook",
            "http://[::1]/hook",
            "http://10.0.0.8/hook",
            "http://[::ffff:192.168.1.1]/hook",
        ):
            with pytest.raises(ValueError, match="private network"):
                svc.validate_url(url)
        with pytest.raises(ValueError, match="metadata"):
            svc.validate_url("http://169.254.169.254/latest/meta-data")
        assert svc.validate_url("https://hooks.example.com/x") == "https://hooks.example.com/x"

    # The form says why, and stores nothing.
    tenant = factory.tenant()
    admin = factory.user(tenant, role="admin")
    login(client, admin)
    page = client.get("/webhooks/")
    response = client.post(
        "/webhooks/",
        data={
            "url": "http://127.0.0.1:6379/",
            "topics": "*",
            "csrf_token": csrf_token_from(page.data),
        },
    )
    assert response.status_code == 422 and b"private network" in response.data
    assert db.session.scalars(select(WebhookEndpoint)).all() == []

    # A name that resolves into a private network at delivery time (an endpoint saved before
    # its DNS changed) is refused once, unsent, without retries.
    endpoint_id, _ = _endpoint(db, tenant, "http://localhost:9/hook", ["test.ping"])
    _ping(db, tenant)
    drain(app)
    rows = wait_for(lambda: _deliveries(db, endpoint_id))
    (row,) = rows
    assert row.final and not row.succeeded and "private network" in row.error
