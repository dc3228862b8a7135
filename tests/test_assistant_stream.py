"""The model's streamed answer read straight off the connection (services.assistant): chunked,
sized or closed bodies, cut anywhere, give the visitor the model's text exactly."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
import time

import pytest

from services.assistant import ReplyTimeouts, _StreamProtocol, stream_reply

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
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(body) < length:
                body += conn.recv(65536)
            self.requests.append(head + b"\r\n\r\n" + body)
            for at in range(0, len(self.answer), self.piece):
                conn.sendall(self.answer[at : at + self.piece])
                time.sleep(0.002)
            if self.hang:
                self._stop.wait(10)

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def model(app):
    servers: list[_RawServer] = []

    def start(answer: bytes, **kwargs) -> _RawServer:
        server = _RawServer(answer, **kwargs)
        servers.append(server)
        app.config.update(OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="test-key")
        return server

    yield start
    for server in servers:
        server.stop()


def _reply(app, first_token: float = 5.0, idle: float = 5.0):
    texts: list[str] = []
    with app.app_context():
        result = stream_reply(
            model="m",
            temperature=0.2,
            max_tokens=100,
            messages=[{"role": "user", "content": "Hi"}],
            on_delta=texts.append,
            timeouts=ReplyTimeouts(first_token=first_token, idle=idle, total=30),
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
