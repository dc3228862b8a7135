"""The model's streamed answer read straight off the connection (services.assistant): chunked,
sized or closed bodies, cut anywhere, give the visitor the model's text exactly."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import socket
import ssl
import struct
import threading
import time

import pytest

from services.assistant import ReplyTimeouts, _StreamProtocol, stream_reply
from tests.conftest import self_signed_certificate

TOKENS = ["Hello", " there", ", how", " can I", " help", " you", " to", "day? ", "é✓"]
TEXT = "".join(TOKENS)
USAGE = {"prompt_tokens": 7, "completion_tokens": len(TOKENS), "total_tokens": 7 + len(TOKENS)}


def _events() -> bytes:
    out = b""
    for index, token in enumerate(TOKENS):
        delta = {"content": token, **({"role": "assistant"} if not index else {})}
        chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
        out += b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n"
    final = {"object": "chat.completion.chunk", "choices": [], "usage": USAGE}
    return out + b"data: " + json.dumps(final).encode() + b"\r\n\r\ndata: [DONE]\r\n\r\n"


def _chunked(body: bytes, size: int) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def _head(*headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", "Content-Type: text/event-stream", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_request(conn: socket.socket, buffer: bytes) -> tuple[bytes | None, bytes]:
    """One HTTP request (head and sized body) from `conn`, and what followed it; None if the
    client closed first."""
    while b"\r\n\r\n" not in buffer:
        data = conn.recv(65536)
        if not data:
            return None, buffer
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        data = conn.recv(65536)
        if not data:
            return None, buffer
        rest += data
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


class _RawServer:
    """Answers each request with the given bytes, written in pieces of `piece` bytes a few
    milliseconds apart (so the client sees them cut), then closes unless told to hang."""

    def __init__(self, answer: bytes, piece: int = 7, hang: bool = False) -> None:
        self.answer, self.piece, self.hang = answer, piece, hang
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            request, _ = read_request(conn, b"")
            if request is None:
                return
            self.requests.append(request)
            for at in range(0, len(self.answer), self.piece):
                conn.sendall(self.answer[at : at + self.piece])
                time.sleep(0.002)
            if self.hang:
                self._stop.wait(10)

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()


def _model_servers(app, make):
    """start(...) -> a server made by `make(...)`, configured as the app's model; every one
    is stopped after the test."""
    servers = []

    def start(*args, **kwargs):
        server = make(*args, **kwargs)
        servers.append(server)
        app.config.update(OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="test-key")
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def model(app):
    yield from _model_servers(app, _RawServer)


def _reply(app, first_token: float = 5.0, idle: float = 5.0, should_cancel=None):
    texts: list[str] = []
    with app.app_context():
        result = stream_reply(
            model="m",
            temperature=0.2,
            max_tokens=100,
            messages=[{"role": "user", "content": "Hi"}],
            on_delta=texts.append,
            timeouts=ReplyTimeouts(first_token=first_token, idle=idle, total=30),
            should_cancel=(lambda: should_cancel(texts)) if should_cancel else lambda: False,
            cancel_check_interval=0.01,
        )
    return result, texts


@pytest.mark.parametrize("size", [1, 5, 64, 10_000])
def test_a_chunked_answer_cut_anywhere_gives_the_models_text(app, model, size):
    server = model(_head("Transfer-Encoding: chunked") + _chunked(_events(), size))
    result, texts = _reply(app)
    assert result.content == TEXT and texts == TOKENS
    assert result.usage == USAGE and not result.failed and not result.cut
    # The request carried the client's headers and the body the model is asked for.
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1")
    assert b"Authorization: Bearer test-key" in head
    assert json.loads(body)["stream"] is True


def test_a_sized_and_a_gzipped_answer_give_the_models_text(app, model):
    body = _events()
    model(_head(f"Content-Length: {len(body)}") + body, hang=True)
    result, _ = _reply(app)
    assert result.content == TEXT and result.usage == USAGE and not result.failed

    packed = gzip.compress(body)
    model(_head("Content-Encoding: gzip", f"Content-Length: {len(packed)}") + packed)
    result, texts = _reply(app)
    assert result.content == TEXT and texts == TOKENS


def test_an_answer_broken_off_mid_body_keeps_its_text_marked_cut(app, model):
    answer = _head("Transfer-Encoding: chunked") + _chunked(_events(), 40)
    model(answer[: len(answer) // 2])  # then the connection closes
    result, texts = _reply(app)
    assert result.cut and not result.failed
    assert result.content == "".join(texts) and TEXT.startswith(result.content) and texts


def test_a_refused_request_is_the_providers_error(app, model):
    error = json.dumps({"error": {"message": "bad model", "type": "invalid_request"}}).encode()
    model(
        _head(f"Content-Length: {len(error)}", status="400 Bad Request").replace(
            b"text/event-stream", b"application/json"
        )
        + error
    )
    result, texts = _reply(app)
    assert result.failed and texts == [] and result.attempts == 1  # a 400 is not retried
    assert "BadRequestError" in result.error and "bad model" in result.error


def test_chunk_framing_is_read_whole_however_the_bytes_are_cut():
    """The protocol alone: a chunked answer fed at every possible cut gives the same events."""
    answer = _head("Transfer-Encoding: chunked") + _chunked(_events(), 33)

    def feed(pieces: list[bytes]) -> list[bytes]:
        events: list[bytes] = []
        protocol = _StreamProtocol(lambda data: events.append(data) or True, 5.0)
        for piece in pieces:
            protocol.data_received(piece)
        assert protocol.ended.done() and protocol.ended.exception() is None
        protocol.close()
        return events

    async def every_cut() -> None:
        expected = feed([answer])
        assert expected[-1] == b"[DONE]" and len(expected) == len(TOKENS) + 2
        for cut in range(1, len(answer)):
            assert feed([answer[:cut], answer[cut:]]) == expected, cut
        assert feed([answer[i : i + 1] for i in range(len(answer))]) == expected

    asyncio.run(every_cut())


def test_a_proxy_in_the_environment_carries_the_request(app, monkeypatch):
    """With HTTP_PROXY set, the answer comes through the proxy (here the model server itself,
    which answers a proxied request as any other): the host named cannot be reached directly."""
    from tests.fake_openai import FakeOpenAI, Script

    fake = FakeOpenAI(Script(reply=TEXT)).start()
    try:
        monkeypatch.setenv("HTTP_PROXY", fake.base_url.removesuffix("/v1"))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        app.config.update(OPENAI_BASE_URL="http://model.invalid/v1", OPENAI_API_KEY="proxy-key")
        result, texts = _reply(app)
        assert result.content == TEXT and not result.failed
        assert fake.records[0].path == "http://model.invalid/v1/chat/completions"
    finally:
        fake.stop()


# --- Kept connections: replies reuse the process's connections to the model server.


class _KeepAliveServer:
    """A model server that keeps its connections, as HTTP/1.1 servers do: every request of a
    connection is answered in turn with `answer`, in pieces of 64 bytes a few milliseconds
    apart, the last event and the body's end in one piece (as servers send them). It counts
    the connections it accepted and notes each request as (connection, request), both from 0.

    `plan(connection, request)` may answer one request otherwise: "close" or "reset" drops
    the connection without a byte of answer (a kept connection the server let go just as the
    request came), "half" sends half the answer and closes, "answer-close" answers and closes
    a moment later (the server's keep-alive running out), "slow" answers 50 ms a piece,
    "late-end" sends a chunked body's end (`0\\r\\n\\r\\n`) a second after the rest and
    "no-end" never sends it."""

    def __init__(self, answer: bytes, plan=None, tls: ssl.SSLContext | None = None) -> None:
        self.answer, self.plan = answer, plan or (lambda connection, request: "answer")
        self.tls = tls
        self.connections = 0
        self.requests: list[tuple[int, int]] = []
        self.bodies: list[bytes] = []
        self.client_closed: set[int] = set()  # connections the client closed
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                number = self.connections
                self.connections += 1
                self._socks.append(conn)
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except OSError:
                    conn.close()
                    continue
            threading.Thread(target=self._connection, args=(conn, number), daemon=True).start()

    def _connection(self, conn: socket.socket, number: int) -> None:
        buffer = b""
        with conn:
            for index in itertools.count():
                try:
                    request, buffer = read_request(conn, buffer)
                except OSError:
                    request = None
                if request is None:
                    self.client_closed.add(number)
                    return
                with self._lock:
                    self.requests.append((number, index))
                    self.bodies.append(request.partition(b"\r\n\r\n")[2])
                action = self.plan(number, index)
                if action == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if action == "close":
                    return
                answer = self.answer[: len(self.answer) // 2] if action == "half" else self.answer
                tail = {"half": 0, "late-end": 5, "no-end": 5}.get(action, 64)
                try:
                    for at in range(0, len(answer) - tail, 64):
                        conn.sendall(answer[at : min(at + 64, len(answer) - tail)])
                        time.sleep(0.05 if action == "slow" else 0.002)
                    if action == "late-end":
                        time.sleep(1.0)
                    if action != "no-end":
                        conn.sendall(answer[len(answer) - tail :])
                except OSError:
                    self.client_closed.add(number)
                    return
                if action == "half":
                    return
                if action == "answer-close":
                    time.sleep(0.05)
                    return

    def stop(self) -> None:
        self.sock.close()
        with self._lock:
            for conn in self._socks:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


CHUNKED = _head("Transfer-Encoding: chunked") + _chunked(_events(), 100)
SIZED = _head(f"Content-Length: {len(_events())}") + _events()


@pytest.fixture
def kept(app):
    yield from _model_servers(
        app, lambda answer=CHUNKED, plan=None, tls=None: _KeepAliveServer(answer, plan, tls)
    )


def _idle(server: _KeepAliveServer) -> int:
    """How many connections to this server wait in the stream loop's pool."""
    from services.assistant import _streams

    streams = _streams()

    async def count() -> int:
        pool = streams.pools.get((server.scheme, "127.0.0.1", server.port))
        return len(pool.idle) if pool is not None else 0

    return asyncio.run_coroutine_threadsafe(count(), streams.loop).result(5)


def _until(condition, seconds: float = 3.0) -> bool:
    give_up = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.01)
    return True


def _exact(result, texts) -> bool:
    return (
        result.content == TEXT
        and texts == TOKENS
        and result.usage == USAGE
        and not result.failed
        and not result.cut
        and result.attempts == 1
    )


@pytest.mark.parametrize("answer", [CHUNKED, SIZED], ids=["chunked", "sized"])
def test_replies_in_a_row_reuse_one_connection(app, kept, answer):
    server = kept(answer)
    for _ in range(3):
        assert _exact(*_reply(app))
    assert server.connections == 1
    assert server.requests == [(0, 0), (0, 1), (0, 2)]
    assert all(json.loads(body)["stream"] is True for body in server.bodies)
    assert _idle(server) == 1


@pytest.mark.parametrize(
    "answer",
    [
        _head("Transfer-Encoding: chunked", "Connection: close") + _chunked(_events(), 100),
        (_head(f"Content-Length: {len(_events())}") + _events()).replace(b"HTTP/1.1", b"HTTP/1.0"),
    ],
    ids=["connection-close", "http-1.0"],
)
def test_a_server_that_says_close_gets_a_new_connection_each_time(app, kept, answer):
    # (This server would go on reading the connection: only the client can keep it from
    # being used again.)
    server = kept(answer)
    for _ in range(2):
        assert _exact(*_reply(app))
    assert server.connections == 2 and server.requests == [(0, 0), (1, 0)]
    assert _idle(server) == 0


def test_a_kept_connection_the_server_closes_while_idle_leaves_the_pool(app, kept):
    server = kept(plan=lambda connection, request: "answer-close")
    assert _exact(*_reply(app))
    assert _until(lambda: 0 in server.client_closed or _idle(server) == 0)
    assert _until(lambda: _idle(server) == 0)
    assert _exact(*_reply(app))
    assert server.connections == 2 and server.requests == [(0, 0), (1, 0)]


@pytest.mark.parametrize("drop", ["close", "reset"])
def test_a_request_on_a_kept_connection_dropped_unanswered_is_sent_again(app, kept, drop):
    """The server lets the kept connection go just as the next request comes: the request
    goes again on a new connection, within the same attempt, and the reply is exact."""
    server = kept(
        plan=lambda connection, request: drop if (connection, request) == (0, 1) else "answer"
    )
    assert _exact(*_reply(app))
    assert _exact(*_reply(app))
    assert server.requests == [(0, 0), (0, 1), (1, 0)] and server.connections == 2


def test_a_kept_connection_that_broke_off_mid_answer_is_not_sent_again(app, kept):
    """Once any of the answer came, the request is never sent again behind the caller's back:
    the text that came is kept, marked cut."""
    server = kept(plan=lambda connection, request: "half" if request == 1 else "answer")
    assert _exact(*_reply(app))
    result, texts = _reply(app)
    assert result.cut and not result.failed and texts
    assert result.content == "".join(texts) and TEXT.startswith(result.content)
    assert server.requests == [(0, 0), (0, 1)] and server.connections == 1


def test_a_cancelled_reply_does_not_give_its_connection_back(app, kept):
    server = kept(plan=lambda connection, request: "slow" if connection == 0 else "answer")
    result, texts = _reply(app, should_cancel=lambda texts: bool(texts))
    assert result.cancelled and TEXT.startswith(result.content) and result.content != TEXT
    assert _until(lambda: 0 in server.client_closed)  # the provider saw us go
    assert _idle(server) == 0
    # The next reply gets a connection of its own, and not a byte of the old answer.
    assert _exact(*_reply(app))
    assert server.connections == 2 and server.requests == [(0, 0), (1, 0)]


def test_concurrent_replies_are_all_exact_and_their_connections_kept(app, kept):
    server = kept()
    results: list = []

    def one() -> None:
        results.append(_reply(app))

    for _ in range(2):
        threads = [threading.Thread(target=one) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert len(results) == 40 and all(_exact(*result) for result in results)
    assert len(server.requests) == 40
    assert server.connections <= 20  # the second round went on the first round's connections
    assert _idle(server) == server.connections


def test_idle_connections_are_capped_and_expire(app, kept, monkeypatch):
    import services.assistant as assistant

    # (The first answer of each connection is slow: the five replies overlap.)
    server = kept(plan=lambda connection, request: "slow" if request == 0 else "answer")
    monkeypatch.setattr(assistant, "POOL_MAX_IDLE", 2)
    threads = [threading.Thread(target=_reply, args=(app,)) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert server.connections == 5 and _idle(server) == 2
    assert _until(lambda: len(server.client_closed) == 3)  # the others were closed

    monkeypatch.setattr(assistant, "POOL_IDLE_SECONDS", 0.1)
    assert _exact(*_reply(app))  # (given back with the short idle time)
    assert _until(lambda: _idle(server) <= 1)
    assert _until(lambda: len(server.client_closed) >= 4)


@pytest.fixture
def tls_contexts(tmp_path, monkeypatch):
    """A server's TLS context with a certificate made for 127.0.0.1, trusted by the client."""
    import services.assistant as assistant

    cert, key = self_signed_certificate(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setattr(assistant, "_ssl", client)
    return server


@pytest.mark.parametrize("drop", [None, "close", "reset"])
def test_kept_tls_connections_are_reused_and_sent_again_when_dropped(app, kept, tls_contexts, drop):
    """Over TLS (a handshake saved per reply): replies in a row share a connection, and one
    the server drops unanswered is replaced within the attempt."""

    def plan(connection: int, request: int) -> str:
        return drop if drop and (connection, request) == (0, 2) else "answer"

    server = kept(plan=plan, tls=tls_contexts)
    for _ in range(3):
        assert _exact(*_reply(app))
    if drop is None:
        assert server.connections == 1 and server.requests == [(0, 0), (0, 1), (0, 2)]
    else:
        assert server.connections == 2
        assert server.requests == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert _idle(server) == 1


def test_the_body_end_after_the_last_event_is_read_off_the_replys_clock(app, kept):
    """The reply ends at its [DONE]; the body's end, coming later, is still read for the
    connection to be kept."""
    server = kept(plan=lambda connection, request: "late-end" if request == 0 else "answer")
    result, texts = _reply(app)
    assert _exact(result, texts) and result.processing_ms < 800
    assert _until(lambda: _idle(server) == 1)
    assert _exact(*_reply(app))
    assert server.connections == 1 and server.requests == [(0, 0), (0, 1)]


def test_a_body_that_does_not_end_after_the_last_event_is_closed(app, kept, monkeypatch):
    import services.assistant as assistant

    monkeypatch.setattr(assistant, "DRAIN_SECONDS", 0.2)
    server = kept(plan=lambda connection, request: "no-end" if connection == 0 else "answer")
    assert _exact(*_reply(app))
    assert _until(lambda: 0 in server.client_closed) and _idle(server) == 0
    assert _exact(*_reply(app))
    assert server.connections == 2 and server.requests == [(0, 0), (1, 0)]


def test_a_host_whose_first_address_refuses_is_reached_at_the_next(app, model, monkeypatch):
    """The model's host by name, resolving to an address where nothing listens before the
    one that answers (as `localhost` may give ::1 first): the reply comes from the second,
    through the stream loop's own connect (services.assistant._open_connection)."""
    import services.assistant as assistant

    server = model(CHUNKED)
    port = server.sock.getsockname()[1]
    closed = socket.create_server(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: a refused connection
    loop = assistant._streams().loop
    real = loop.getaddrinfo

    async def resolve(host, port_, *args, **kwargs):
        if host == "model.test":
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", dead_port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            ]
        return await real(host, port_, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", resolve)
    app.config.update(OPENAI_BASE_URL=f"http://model.test:{port}/v1")
    result, texts = _reply(app)
    assert not result.failed, result.error
    assert result.content == TEXT and texts == TOKENS
    assert len(server.requests) == 1
