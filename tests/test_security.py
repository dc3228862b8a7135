"""Bad input and security: fuzzed socket frames, oversize frames, security headers."""

from __future__ import annotations

import json
import logging
import random
import string
import uuid

import pytest
import websocket

from models.accounts import Tenant
from models.chats import Agent
from tests.chat_client import ChatClient
from tests.conftest import PASSWORD, csrf_token_from, login
from tests.helpers import Browserless, receive_until

SITE = "http://fuzz.example"
KNOWN_TYPES = ["session_init", "message", "typing", "session_close", "cancel", "history", "rate"]
SERVER_TYPES = {"welcome", "session", "message", "delta", "done", "typing", "error", "history",
                "rated", "closed", "notice", "status"}  # fmt: skip
KNOWN_ERRORS = {
    "invalid_json",
    "unknown_type",
    "empty_message",
    "message_too_long",
    "rate_limited",
    "no_session",
    "assistant_unavailable",
    "invalid_rating",
    "invalid_history",
    "nothing_to_cancel",
    "not_found",
    "no_chat",
    "invalid_characters",
}


@pytest.fixture
def tenant(app, db, factory):
    t = factory.tenant("Fuzz")
    row = db.session.get(Tenant, t.id)
    row.allowed_origins = SITE
    db.session.add(Agent(tenant_id=t.id, name="A", model="m", is_default=True))
    db.session.commit()
    return row


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 5, 2**63, -(2**31), 3.5, float("1e308")])
    if kind == 3:
        return "".join(rng.choice(string.printable) for _ in range(rng.randrange(0, 40)))
    if kind == 4:
        return rng.choice(["", " ", "\u0000", "😀" * 50, "<script>alert(1)</script>", "x" * 3000])
    if kind == 5:
        return rng.choice(["00000000-0000-0000-0000-000000000000", "1", "-5", "nan"])
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {
        rng.choice(["id", "seq", "type", "x"]): _random_value(rng, depth + 1)
        for _ in range(rng.randrange(0, 4))
    }


def _random_frame(rng: random.Random) -> str | bytes:
    roll = rng.random()
    if roll < 0.08:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    if roll < 0.16:
        return "".join(rng.choice('{}[]":,ab01 \\') for _ in range(rng.randrange(1, 30)))
    if roll < 0.22:
        return json.dumps(_random_value(rng))
    frame = {"type": rng.choice(KNOWN_TYPES + ["", "__class__", "on_message", "x" * 500])}
    for field in rng.sample(["chat_id", "content", "before", "score", "resume", "reply_id"], 3):
        if rng.random() < 0.6:
            frame[field] = _random_value(rng)
    if frame["type"] == "message" and rng.random() < 0.3:
        frame["content"] = "hello " * rng.randrange(1, 5)
    return json.dumps(frame)


def test_fuzzed_chat_frames_get_clear_answers_and_never_break_the_socket(
    app, worker, live_server, tenant, caplog
):
    rng = random.Random(20261123)
    client = ChatClient(live_server.url, tenant.widget_key, SITE)
    caplog.set_level(logging.ERROR)
    for n in range(250):
        client.send_raw(_random_frame(rng))
        # A sentinel after every frame: its answer proves the socket still works and that
        # everything before it was answered with well-formed frames.
        client.send(f"zz_sentinel_{n}")
        while True:
            frame = client.recv(timeout=15)
            assert frame.get("type") in SERVER_TYPES, frame
            if frame["type"] == "error":
                assert frame["code"] in KNOWN_ERRORS, frame
                assert isinstance(frame.get("message"), str) and frame["message"], frame
                if frame["code"] == "unknown_type" and f"zz_sentinel_{n}" in frame["message"]:
                    break
    client.ws.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


def test_oversize_frame_closes_with_1009_and_the_server_keeps_serving(live_server, tenant):
    client = ChatClient(live_server.url, tenant.widget_key, SITE)
    client.ws.send("x" * (256 * 1024))
    opcode, data = client.ws.recv_data(control_frame=True)
    while opcode != websocket.ABNF.OPCODE_CLOSE:
        opcode, data = client.ws.recv_data(control_frame=True)
    assert int.from_bytes(data[:2], "big") == 1009
    client.ws.shutdown()
    again = ChatClient(live_server.url, tenant.widget_key, SITE)
    again.send("session_init")
    again.expect("session")
    again.ws.close()


def test_live_socket_ignores_garbage_and_keeps_delivering(app, worker, live_server, factory):
    user = factory.user()
    browser = Browserless(live_server.url).login(user.email, PASSWORD)
    ws = browser.open_socket(browser.live_url())
    try:
        ws.recv()  # the snapshot
        for junk in ("{", "[]", '{"type": 1}', "x" * 1000):
            ws.send(junk)
        ws.send_binary(b"\x00\xff")
        with app.app_context():
            from extensions import db

            db.session.add(Agent(tenant_id=user.tenant_id, name="After the junk", model="m"))
            db.session.commit()
        assert receive_until(ws, lambda f: "After the junk" in f)
    finally:
        ws.close()


def test_security_headers_on_console_pages(client, factory):
    login(client, factory.user())
    response = client.get("/")
    csp = response.headers["Content-Security-Policy"]
    directives = {part.split()[0]: part.split()[1:] for part in csp.split("; ")}
    assert directives["script-src"] == ["'self'"]  # no unsafe-inline, no unsafe-eval
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    assert directives["frame-ancestors"] == ["'none'"]
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "same-origin"
    # The widget script is loaded by other sites: plain JavaScript, never sniffed as HTML.
    widget = client.get("/static/widget.js")
    assert widget.mimetype in ("text/javascript", "application/javascript")
    assert widget.headers["X-Content-Type-Options"] == "nosniff"
    widget.close()


# ---------------------------------------------------------------- tenant isolation sweep


def _tenant_b_objects(app, db, runner) -> dict[str, int]:
    """The demo tenant (B) with one object of every kind a URL can name."""
    from sqlalchemy import select

    from models.chats import Agent as AgentModel
    from models.chats import Chat, EscalationRule
    from models.devices import Device, Location
    from models.notifications import Notification
    from models.projects import GeneratedProject, Project, ProjectFile, RepositoryExport
    from models.webhooks import WebhookDelivery, WebhookEndpoint

    assert runner.invoke(args=["demo", "load"]).exit_code == 0
    tenant_id = db.session.scalar(select(Chat.tenant_id).limit(1))
    generated = db.session.scalar(
        select(GeneratedProject).where(GeneratedProject.tenant_id == tenant_id).limit(1)
    )
    endpoint = WebhookEndpoint(tenant_id=tenant_id, url="https://hooks.example.com/", topics=["*"])
    db.session.add(endpoint)
    db.session.flush()
    export = RepositoryExport(
        tenant_id=tenant_id, generated_project_id=generated.id, format="zip", status="completed"
    )
    db.session.add(export)
    from models.accounts import User

    admin_id = db.session.scalar(select(User.id).where(User.tenant_id == tenant_id).limit(1))
    note = Notification(
        tenant_id=tenant_id, recipient_id=admin_id, type="test", title="private", subject="x"
    )
    db.session.add(note)
    db.session.flush()
    delivery = WebhookDelivery(
        tenant_id=tenant_id, endpoint_id=endpoint.id, event_pk=1, event_id=uuid.uuid4(), topic="t",
        attempt=1, succeeded=False, final=True,
    )  # fmt: skip
    db.session.add(delivery)
    rule = EscalationRule(tenant_id=tenant_id, language="any", phrase="private phrase")
    db.session.add(rule)
    from models.chats import CannedReply

    canned = CannedReply(tenant_id=tenant_id, shortcut="private", content="private reply")
    db.session.add(canned)
    from models.base import utcnow
    from models.devices import DiscoveredDevice, MaintenanceWindow, Manufacturer

    manufacturer_id = db.session.scalar(select(Manufacturer.id).limit(1))
    found = DiscoveredDevice(
        tenant_id=tenant_id, manufacturer_id=manufacturer_id, api_device_id="PRIVATE-1"
    )
    window = MaintenanceWindow(tenant_id=tenant_id, starts_at=utcnow(), ends_at=utcnow())
    db.session.add_all([found, window])
    db.session.commit()

    def first(model) -> int:
        return db.session.scalar(select(model.id).where(model.tenant_id == tenant_id).limit(1))

    return {
        "chat_id": first(Chat),
        "agent_id": first(AgentModel),
        "device_id": first(Device),
        "location_id": first(Location),
        "notification_id": note.id,
        "rule_id": rule.id,
        "canned_id": canned.id,
        "found_id": found.id,
        "window_id": window.id,
        "project_id": first(Project),
        "generated_id": generated.id,
        "export_id": export.id,
        "file_id": first(ProjectFile),
        "endpoint_id": endpoint.id,
        "delivery_id": delivery.id,
    }


def test_no_page_or_action_reaches_another_tenants_objects(app, db, client, runner, factory):
    ids = _tenant_b_objects(app, db, runner)
    assert all(ids.values()), ids
    outsider = factory.user(factory.tenant("Outsider Ltd"), role="admin")
    login(client, outsider)
    token = csrf_token_from(client.get("/").data)
    checked = []
    for rule in app.url_map.iter_rules():
        if not rule.arguments or rule.endpoint == "static":
            continue
        url = rule.rule
        for name in rule.arguments:
            url = url.replace(f"<int:{name}>", str(ids[name]))
        if "GET" in rule.methods:
            response = client.get(url)
            assert response.status_code == 404, (url, response.status_code)
            checked.append(("GET", url))
        if "POST" in rule.methods:
            response = client.post(
                url,
                data={"csrf_token": token, "content": "hi", "agent_id": ids["agent_id"],
                      "format": "zip", "prompt": "x", "url": "https://x.example/", "topics": "*"},
                headers={"X-CSRFToken": token},
            )  # fmt: skip
            assert response.status_code == 404, (url, response.status_code)
            checked.append(("POST", url))
    assert len(checked) >= 20
    # Nothing of B's changed hands: B's chat is still open, its endpoint still there, etc.
    from models.webhooks import WebhookEndpoint

    db.session.expire_all()
    assert db.session.get(WebhookEndpoint, ids["endpoint_id"]) is not None


def test_api_never_lists_another_tenants_records(app, db, client, runner, factory):
    ids = _tenant_b_objects(app, db, runner)
    outsider = factory.user(factory.tenant("Outsider Ltd"), role="admin")
    login(client, outsider)
    for path in (
        "/api/v2/devices/",
        f"/api/v2/devices/?device={ids['device_id']}",
        "/api/v2/activity-logs/",
        f"/api/v2/activity-logs/?device={ids['device_id']}",
    ):
        response = client.get(path)
        assert response.status_code in (200, 400), path
        if response.status_code == 200:
            assert response.get_json()["results"] == [], path
