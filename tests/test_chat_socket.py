"""The widget protocol over a real /ws/chat socket against a local OpenAI-compatible server."""

from __future__ import annotations

import time
import uuid

import pytest
import websocket
from sqlalchemy import select

from models.accounts import Tenant
from models.chats import Agent, Chat, Message
from tests.chat_client import ChatClient
from tests.conftest import drain
from tests.fake_openai import FakeOpenAI, Script

SITE = "http://shop.example"


@pytest.fixture
def upstream(app):
    fake = FakeOpenAI(Script()).start()
    app.config.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="test-key")
    yield fake
    fake.stop()


@pytest.fixture
def tenant(app, factory):
    from extensions import db

    t = factory.tenant("Shop")
    with app.app_context():
        row = db.session.get(Tenant, t.id)
        row.allowed_origins = SITE
        db.session.add(
            Agent(
                tenant_id=t.id,
                name="Helper",
                model="fake-model",
                is_default=True,
                system_prompt="You help shoppers.",
            )
        )
        db.session.commit()
        db.session.refresh(row)
        db.session.expunge(row)
    return row


@pytest.fixture
def connect(live_server, tenant):
    clients: list[ChatClient] = []

    def open_client(visitor: str | None = None, origin: str = SITE) -> ChatClient:
        client = ChatClient(live_server.url, tenant.widget_key, origin, visitor=visitor)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()


def _db(app):
    from extensions import db

    return db


def _open_chat(connect, content: str):
    """A new visitor whose first message has started a chat: (client, the chat's public id)."""
    client = connect()
    client.send("session_init")
    client.expect("session")
    client.send("message", content=content)
    return client, client.expect("message")["chat_id"]


def test_streamed_reply_arrives_in_order_and_is_saved(app, worker, upstream, connect):
    upstream.script.reply = "Orders ship within two working days from our warehouse."
    client = connect()
    session = client.send("session_init") or client.expect("session")
    assert session["messages"] == [] and session["status"] == "active"
    client.send("message", content="When will my order ship?")
    ack = client.expect("message")
    assert ack["message"]["sender"] == "visitor"
    deltas, done = client.collect_reply()
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d["text"] for d in deltas) == upstream.script.reply
    assert done["message"]["sender"] == "assistant" and not done["cancelled"]
    # The model's 9 tokens came at once: a few frames carry them.
    assert 1 <= len(deltas) < 9
    assert done["usage"]["completion_tokens"] == deltas[-1]["chunks"] == done["chunks"] == 9
    assert done["seq"] == len(deltas)

    with app.app_context():
        db = _db(app)
        reply = db.session.get(Message, done["message"]["id"])
        assert reply.content == upstream.script.reply
        assert reply.in_response_to_id == ack["message"]["id"]
        assert reply.total_tokens and reply.processing_ms is not None
        chat = db.session.scalars(select(Chat)).one()
        assert chat.message_count == 2
    # The model saw the agent's system prompt, model and the visitor's message, asked with
    # the configured key on the chat-completions endpoint.
    assert upstream.records[-1].path == "/v1/chat/completions"
    assert upstream.records[-1].authorization == "Bearer test-key"
    sent = upstream.records[-1].body
    assert sent["model"] == "fake-model" and sent["stream"] is True
    # (followed by the reply-language instruction, in the visitor's language)
    system = sent["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("You help shoppers.\n\n")
    assert "Always reply in English" in system["content"]
    assert sent["messages"][-1] == {"role": "user", "content": "When will my order ship?"}


def test_the_visitor_sees_their_message_before_the_reply(
    app, worker, upstream, connect, monkeypatch
):
    """The reply is queued as soon as the message commits, ahead of the commit's events; when
    sending those is slow (a busy Redis), the reply must still not overtake the message."""
    import events.dispatch

    send_events = events.dispatch.dispatch_new

    def slow_dispatch(*args, **kwargs):
        time.sleep(0.4)
        return send_events(*args, **kwargs)

    monkeypatch.setattr(events.dispatch, "dispatch_new", slow_dispatch)
    upstream.script.reply = "A quick answer."
    client = connect()
    client.send("session_init")
    client.expect("session")
    client.send("message", content="Quick question?")
    deltas, done = client.collect_reply()
    assert "".join(d["text"] for d in deltas) == "A quick answer."
    kinds = [f["type"] for f in client.frames if f["type"] in ("message", "typing", "delta")]
    assert kinds[0] == "message", kinds  # the ack, then typing and the deltas


def test_cancel_stops_the_upstream_call(app, worker, upstream, connect):
    upstream.script.reply = " ".join(f"word{i}" for i in range(200))
    upstream.script.chunk_delay = 0.02
    client = connect()
    client.send("session_init")
    client.expect("session")
    client.send("message", content="Tell me everything")
    client.expect("delta")
    client.send("cancel")
    deltas, done = client.collect_reply()
    assert done["cancelled"] is True
    deadline = time.monotonic() + 5
    while not upstream.records[-1].client_gone and time.monotonic() < deadline:
        time.sleep(0.05)
    record = upstream.records[-1]
    assert record.client_gone and not record.finished  # the model call itself was stopped
    assert record.chunks_sent < 200
    with app.app_context():
        saved = _db(app).session.get(Message, done["message"]["id"])
        assert 0 < len(saved.content) < len(upstream.script.reply)


def _drop_mid_reply(upstream, connect, deltas: int) -> tuple[str, str, list[dict]]:
    """A visitor asks for a long streamed reply and their connection drops after `deltas`
    deltas: their visitor token, the chat's id and the deltas they saw."""
    upstream.script.reply = " ".join(f"t{i}" for i in range(60))
    upstream.script.chunk_delay = 0.03
    first = connect()
    token = first.welcome["visitor_token"]
    first.send("session_init")
    first.expect("session")
    first.send("message", content="Stream please")
    chat_id = first.expect("message")["chat_id"]  # the first message creates the chat
    seen = [first.expect("delta") for _ in range(deltas)]
    first.close()  # the visitor's connection drops mid-stream
    return token, chat_id, seen


def test_deltas_that_arrive_while_a_reconnect_is_resumed_are_not_lost(
    app, worker, upstream, connect, monkeypatch
):
    """The reply goes on streaming while the reconnected socket sends its session and replays
    the stream: the deltas published meanwhile must neither go out before the session frame
    nor make the replay skip the ones before them."""
    from services import chats as chat_service

    token, chat_id, seen = _drop_mid_reply(upstream, connect, deltas=3)
    reply_id = seen[-1]["reply_id"]

    # The session's history is read slowly (a busy database): live deltas come meanwhile.
    read_history = chat_service.recent_messages

    def slow_history(*args, **kwargs):
        time.sleep(0.3)
        return read_history(*args, **kwargs)

    monkeypatch.setattr(chat_service, "recent_messages", slow_history)
    again = connect(visitor=token)
    again.send("session_init", chat_id=chat_id, resume={reply_id: seen[-1]["seq"]})
    assert again.expect("session")["chat_id"] == chat_id
    early = [f for f in again.frames if f.get("type") == "delta"]
    assert early == []  # nothing of the reply went out before the session
    rest, done = again.collect_reply()
    assert rest, "the reply ended before the reconnect"
    seqs = [d["seq"] for d in seen] + [d["seq"] for d in rest]
    assert seqs == list(range(1, len(seqs) + 1))
    assert "".join(d["text"] for d in seen + rest) == upstream.script.reply
    assert done["message"]["html"].startswith("<p>t0 t1")


def test_reconnect_resumes_without_duplicates_or_gaps(app, worker, upstream, connect):
    token, chat_id, seen = _drop_mid_reply(upstream, connect, deltas=5)
    reply_id = seen[-1]["reply_id"]

    again = connect(visitor=token)
    again.send("session_init", chat_id=chat_id, resume={reply_id: seen[-1]["seq"]})
    assert again.expect("session")["chat_id"] == chat_id
    rest, done = again.collect_reply()
    seqs = [d["seq"] for d in seen] + [d["seq"] for d in rest]
    if rest:
        assert seqs == list(range(1, len(seqs) + 1))
        text = "".join(d["text"] for d in seen + rest)
        assert text == upstream.script.reply
    assert done["message"]["html"].startswith("<p>t0 t1")

    # Another tab of the same visitor, joining without a position, gets the whole reply.
    other = connect(visitor=token)
    other.send("session_init", chat_id=chat_id)
    session = other.expect("session")
    texts = [m["html"] for m in session["messages"]]
    assert any("t59" in html for html in texts)
    with app.app_context():
        assert (
            _db(app).session.scalar(select(Message.content).where(Message.sender == "assistant"))
            == upstream.script.reply
        )


def test_reply_completes_and_is_saved_when_the_visitor_leaves(app, worker, upstream, connect):
    upstream.script.chunk_delay = 0.02
    client = connect()
    client.send("session_init")
    client.expect("session")
    client.send("message", content="Hello?")
    client.expect("message")
    client.close()
    drain(app)
    with app.app_context():
        reply = _db(app).session.scalar(select(Message).where(Message.sender == "assistant"))
        assert reply is not None and reply.content == upstream.script.reply


def test_rate_limit_gives_retry_after(app, connect):
    app.config["CHAT_RATE_LIMIT_PER_MINUTE"] = 10
    client = connect()
    client.send("session_init")
    client.expect("session")
    for n in range(10):
        client.send("message", content=f"message {n}")
        client.expect("message")
    client.send("message", content="one too many")
    error = client.expect("error")
    assert error["code"] == "rate_limited"
    assert 1 <= error["retry_after"] <= 60
    with app.app_context():
        contents = _db(app).session.scalars(select(Message.content)).all()
        assert "one too many" not in contents and len(contents) == 10


def test_bad_frames_get_clear_errors(connect):
    client = connect()
    client.send("message", content="too early")
    assert client.expect("error")["code"] == "no_session"
    client.send_raw("{not json")
    assert client.expect("error")["code"] == "invalid_json"
    client.send_raw(b"\x00\x01binary")
    assert client.expect("error")["code"] == "invalid_json"
    client.send_raw("[1, 2]")
    assert client.expect("error")["code"] == "invalid_json"
    client.send("teleport")
    assert client.expect("error")["code"] == "unknown_type"
    client.send("session_init")
    client.expect("session")
    client.send("message", content="   ")
    assert client.expect("error")["code"] == "empty_message"
    client.send("message", content="x" * 2001)
    error = client.expect("error")
    assert error["code"] == "message_too_long" and "2000" in error["message"]
    client.send("rate", score=9)
    assert client.expect("error")["code"] == "invalid_rating"
    client.send("rate", score=4)
    assert client.expect("error")["code"] == "no_chat"  # nothing said yet, nothing to rate
    client.send("message", content="hello")
    client.expect("message")
    client.send("rate", score=4)
    assert client.expect("rated")["score"] == 4


def _close_code(ws) -> int | None:
    try:
        opcode, data = ws.recv_data(control_frame=True)
    finally:
        ws.shutdown()
    if opcode == websocket.ABNF.OPCODE_CLOSE and len(data) >= 2:
        return int.from_bytes(data[:2], "big")
    return None


def test_origin_not_allowed_and_unknown_key_are_refused(live_server, tenant):
    base = live_server.url.replace("http://", "ws://")
    ws = websocket.WebSocket()
    ws.connect(f"{base}/ws/chat?key={tenant.widget_key}", origin="http://evil.example", timeout=5)
    assert _close_code(ws) == 1008
    ws = websocket.WebSocket()
    ws.connect(f"{base}/ws/chat?key=wk_nope", origin=SITE, timeout=5)
    assert _close_code(ws) == 1008


def test_someone_elses_chat_id_opens_a_new_chat(app, connect):
    owner = connect()
    owner.send("session_init")
    owner.expect("session")
    owner.send("message", content="private words")
    chat_id = owner.expect("message")["chat_id"]
    stranger = connect()  # another visitor who learnt the chat id
    stranger.send("session_init", chat_id=chat_id)
    session = stranger.expect("session")
    assert session["chat_id"] != chat_id and session["messages"] == []


def test_a_chat_closed_while_the_socket_is_open_takes_no_more_messages(app, connect):
    """An operator archives the chat while the visitor's socket is open: the visitor's next
    message is refused, with a clear error, and not saved into the archived chat."""
    from services import chats

    client = connect()
    client.send("session_init")
    client.expect("session")
    client.send("message", content="first words")
    chat_id = client.expect("message")["chat_id"]
    client.send("history", before=10**9)
    client.expect("history")
    with app.app_context():
        db = _db(app)
        chats.archive_chat(
            db.session.scalar(select(Chat).where(Chat.public_id == uuid.UUID(chat_id)))
        )
        db.session.commit()
    client.send("message", content="after it closed")
    assert client.expect("error")["code"] == "no_session"
    with app.app_context():
        contents = _db(app).session.scalars(select(Message.content)).all()
    assert contents == ["first words"]


def test_model_html_is_sanitised_everywhere(app, worker, upstream, connect, factory):
    upstream.script.reply = '<script>alert("x")</script> **bold** <img src=x onerror=alert(1)>'
    client = connect()
    client.send("session_init")
    client.expect("session")
    client.send("message", content="<b>hi</b><script>alert(2)</script>")
    visitor = client.expect("message")["message"]
    assert "<script" not in visitor["html"] and "&lt;script&gt;" in visitor["html"]
    _, done = client.collect_reply()
    html = done["message"]["html"]
    assert "<script" not in html and "onerror=" not in html.replace("onerror=alert", "")
    assert "<strong>bold</strong>" in html and "&lt;script&gt;" in html

    from tests.conftest import login

    with app.app_context():
        chat = _db(app).session.scalars(select(Chat)).one()
        tenant_id = chat.tenant_id
        chat_pk = chat.id
    from models.accounts import Tenant as TenantModel

    with app.app_context():
        tenant_row = _db(app).session.get(TenantModel, tenant_id)
    operator = factory.user(tenant_row, role="agent")
    web = app.test_client()
    login(web, operator)
    page = web.get(f"/chats/{chat_pk}").get_data(as_text=True)
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page or "&lt;script&gt;" in page
    assert "<img" not in page


def test_provider_errors_are_retried_then_fall_back(app, worker, upstream, connect):
    upstream.script.fail_first = 2
    client = connect()
    client.send("session_init")
    client.expect("session")
    client.send("message", content="Hello")
    deltas, done = client.collect_reply()
    assert "".join(d["text"] for d in deltas) == upstream.script.reply  # third try worked
    assert len(upstream.records) == 3

    upstream.script.fail_first = 10_000  # now it never recovers
    app.config["CHAT_FIRST_TOKEN_TIMEOUT"] = 1.5
    client.send("message", content="Still there?")
    deltas, done = client.collect_reply()
    assert "unavailable" in done["message"]["html"]
    assert client.expect("error")["code"] == "assistant_unavailable"
    with app.app_context():
        texts = _db(app).session.scalars(select(Message.content)).all()
        assert "Still there?" in texts  # the visitor's message was saved first


def test_without_a_provider_the_fallback_says_so(app, worker, connect):
    app.config.update(OPENAI_BASE_URL=None, OPENAI_API_KEY=None)
    client = connect()
    client.send("session_init")
    client.expect("session")
    client.send("message", content="Anyone?")
    _, done = client.collect_reply()
    assert "not connected to a language model" in done["message"]["html"]


def test_operator_watches_live_and_the_visitor_sees_the_operator(
    app, worker, upstream, connect, live_server, tenant, factory
):
    from tests.conftest import PASSWORD
    from tests.helpers import Browserless, receive_until

    upstream.script.reply = "Let me check that for you right away."
    upstream.script.chunk_delay = 0.01
    operator = factory.user(tenant, role="agent")
    visitor = connect()
    visitor.send("session_init")
    visitor.expect("session")
    visitor.send("message", content="Is anyone there?")
    chat_public = visitor.expect("message")["chat_id"]
    visitor.collect_reply()
    with app.app_context():
        chat_pk = _db(app).session.scalar(select(Chat.id))
    assert chat_public

    console = Browserless(live_server.url).login(operator.email, PASSWORD)
    ws = console.open_socket(console.live_url(f"/chats/{chat_pk}"))
    try:
        snapshot = ws.recv()
        assert "Is anyone there?" in snapshot and "Let me check that" in snapshot
        visitor.send("message", content="Hello again")
        receive_until(ws, lambda f: "Hello again" in f)
        frames = receive_until(ws, lambda f: "msg msg-assistant" in f and "right away" in f)
        assert any(f"chat-{chat_pk}-streaming" in f for f in frames)

        token = console.http.get(f"{live_server.url}/chats/{chat_pk}").text
        csrf = token.split('"X-CSRFToken": "')[1].split('"')[0]
        response = console.http.post(
            f"{live_server.url}/chats/{chat_pk}/reply",
            data={"content": "An operator here: **hello**", "csrf_token": csrf},
            allow_redirects=False,
        )
        assert response.status_code == 303
        frame = visitor.expect("message")
        while frame["message"]["sender"] != "operator":
            frame = visitor.expect("message")
        assert "<strong>hello</strong>" in frame["message"]["html"]
    finally:
        ws.close()


def test_a_socket_that_falls_behind_catches_up_without_gaps(app, tenant, connect):
    """The hub holds a bounded number of frames per socket; past that it drops them and marks
    the socket behind. The widget must still get every delta once, in order."""
    from services.chat_live import ReplyStream

    app.extensions["switchboard.live"].hub.buffer = 8  # tiny, so a burst overflows it
    app.config["CHAT_DELTA_COALESCE_MS"] = 0  # a frame per delta: a burst of 300 frames
    client = connect()
    client.send("session_init")
    client.expect("session")
    client.send("message", content="Tell me a lot")  # creates the chat
    public_id = client.expect("message")["chat_id"]
    with app.app_context():
        chat = _db(app).session.scalar(select(Chat).where(Chat.public_id == uuid.UUID(public_id)))
        stream = ReplyStream(tenant.id, chat.id, "r-burst")
        for n in range(1, 301):  # far faster than one socket is written to
            stream.delta(f"w{n} ")
    deltas = [client.expect("delta", reply_id="r-burst") for _ in range(300)]
    assert [d["seq"] for d in deltas] == list(range(1, 301))
    assert "".join(d["text"] for d in deltas) == "".join(f"w{n} " for n in range(1, 301))
    with pytest.raises((AssertionError, websocket.WebSocketTimeoutException)):  # nothing twice
        client.expect("delta", timeout=0.5)


def test_typing_comes_before_the_first_delta_and_a_resumed_reply_still_shows_it(
    app, tenant, connect
):
    """start() leaves the typing frame to the flusher's thread (the reply's own thread goes
    on to ask the model): it must still reach the widget ahead of the reply's text, and a
    resumed (quiet) reply, which streams no deltas, must still show that it is typing."""
    from services.chat_live import ReplyStream

    client, public_id = _open_chat(connect, "Are you there?")
    with app.app_context():
        chat_pk = _chat_pk(app, public_id)
        quiet = ReplyStream(tenant.id, chat_pk, "r-quiet", quiet=True)
        quiet.start()
        quiet.delta("never streamed")
        stream = ReplyStream(tenant.id, chat_pk, "r-typing")
        stream.start()
        stream.delta("Here ")  # at once: likely the same flusher round as the typing frame
        stream.delta("I am.")
    text = ""
    while text != "Here I am.":
        text += client.expect("delta", reply_id="r-typing")["text"]
    seen = [(f["type"], f.get("reply_id")) for f in client.frames if f.get("reply_id")]
    deltas = len(seen) - 2
    assert seen == [("typing", "r-quiet"), ("typing", "r-typing")] + [("delta", "r-typing")] * (
        deltas
    ), seen


def test_the_reply_starts_once_though_socket_and_event_both_start_it(
    app, worker, upstream, connect
):
    upstream.script.reply = "One answer, streamed once."
    upstream.script.chunk_delay = 0.02  # still streaming when the event's handler runs
    client = connect()
    client.send("session_init")
    client.expect("session")
    client.send("message", content="Hello?")
    ack = client.expect("message")
    deltas, done = client.collect_reply()
    assert "".join(d["text"] for d in deltas) == upstream.script.reply
    drain(app)  # the message.created handlers and any second generate_reply have run
    assert len(upstream.records) == 1  # the model was asked once
    with app.app_context():
        replies = (
            _db(app)
            .session.scalars(
                select(Message).where(Message.in_response_to_id == ack["message"]["id"])
            )
            .all()
        )
        assert [m.content for m in replies] == [upstream.script.reply]


def test_a_message_saved_elsewhere_gets_its_reply_from_the_event(app, worker, upstream, tenant):
    """What happens when the web process dies between its commit and sending the reply:
    the message.created event's handler starts it."""
    from services import chats

    upstream.script.reply = "Started by the event."
    with app.app_context():
        db = _db(app)
        chat = chats.start_chat(tenant.id, visitor_id="v-event")
        db.session.flush()
        message = chats.add_message(chat, "visitor", "Anyone there?")
        db.session.commit()
        message_id = message.id
    drain(app)
    drain(app)  # the handler's generate_reply, enqueued after its commit
    with app.app_context():
        replies = (
            _db(app)
            .session.scalars(select(Message.content).where(Message.in_response_to_id == message_id))
            .all()
        )
    assert replies == ["Started by the event."] and len(upstream.records) == 1


def test_the_model_stream_is_read_whole_however_its_bytes_are_cut():
    """Server-sent events with LF, CRLF or CR line ends, comments, other fields and data
    over several lines, arriving cut at every possible byte, give the same events."""
    from services.assistant import _SSEData

    stream = (
        b": keep-alive\r\n\r\n"
        b'data: {"a": 1}\r\n\r\n'
        b"event: message\nid: 7\ndata: line one\ndata:line two\n\n"
        b'data: {"b": "\xc3\xa9"}\r\r'
        b"data: [DONE]\n\n"
    )
    expected = [b'{"a": 1}', b"line one\nline two", b'{"b": "\xc3\xa9"}', b"[DONE]"]
    for cut in range(len(stream) + 1):
        for step in (1, 3):
            reader, events = _SSEData(), []
            pieces = [stream[:cut]] + [stream[i : i + step] for i in range(cut, len(stream), step)]
            for piece in pieces:
                events += reader.feed(piece)
            assert events == expected, (cut, step)


def test_a_reply_never_overtakes_the_ack_of_its_message(app, factory):
    """The reply's job goes out at the commit just before the visitor's ack: a thread of a
    busy web process may be descheduled in between, and the reply's first frames reach the
    socket first. The socket holds them until the ack is sent; other replies pass."""
    from blueprints.live.chat import ChatSocket

    class Recorder:
        def __init__(self) -> None:
            self.sent: list[dict] = []

        def send(self, data: str) -> None:
            import json

            self.sent.append(json.loads(data))

    tenant = factory.tenant()
    ws = Recorder()
    with app.test_request_context():
        sock = ChatSocket(ws, tenant, None, "visitor-1")
    sock.awaiting_ack.add(42)  # as on_message does before its commit
    sock.forward({"type": "typing", "from": "assistant", "reply_id": "r42", "typing": True})
    sock.forward({"type": "delta", "reply_id": "r42", "seq": 1, "text": "Hel"})
    sock.forward({"type": "delta", "reply_id": "r7", "seq": 3, "text": "other"})
    assert [f.get("reply_id") for f in ws.sent] == ["r7"]  # another reply is not held
    sock.forward({"type": "message", "message": {"id": 42, "sender": "visitor"}})
    sock.forward({"type": "delta", "reply_id": "r42", "seq": 2, "text": "lo"})
    kinds = [(f["type"], f.get("reply_id"), f.get("seq")) for f in ws.sent[1:]]
    assert kinds == [
        ("message", None, None),
        ("typing", "r42", None),
        ("delta", "r42", 1),
        ("delta", "r42", 2),
    ]
    assert sock.awaiting_ack == set() and sock.held == {}


def _chat_pk(app, public_id: str) -> int:
    return _db(app).session.scalar(select(Chat.id).where(Chat.public_id == uuid.UUID(public_id)))


def test_a_visitor_who_stops_reading_holds_up_no_one_else(app, tenant, connect, caplog):
    """One thread writes every chat socket of a web process. A visitor whose connection
    stalls (a phone in a tunnel) must not hold up anybody else's reply, and once it has left
    more than CHAT_SOCKET_BUFFER_BYTES unread it is cut off (its widget reconnects and
    resumes)."""
    from services.chat_live import ReplyStream

    app.config["CHAT_DELTA_COALESCE_MS"] = 0  # a frame per delta, published at once
    app.config["CHAT_SOCKET_BUFFER_BYTES"] = 256 * 1024
    stalled, stalled_chat = _open_chat(connect, "Tell me everything")
    other, other_chat = _open_chat(connect, "Where is my parcel?")
    with app.app_context():
        flood = ReplyStream(tenant.id, _chat_pk(app, stalled_chat), "r-flood")
        for _ in range(400):  # 12.8 MB, which the stalled visitor never reads
            flood.delta("x" * 32_000)
        answer = ReplyStream(tenant.id, _chat_pk(app, other_chat), "r-answer")
        for n in range(1, 21):
            answer.delta(f"w{n} ")
    deltas = [other.expect("delta", reply_id="r-answer", timeout=5) for _ in range(20)]
    assert "".join(d["text"] for d in deltas) == "".join(f"w{n} " for n in range(1, 21))
    # What the kernel had taken before the cut reads out, then the connection ends.
    sock = stalled.ws.sock
    sock.settimeout(10)
    received = 0
    while chunk := sock.recv(1 << 20):
        received += len(chunk)
    assert 256 * 1024 < received < 12_800_000
    assert any("cut off" in r.getMessage() for r in caplog.records)


def test_a_chat_served_over_tls_by_the_app_streams_from_its_own_thread(
    app, worker, upstream, tenant, tmp_path
):
    """When the web process terminates TLS itself its sockets cannot be written without
    blocking: each chat socket then has a pump thread of its own, with the same protocol."""
    import ssl

    from tests.conftest import LiveServer, self_signed_certificate

    cert, key = self_signed_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = LiveServer(app, ssl_context=context).start()
    upstream.script.reply = "Your parcel left the depot this morning."
    client = ChatClient.__new__(ChatClient)
    client.ws = websocket.WebSocket(sslopt={"ca_certs": str(cert)})
    client.frames = []
    try:
        url = server.url.replace("https://", "wss://") + f"/ws/chat?key={tenant.widget_key}"
        client.ws.connect(url, origin=SITE, timeout=10)
        client.expect("welcome")
        client.send("session_init")
        client.expect("session")
        client.send("message", content="Where is my parcel?")
        client.expect("message")
        deltas, done = client.collect_reply()
        assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
        assert "".join(d["text"] for d in deltas) == upstream.script.reply
        assert done["message"]["sender"] == "assistant" and not done["cancelled"]
    finally:
        client.close()
        server.stop()


def test_the_consoles_streaming_copy_is_the_whole_text_so_far_escaped(app, tenant, connect):
    """The console's slot is built piece by piece as the reply grows; each copy must still be
    the whole text so far, escaped, whatever the model wrote."""
    import json

    from markupsafe import escape

    from services.chat_live import ReplyStream
    from services.chats import chat_topic

    app.config["CHAT_DELTA_COALESCE_MS"] = 0
    client = connect()
    client.send("session_init")
    client.expect("session")
    client.send("message", content="Hi")
    public_id = client.expect("message")["chat_id"]
    pieces = ['<script>alert("x")</script> ', "&amp; 'q' ", "😀\n", "</div><b>", "ünï \\ end"]
    with app.app_context():
        chat_pk = _chat_pk(app, public_id)
        stream = ReplyStream(tenant.id, chat_pk, "r-console")
        for piece in pieces:
            stream._last_html = 0.0  # a console copy with every frame
            stream.delta(piece)
        bus = app.extensions["switchboard.live"].bus
        frames = [
            json.loads(data) for _t, _i, data in bus.read({chat_topic(tenant.id, chat_pk): "0-0"})
        ]
    copies = [f["html"] for f in frames if (f.get("json") or {}).get("type") == "delta"]
    assert len(copies) == len(pieces)
    for n, html in enumerate(copies, start=1):
        text = escape("".join(pieces[:n]))
        assert html == (
            f'<div id="chat-{chat_pk}-streaming" hx-swap-oob="innerHTML">'
            f'<div class="msg msg-assistant streaming">{text}</div></div>'
        )
    assert "<script>" not in "".join(copies)


def test_a_crowd_arriving_at_once_is_answered_in_full(app, worker, upstream, connect):
    """A web process handles a few visitor messages at a time (MESSAGES_AT_ONCE) and the
    rest wait their turn: a crowd sending together, and messages refused on the way
    (a visitor over the rate limit), still leave every one saved, acknowledged and answered."""
    from blueprints.live.chat import MESSAGES_AT_ONCE

    # One visitor may send one message a minute; the crowd all comes from this test's address.
    app.config.update(
        CHAT_RATE_LIMIT_PER_MINUTE=1,
        CHAT_NEW_CHATS_PER_IP_PER_HOUR=1000,
        CHAT_MESSAGES_PER_IP_PER_MINUTE=1000,
    )
    upstream.script.reply = "Yes, we are open today."
    pushy = connect()
    pushy.send("session_init")
    pushy.expect("session")
    pushy.send("message", content="first")
    pushy.expect("message")
    for n in range(2 * MESSAGES_AT_ONCE):  # each refused inside the limited section
        pushy.send("message", content=f"again {n}")
        assert pushy.expect("error")["code"] == "rate_limited"
    crowd = [connect() for _ in range(3 * MESSAGES_AT_ONCE)]
    for client in crowd:
        client.send("session_init")
        client.expect("session")
    for n, client in enumerate(crowd):
        client.send("message", content=f"Are you open today? ({n})")
    for n, client in enumerate(crowd):
        ack = client.expect("message", timeout=20)
        assert ack["message"]["html"] == f"Are you open today? ({n})"
        _deltas, done = client.collect_reply(timeout=30)
        assert done["message"]["html"].strip() == "<p>Yes, we are open today.</p>"
    with app.app_context():
        replies = (
            _db(app)
            .session.scalars(select(Message.content).where(Message.sender == "assistant"))
            .all()
        )
    assert len(replies) == 1 + len(crowd)


def test_a_visitor_message_writes_its_event_and_its_reply_job_in_one_insert(app, connect):
    """Each round trip before the commit delays the reply's first delta: the message's
    message.created row and its reply's job row reach the outbox in one INSERT."""
    from sqlalchemy import event

    from models.events import OutboxEvent

    client, _chat_id = _open_chat(connect, "First question")
    db = _db(app)
    with app.app_context():
        engine = db.engine
    inserts: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO OUTBOX"):
            inserts.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        client.send("message", content="Second question")
        ack = client.expect("message")
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert len(inserts) == 1, inserts
    message_id = ack["message"]["id"]
    with app.app_context():
        rows = db.session.scalars(select(OutboxEvent).order_by(OutboxEvent.id)).all()
        created = [r for r in rows if r.topic == "message.created" and r.entity_id == message_id]
        jobs = [r for r in rows if r.topic == "job:generate_reply"]
        assert len(created) == 1
        assert created[0].payload["fields"]["content"] == "Second question"
        assert [j.payload["args"] for j in jobs][-1] == [message_id]


def test_a_visitor_who_leaves_stops_being_followed(app, connect):
    """Every widget socket follows its chat's topic; one that closed must stop, or a web
    process serving visitor after visitor reads (and relays to nobody) ever more topics."""
    hub = app.extensions["switchboard.live"].hub
    before = hub.subscriber_count()
    clients = [_open_chat(connect, f"Question {n}")[0] for n in range(5)]
    assert hub.subscriber_count() == before + 5
    for client in clients:
        client.close()
    deadline = time.monotonic() + 10
    while hub.subscriber_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hub.subscriber_count() == before
