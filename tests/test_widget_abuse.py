"""The public widget socket under attack: cost limits per client address and per widget key,
no empty chats, and hostile frames that must get a typed error and leave the socket usable.

Clients connect from other loopback addresses (127.0.0.2, 127.0.0.3, ...) when a test needs
more than one client address: the server then sees a different request.remote_addr, exactly
as it would see different machines.
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from urllib.parse import urlsplit

import pytest
import websocket
from sqlalchemy import func, select

from models.accounts import Tenant
from models.chats import Agent, Chat, Message
from tests.chat_client import ChatClient
from tests.conftest import LiveServer, drain
from tests.fake_openai import FakeOpenAI, Script

SITE = "http://shop.example"


class ChatClientFrom(ChatClient):
    """A ChatClient whose TCP connection leaves from `source_ip` (a loopback address)."""

    def __init__(self, base_url: str, key: str, source_ip: str, visitor: str | None = None) -> None:
        parts = urlsplit(base_url)
        url = f"ws://{parts.netloc}/ws/chat?key={key}"
        if visitor:
            url += f"&visitor={visitor}"
        raw = socket.socket()
        raw.settimeout(10)
        raw.bind((source_ip, 0))
        raw.connect((parts.hostname, parts.port))
        self.ws = websocket.WebSocket()
        self.ws.connect(url, origin=SITE, timeout=10, socket=raw)
        self.frames = []
        self.welcome = self.expect("welcome")


def _add_tenant(app, factory, name: str = "Shop") -> Tenant:
    from extensions import db

    t = factory.tenant(name)
    with app.app_context():
        row = db.session.get(Tenant, t.id)
        row.allowed_origins = SITE
        db.session.add(Agent(tenant_id=t.id, name="Helper", model="fake-model", is_default=True))
        db.session.commit()
        db.session.refresh(row)
        db.session.expunge(row)
    return row


@pytest.fixture
def tenant(app, factory):
    return _add_tenant(app, factory)


@pytest.fixture
def upstream(app):
    fake = FakeOpenAI(Script(reply="Happy to help.")).start()
    app.config.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="test-key")
    yield fake
    fake.stop()


@pytest.fixture
def clients():
    opened: list[ChatClient] = []
    yield opened
    for client in opened:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - already closed by the server
            pass


def _open(live_server, tenant, clients, source_ip: str = "127.0.0.1", **kw) -> ChatClient:
    client = ChatClientFrom(live_server.url, tenant.widget_key, source_ip, **kw)
    clients.append(client)
    return client


def _count(app, statement) -> int:
    from extensions import db

    with app.app_context():
        return db.session.scalar(statement)


def _model_calls(upstream) -> int:
    return sum(1 for r in upstream.records if r.body.get("stream"))


def _answer(client: ChatClient) -> dict:
    """The next frame that answers a visitor message: its ack or an error."""
    while True:
        frame = client.recv()
        if frame["type"] in ("message", "error"):
            return frame


# ---------------------------------------------------------------- cost limits


def test_many_sockets_from_one_address_cannot_start_many_chats(
    app, worker, live_server, tenant, upstream, clients
):
    """Each new socket is a new visitor, so the per-visitor limit alone resets with every
    socket: 25 sockets sending one message each made 25 chats and 25 model calls."""
    app.config["CHAT_NEW_CHATS_PER_IP_PER_HOUR"] = 10
    answers = []
    for _ in range(25):
        client = _open(live_server, tenant, clients)
        client.send("session_init")
        client.expect("session")
        client.send("message", content="Free tokens please")
        answers.append(_answer(client))
    accepted = [a for a in answers if a["type"] == "message"]
    refused = [a for a in answers if a["type"] == "error"]
    assert len(accepted) == 10 and len(refused) == 15
    for error in refused:
        assert error["code"] == "rate_limited", error
        assert 1 <= error["retry_after"] <= 3600
        assert "new conversations" in error["message"]
    drain(app)
    assert _count(app, select(func.count()).select_from(Chat)) == 10
    assert (
        _count(app, select(func.count()).select_from(Message).where(Message.sender == "visitor"))
        == 10
    )
    assert _model_calls(upstream) == 10

    # Another address is not affected by this one's limit.
    other = _open(live_server, tenant, clients, "127.0.0.2")
    other.send("session_init")
    other.expect("session")
    other.send("message", content="A real customer")
    assert _answer(other)["type"] == "message"


def test_messages_per_address_are_limited_across_visitors(app, live_server, tenant, clients):
    """Visitors from one address share CHAT_MESSAGES_PER_IP_PER_MINUTE, each staying under
    its own per-visitor limit."""
    app.config.update(CHAT_MESSAGES_PER_IP_PER_MINUTE=30, CHAT_RATE_LIMIT_PER_MINUTE=10)
    answers = []
    for _visitor in range(4):
        client = _open(live_server, tenant, clients)
        client.send("session_init")
        client.expect("session")
        for n in range(10):
            client.send("message", content=f"message {n}")
            answers.append(_answer(client))
    assert [a["type"] for a in answers] == ["message"] * 30 + ["error"] * 10
    assert {a["code"] for a in answers[30:]} == {"rate_limited"}
    assert all(1 <= a["retry_after"] <= 60 for a in answers[30:])
    assert _count(app, select(func.count()).select_from(Message)) == 30


def test_one_widget_key_has_a_ceiling_across_addresses(app, live_server, factory, clients):
    app.config["CHAT_MESSAGES_PER_WIDGET_PER_MINUTE"] = 5
    shop, other_shop = _add_tenant(app, factory, "Shop"), _add_tenant(app, factory, "Other")
    answers = []
    for n in range(2, 9):  # seven addresses, one message each
        client = _open(live_server, shop, clients, f"127.0.0.{n}")
        client.send("session_init")
        client.expect("session")
        client.send("message", content="hello")
        answers.append(_answer(client))
    assert [a["type"] for a in answers] == ["message"] * 5 + ["error"] * 2
    assert {a["code"] for a in answers[5:]} == {"rate_limited"}
    # The ceiling is per widget key: another tenant's widget still answers.
    client = _open(live_server, other_shop, clients, "127.0.0.9")
    client.send("session_init")
    client.expect("session")
    client.send("message", content="hello")
    assert _answer(client)["type"] == "message"


# ---------------------------------------------------------------- no empty chats


def test_opening_the_widget_creates_no_chat_until_the_first_message(
    app, live_server, tenant, clients
):
    client = _open(live_server, tenant, clients)
    client.send("session_init")
    session = client.expect("session")
    assert session["chat_id"] is None and session["messages"] == []
    for _ in range(3):
        other = _open(live_server, tenant, clients)
        other.send("session_init")
        other.expect("session")
    # Everything a widget can do before its first message: typed answers or nothing.
    client.send("typing")
    client.send("history", before=10)
    history = client.expect("history")
    assert history["messages"] == [] and history["has_more"] is False
    client.send("cancel")
    assert client.expect("error")["code"] == "nothing_to_cancel"
    client.send("rate", score=5)
    assert client.expect("error")["code"] == "no_chat"
    client.send("session_close")
    assert client.expect("error")["code"] == "no_chat"
    client.send("session_init", chat_id=str(uuid.uuid4()))
    assert client.expect("session")["chat_id"] is None
    assert _count(app, select(func.count()).select_from(Chat)) == 0

    client.send("message", content="Now I have a question")
    ack = client.expect("message")
    chat_id = ack["chat_id"]
    assert chat_id and ack["message"]["sender"] == "visitor"
    assert _count(app, select(func.count()).select_from(Chat)) == 1
    client.send("message", content="And a second one")
    assert client.expect("message")["chat_id"] == chat_id
    assert _count(app, select(func.count()).select_from(Chat)) == 1

    # The visitor comes back (a reload): same chat, both messages.
    again = _open(live_server, tenant, clients, visitor=client.welcome["visitor_token"])
    again.send("session_init", chat_id=chat_id)
    session = again.expect("session")
    assert session["chat_id"] == chat_id and len(session["messages"]) == 2


# ---------------------------------------------------------------- hostile frames

HUGE = 99999999999999999999
HOSTILE_FRAMES: list[tuple[str, str | bytes]] = [
    *[
        (f"history before={value!r}", json.dumps({"type": "history", "before": value}))
        for value in (HUGE, -1, 2**63, 2**31, "5", 1.5, [1], {"id": 1}, None, True)
    ],
    ("history limit=2**80", json.dumps({"type": "history", "before": 10, "limit": 2**80})),
    *[
        (f"cancel reply_id={value!r}", json.dumps({"type": "cancel", "reply_id": value}))
        for value in (
            f"r{HUGE}",
            "r-1",
            f"r{2**63}",
            f"r{2**31}",
            "r1e5",
            "r" + "9" * 5000,
            "r",
            "x1",
            HUGE,
            1.5,
            [1],
            None,
        )
    ],
    # resume positions name the reply a bare cancel stops
    (
        "session_init resume huge id",
        json.dumps({"type": "session_init", "resume": {f"r{HUGE}": 2**70}}),
    ),
    ("cancel after that resume", json.dumps({"type": "cancel"})),
    ("session_init chat_id=2**70", json.dumps({"type": "session_init", "chat_id": 2**70})),
    ("session_init chat_id list", json.dumps({"type": "session_init", "chat_id": [1, 2]})),
    ("session_init chat_id surrogate", '{"type": "session_init", "chat_id": "\\ud800"}'),
    ("deep list", "[" * 50_000),
    ("deep object", '{"a":' * 12_000),
    ("deep value in a frame", '{"type": "message", "content": ' + "[" * 30_000),
    ("NUL content", json.dumps({"type": "message", "content": "\u0000"})),
    ("NUL inside content", json.dumps({"type": "message", "content": "hi\u0000there"})),
    ("lone high surrogate", '{"type": "message", "content": "\\ud800"}'),
    ("lone low surrogate", '{"type": "message", "content": "ok \\udfff"}'),
    ("surrogate in type", '{"type": "\\ud800"}'),
    ("number", "5"),
    ("list", "[]"),
    ("string", '"message"'),
    ("null", "null"),
    ("unknown type", json.dumps({"type": "teleport"})),
    ("non-string type", json.dumps({"type": 7})),
    ("binary", b"\x00\xff\xfe"),
    ("binary json", json.dumps({"type": "message", "content": "x"}).encode()),
    ("rate score 2**70", json.dumps({"type": "rate", "score": 2**70})),
    ("rate score string", json.dumps({"type": "rate", "score": "5"})),
    ("content object", json.dumps({"type": "message", "content": {"a": [1]}})),
    ("content huge number", json.dumps({"type": "message", "content": HUGE})),
]


@pytest.fixture(params=["sqlite", "postgresql"])
def any_backend(request):
    """(app, live server, tenant) on SQLite (embedded) or PostgreSQL + Redis (production)."""
    if request.param == "sqlite":
        application = request.getfixturevalue("app")
        make = request.getfixturevalue("factory")
    else:
        application = request.getfixturevalue("prod_app")
        make = request.getfixturevalue("prod_factory")
    # Probes below send many valid messages; the cost limits are not under test here.
    application.config.update(
        CHAT_RATE_LIMIT_PER_MINUTE=10_000,
        CHAT_NEW_CHATS_PER_IP_PER_HOUR=10_000,
        CHAT_MESSAGES_PER_IP_PER_MINUTE=10_000,
        CHAT_MESSAGES_PER_WIDGET_PER_MINUTE=10_000,
    )
    shop = _add_tenant(application, make)
    server = LiveServer(application).start()
    yield application, server, shop
    server.stop()


def test_hostile_frames_get_a_typed_error_and_the_socket_stays_usable(any_backend, clients, caplog):
    app, server, shop = any_backend
    caplog.set_level(logging.ERROR)
    client = _open(server, shop, clients)
    client.send("session_init")
    client.expect("session")
    client.send("message", content="first")
    client.expect("message")
    failures = []
    for n, (label, raw) in enumerate(HOSTILE_FRAMES):
        try:
            client.send_raw(raw)
            answers = []
            probe = f"probe {n}"
            client.send("message", content=probe)
            while True:  # every answer up to the probe's ack
                frame = client.recv(timeout=10)
                if frame["type"] == "message" and frame["message"]["html"] == probe:
                    break
                answers.append(frame)
        except (websocket.WebSocketException, OSError, ValueError) as exc:
            failures.append(f"{label}: socket died ({exc!r})")
            client = _open(server, shop, clients)
            client.send("session_init")
            client.expect("session")
            continue
        errors = [f for f in answers if f["type"] == "error"]
        # A new session or a clamped page size is a fine answer; everything else is refused.
        if not label.startswith(("session_init", "history limit")) and not errors:
            failures.append(f"{label}: no error frame, got {answers}")
        for error in errors:
            if not (isinstance(error.get("code"), str) and error.get("message")):
                failures.append(f"{label}: untyped error {error}")
    assert failures == [], "\n".join(failures)
    # Nothing hostile was stored, and no traceback was logged.
    from extensions import db

    with app.app_context():
        contents = db.session.scalars(select(Message.content)).all()
    assert all("\x00" not in c and "\ud800" not in c and "\udfff" not in c for c in contents)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_history_with_out_of_range_ids_is_refused_clearly(any_backend, clients):
    """`before` beyond the database's integer range used to reach the query."""
    _app, server, shop = any_backend
    client = _open(server, shop, clients)
    client.send("session_init")
    client.expect("session")
    client.send("message", content="hello")
    client.expect("message")
    for before in (HUGE, 2**63, -1, 0):
        client.send("history", before=before)
        error = client.expect("error")
        assert error["code"] == "invalid_history", (before, error)
    client.send("history", before=2**31 - 1)  # the largest id there can be: everything
    assert [m["html"] for m in client.expect("history")["messages"]] == ["hello"]


def test_new_chat_limit_is_shared_through_redis_in_production_mode(prod_app, prod_factory, clients):
    """Production mode counts in Redis: every web process sees the same counts."""
    prod_app.config["CHAT_NEW_CHATS_PER_IP_PER_HOUR"] = 2
    shop = _add_tenant(prod_app, prod_factory)
    servers = [LiveServer(prod_app).start(), LiveServer(prod_app).start()]
    try:
        answers = []
        for n in range(4):  # alternating between two servers, as behind a load balancer
            client = _open(servers[n % 2], shop, clients, "127.0.0.5")
            client.send("session_init")
            client.expect("session")
            client.send("message", content="hello")
            answers.append(_answer(client))
    finally:
        for server in servers:
            server.stop()
    assert [a["type"] for a in answers] == ["message", "message", "error", "error"]
    assert answers[2]["code"] == "rate_limited" and answers[2]["scope"] == "ip_new_chats"
    assert _count(prod_app, select(func.count()).select_from(Chat)) == 2
