"""The AI assistant: streamed chat completions from any OpenAI-compatible server.

`stream_reply` calls the model with streaming, hands every text delta to a callback, stops
the upstream call when asked to cancel (closing the HTTP response, not just the display),
retries timeouts, 429s (after their Retry-After) and 5xx while no text has been sent and the
first-token timeout allows, and reports a failure so the caller can send a clearly labelled
fallback. Once text flows, a stream is ended only by silence longer than the idle timeout or
by the overall cap, and what came is kept, marked as cut.

The request is sent as is, not through `chat.completions.create`, which first walks every
message of the history through its typed-dict transform: 0.4 ms a message, 21 ms for a
50-message history, all of it on the path to the first delta, for plain strings that need no
transforming. It goes out with the client's headers, and the answer is read by a protocol of
the process's stream loop (see _Upstream); through a proxy, by the client's own `post`. The
loop keeps its connections to the model server for the next reply (see _Pool), as the
client's connection pool did: no TCP (and TLS) handshake before each reply's first delta.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import json
import logging
import os
import queue
import socket
import ssl
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import httpx2
import openai
from flask import current_app

from events.nowait import NowaitSocket

log = logging.getLogger(__name__)

NOT_CONFIGURED_REPLY = (
    "This assistant is not connected to a language model yet (no OPENAI_API_KEY or "
    "OPENAI_BASE_URL is configured), so it cannot answer. Your message is saved and a "
    "member of the team can reply here."
)
UNAVAILABLE_REPLY = (
    "Sorry, the assistant is unavailable right now. Your message is saved and a member of "
    "the team will follow up here."
)

# Given in the visitor's language: a model told in English how to sound tends to answer in
# English, whatever the visitor wrote.
TONE_INSTRUCTIONS = {
    "en": {
        "empathetic": "The visitor seems upset. Be especially empathetic, calm and supportive; "
        "acknowledge the problem before offering help.",
        "friendly": "The visitor is in a good mood. Keep a warm, friendly and upbeat tone.",
    },
    "es": {
        "empathetic": "El visitante parece molesto. Sé especialmente empático, sereno y "
        "comprensivo; reconoce el problema antes de ofrecer ayuda.",
        "friendly": "El visitante está de buen humor. Mantén un tono cálido, cercano y alegre.",
    },
    "pt": {
        "empathetic": "O visitante parece chateado. Seja especialmente empático, calmo e "
        "acolhedor; reconheça o problema antes de oferecer ajuda.",
        "friendly": "O visitante está de bom humor. Mantenha um tom caloroso, simpático e animado.",
    },
}
LANGUAGE_INSTRUCTIONS = {
    "en": "Always reply in English, the language the visitor writes in.",
    "es": "Responde siempre en español, el idioma en el que escribe el visitante.",
    "pt": "Responda sempre em português, o idioma em que o visitante escreve.",
}
# A last message shorter than this ("ok", "gracias") is read together with the visitor's
# previous ones to tell the language.
LANGUAGE_SAMPLE_LETTERS = 12

ROLE_FOR_SENDER = {"visitor": "user", "assistant": "assistant", "operator": "assistant"}


@dataclass
class ReplyResult:
    content: str = ""
    usage: dict | None = None
    cancelled: bool = False
    failed: bool = False
    error: str | None = None
    attempts: int = 0
    processing_ms: int = 0
    cut: bool = False  # text came, then a timeout ended the reply early

    @property
    def interrupted(self) -> str | None:
        """How the saved reply is labelled: "stopped" (the visitor), "cut" (a timeout)."""
        if self.cancelled:
            return "stopped"
        return "cut" if self.cut else None


def is_configured() -> bool:
    cfg = current_app.config
    return bool(cfg.get("OPENAI_API_KEY") or cfg.get("OPENAI_BASE_URL"))


_clients: dict[tuple[str, str | None], openai.OpenAI] = {}
_clients_lock = threading.Lock()


@atexit.register
def _close_clients() -> None:
    # Their kept-alive connections closed by us rather than by the garbage collector at
    # exit, which warns of each unclosed socket (a process that served several model
    # servers, as the tests do, has a client and connections per server).
    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


def _endpoint() -> tuple[str, str | None] | None:
    """(API key, base URL) of the configured model server, or None."""
    if not is_configured():
        return None
    cfg = current_app.config
    return (cfg.get("OPENAI_API_KEY") or "not-needed", cfg.get("OPENAI_BASE_URL") or None)


def client_or_none(timeout: float | None = None) -> openai.OpenAI | None:
    """The OpenAI-compatible client, shared by every thread of the process.

    Building one costs 30-50 ms (it loads the CA bundle even for http://) and throws its
    connection pool away: per reply that was a fifth of the time to first delta."""
    if not is_configured():
        return None
    cfg = current_app.config
    key = (cfg.get("OPENAI_API_KEY") or "not-needed", cfg.get("OPENAI_BASE_URL") or None)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = openai.OpenAI(
                api_key=key[0],
                base_url=key[1],
                max_retries=0,  # retries are ours, within the response budget
            )
    return client.with_options(
        timeout=timeout if timeout is not None else cfg.get("CHAT_RESPONSE_MAX_SECONDS", 100)
    )


def visitor_language(history: Iterable[tuple[str, str]]) -> str | None:
    """The language of the visitor's latest message(s), or None if they have no words."""
    from services.sentiment import detect_language

    sample: list[str] = []
    for sender, content in reversed(list(history)):
        if sender == "visitor" and content:
            sample.insert(0, content)
            if sum(ch.isalpha() for ch in " ".join(sample)) >= LANGUAGE_SAMPLE_LETTERS:
                break
            if len(sample) == 3:
                break
    return detect_language(" ".join(sample)) if sample else None


def build_messages(
    system_prompt: str,
    tone: str | None,
    history: Iterable[tuple[str, str]],
    language: str | None = None,
) -> list[dict[str, str]]:
    """The model's messages: the agent's prompt with the tone and reply-language instructions
    in the visitor's language (detected from the history when not given), then the history."""
    history = list(history)
    language = language or visitor_language(history)
    system = system_prompt.strip() or "You are a helpful assistant."
    tones = TONE_INSTRUCTIONS.get(language or "en") or TONE_INSTRUCTIONS["en"]
    if tone in tones:
        system += "\n\n" + tones[tone]
    if language:
        system += "\n\n" + LANGUAGE_INSTRUCTIONS.get(
            language, f"Always reply in the language the visitor writes in ({language})."
        )
    messages = [{"role": "system", "content": system}]
    for sender, content in history:
        role = ROLE_FOR_SENDER.get(sender)
        if role and content:
            messages.append({"role": role, "content": content})
    return messages


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, openai.APITimeoutError | openai.APIConnectionError | openai.RateLimitError):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def retry_after_seconds(exc: Exception) -> float | None:
    """How long the provider asks us to wait (Retry-After / retry-after-ms), if it says."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass(frozen=True)
class ReplyTimeouts:
    """A streamed reply's limits, in seconds (see CHAT_FIRST_TOKEN_TIMEOUT and friends)."""

    first_token: float
    idle: float
    total: float

    @classmethod
    def from_config(cls) -> ReplyTimeouts:
        cfg = current_app.config
        return cls(
            first_token=float(cfg.get("CHAT_FIRST_TOKEN_TIMEOUT", 30.0)),
            idle=float(cfg.get("CHAT_STREAM_IDLE_TIMEOUT", 20.0)),
            total=float(cfg.get("CHAT_RESPONSE_MAX_SECONDS", 100.0)),
        )


class _SSEData:
    """The `data` of each complete server-sent event in a byte stream (comments and the
    other fields are skipped), for lines ended by LF, CRLF or CR, however the bytes are cut."""

    def __init__(self) -> None:
        self._tail = b""
        self._lines: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._tail + chunk
        if b"\r" in buffer:
            # A CR at the very end may be the first half of a CRLF: it waits for what follows.
            held = buffer.endswith(b"\r")
            buffer = buffer[:-1] if held else buffer
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if held:
                buffer += b"\r"
        *lines, self._tail = buffer.split(b"\n")
        events = []
        for line in lines:
            if not line:
                if self._lines:
                    events.append(b"\n".join(self._lines))
                    self._lines = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._lines.append(value[1:] if value.startswith(b" ") else value)
        return events


class _StreamLoop:
    """One event loop per process that reads every reply's model stream.

    A reading thread per reply was the first design: at a few hundred replies, hundreds of
    threads wake for every token and queue for the interpreter lock, and whatever else the
    process must do (publishing the coalesced frames) waits behind them in bursts of
    hundreds of milliseconds. One loop reads them all, one token after another, and leaves
    the lock free in between; each reply's own thread only waits for its end."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        # What the process has built by its first reply (the app, its modules and templates,
        # the language model) lives as long as the process: a full garbage collection that
        # walks all of it holds every stream for hundreds of milliseconds, and a burst of
        # replies starting is what sets one off.
        gc.freeze()
        self.loop = asyncio.new_event_loop()
        self._clients: dict[tuple[str, str | None], openai.AsyncOpenAI] = {}
        self._targets: dict[tuple[str, str | None], _Target] = {}
        self.pools: dict[tuple[str, str, int], _Pool] = {}
        thread = threading.Thread(target=self.loop.run_forever, name="assistant-streams")
        thread.daemon = True
        thread.start()

    def client(self, key: tuple[str, str | None]) -> openai.AsyncOpenAI:
        """The process's client for this endpoint (only ever used on the loop's thread)."""
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = openai.AsyncOpenAI(
                api_key=key[0], base_url=key[1], max_retries=0
            )
        return client

    def target(self, key: tuple[str, str | None]) -> _Target:
        """Where this endpoint's streams are read from (only used on the loop's thread)."""
        target = self._targets.get(key)
        if target is None:
            target = self._targets[key] = _Target(self.client(key))
        return target

    def pool(self, key: tuple[str, str, int]) -> _Pool:
        """The kept connections to this (scheme, host, port) (only used on the loop's thread)."""
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = _Pool(self.loop)
        return pool


_stream_loop: _StreamLoop | None = None
_stream_loop_lock = threading.Lock()


def _streams() -> _StreamLoop:
    global _stream_loop
    with _stream_loop_lock:
        if _stream_loop is None or _stream_loop.pid != os.getpid():  # (a forked worker)
            _stream_loop = _StreamLoop()
        return _stream_loop


class _Target:
    """Where and how a process's stream loop sends its model requests itself: the endpoint's
    address, and the request head the client would send (its own headers, so an organisation
    or project set in the environment still goes out), built once per endpoint."""

    def __init__(self, client: openai.AsyncOpenAI) -> None:
        url = client.base_url.copy_with(raw_path=client.base_url.raw_path.rstrip(b"/") + b"/")
        self.url = str(url.join("chat/completions"))
        parts = urlsplit(self.url)
        self.host = parts.hostname or ""
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.key = (parts.scheme, self.host, self.port)  # (its pool of kept connections)
        self.ssl = _ssl_context() if self.tls else None
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        host = parts.netloc.rpartition("@")[2]  # (with its port, if the URL names one)
        headers = {
            name: value
            for name, value in {**client.default_headers, **client.auth_headers}.items()
            if isinstance(value, str)
        }
        headers.update(
            {
                "Host": host,
                "Accept": "text/event-stream",
                "Accept-Encoding": "identity",
                # (No "Connection: close": an HTTP/1.1 connection is kept, see _Pool.)
            }
        )
        self.head = f"POST {path} HTTP/1.1\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()
        )
        # The client honours HTTP(S)_PROXY and friends; a proxied endpoint keeps its path.
        self.proxied = _uses_proxy(parts.scheme, self.host)

    def request_bytes(self, body: dict) -> bytes:
        payload = json.dumps(body, ensure_ascii=False).encode()
        return f"{self.head}Content-Length: {len(payload)}\r\n\r\n".encode("latin-1") + payload


def _uses_proxy(scheme: str, host: str) -> bool:
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass_environment(host, proxies)


_ssl: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    """The certificates the client trusts (certifi's, as httpx), loaded once per process."""
    global _ssl
    if _ssl is None:
        try:
            import certifi

            _ssl = ssl.create_default_context(cafile=certifi.where())
        except ImportError:
            _ssl = ssl.create_default_context()
    return _ssl


# At most this many idle connections are kept per endpoint. A process's replies to one
# provider overlap by a few dozen at a busy moment: 32 lets that steady traffic find its
# connections again, without holding sockets (and the provider's connection slots) by the
# hundred after a burst; the connections of a burst beyond it are closed as they come back.
POOL_MAX_IDLE = 32
# An idle connection is closed after this long. It is under the keep-alive of the usual
# front ends (nginx 75 s, cloud load balancers 60 s), so we seldom write on one the server is
# just letting go; a server that keeps them for less (uvicorn: 5 s) is seen closing it (its
# eof takes it out of the pool), and a request that still meets one closed meanwhile is sent
# again on a new connection (see _Upstream._read).
POOL_IDLE_SECONDS = 30.0
# After a reply's last event ([DONE]), the end of its body (a chunked answer's terminator) is
# waited for this long, off the reply's clock, for the connection to be kept.
DRAIN_SECONDS = 5.0


class _Pool:
    """The idle kept connections to one endpoint (scheme, host, port), on the stream loop.

    A connection comes back only from an answer read to its end, from a server that keeps
    it (HTTP/1.1, no `Connection: close`); the most recently used goes out first (the least
    likely to have been closed by the server meanwhile)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.idle: list[_IdleConnection] = []

    def take(self) -> asyncio.Transport | None:
        while self.idle:
            transport = self.idle.pop().detach()
            if transport is not None and not transport.is_closing():
                return transport
        return None

    def put(self, transport: asyncio.Transport) -> None:
        if transport.is_closing() or POOL_MAX_IDLE <= 0:
            transport.close()
            return
        while len(self.idle) >= POOL_MAX_IDLE:
            self.idle[0].close()  # (the oldest goes)
        self.idle.append(_IdleConnection(self, transport))

    def drop(self, connection: _IdleConnection) -> None:
        if connection in self.idle:
            self.idle.remove(connection)


class _IdleConnection(asyncio.Protocol):
    """A kept connection waiting in its pool: the server closing it (or sending anything,
    when nothing is owed) takes it out and closes it, and so does its idle time running out."""

    def __init__(self, pool: _Pool, transport: asyncio.Transport) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = transport
        transport.set_protocol(self)
        self._timer = pool.loop.call_later(POOL_IDLE_SECONDS, self.close)

    def detach(self) -> asyncio.Transport | None:
        """The connection, taken for a request (None if it was closed)."""
        self._timer.cancel()
        transport, self.transport = self.transport, None
        return transport

    def close(self) -> None:
        self.pool.drop(self)
        transport = self.detach()
        if transport is not None:
            transport.close()

    def data_received(self, data: bytes) -> None:
        self.close()

    def eof_received(self) -> bool:
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.drop(self)
        self.detach()


class _StreamProtocol(asyncio.Protocol):
    """A model's streamed answer, read as the bytes arrive: the status line and headers, then
    the body (chunked, sized or up to the close) through the SSE reader, each event handed to
    `on_event` in the same callback. Through the HTTP client each token also went through
    its transport's pause and resume, a cancel scope and a coroutine per read: three
    quarters of what a token cost the stream loop, which reads every reply of the process."""

    def __init__(
        self,
        on_event: Callable[[bytes], bool],
        idle_timeout: float,
        pool: _Pool | None = None,
    ) -> None:
        self.on_event = on_event
        self.pool = pool  # where the connection goes back to (see release)
        self.idle_timeout = idle_timeout
        self.loop = asyncio.get_running_loop()
        self.head: asyncio.Future = self.loop.create_future()
        self.ended: asyncio.Future = self.loop.create_future()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.transport: asyncio.Transport | None = None
        self.received = False  # any byte of the answer came
        self.complete = False  # the answer was read to its very end
        self.keep_alive = False  # ... and then the server keeps the connection
        self._draining = False  # the reply is over; the body's end is still read for the pool
        self._buffer = b""  # the head until it is whole, then an unfinished chunk size line
        self._framing = ""  # "chunked", "length" or "close"
        self._left = 0  # bytes of the current chunk (chunked) or of the body (length)
        self._trailer = False
        self._events = _SSEData()
        self._error_body: list[bytes] | None = None
        self._decoder = None
        self._last_data = self.loop.time()
        self._timer = self.loop.call_later(idle_timeout, self._check_idle)

    # --- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        self.received = True
        if self.complete:
            self.keep_alive = False  # bytes past the answer's end: the connection is not kept
            return
        try:
            if not self.head.done():
                data = self._read_head(data)
                if not data and not (self._framing == "length" and self._left <= 0):
                    return
            self._body(data)
        except Exception as exc:  # noqa: BLE001 - ends this stream, never the loop
            self._end(exc)

    def eof_received(self) -> bool:
        self._finish_at_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        if exc is not None and not self.ended.done():
            self._end(exc)
        else:
            self._finish_at_eof()

    # --- parts of the answer
    def _read_head(self, data: bytes) -> bytes:
        buffer = self._buffer + data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > 65536:
                    raise ValueError("response head too long")
                self._buffer = buffer
                return b""
            lines = buffer[:end].decode("latin-1").split("\r\n")
            buffer = buffer[end + 4 :]
            version, status = lines[0].split(" ", 2)[:2]
            status = int(status)
            if 100 <= status < 200:
                continue  # an informational answer before the real one
            break
        self._buffer = b""
        self.status = status
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._framing = "chunked"
        elif "content-length" in self.headers:
            self._framing, self._left = "length", int(self.headers["content-length"])
        else:
            self._framing = "close"
        connection = self.headers.get("connection", "").lower()
        self.keep_alive = (
            version == "HTTP/1.1" and self._framing != "close" and "close" not in connection
        )
        encoding = self.headers.get("content-encoding", "identity").lower()
        if encoding in ("gzip", "deflate"):
            self._decoder = zlib.decompressobj(wbits=47)
        elif encoding != "identity":
            raise ValueError(f"unsupported content encoding {encoding!r}")
        if not 200 <= status < 300:
            self._error_body = []  # read whole for the error, not as events
        self.head.set_result(status)
        return buffer

    def _body(self, data: bytes) -> None:
        if self._framing == "chunked":
            data = self._dechunk(data)
        elif self._framing == "length":
            if len(data) > self._left:
                self.keep_alive = False  # bytes past the answer's end
            data = data[: self._left]
            self._left -= len(data)
            self.complete = self._left <= 0
        if self.ended.done():
            pass  # the reply is over ([DONE]): the rest of the body is only read through
        elif self._error_body is not None:
            if self._decoder is not None:
                data = self._decoder.decompress(data)
            self._error_body.append(data)
        elif data:
            if self._decoder is not None:
                data = self._decoder.decompress(data)
            for event in self._events.feed(data):
                if not self.on_event(event):
                    self._end(None)
                    break
        if (self.complete or self._trailer) and not self.ended.done():
            self._end(None)
        if self._draining and self.complete:
            self._to_pool()

    def _dechunk(self, data: bytes) -> bytes:
        if self._buffer:
            data, self._buffer = self._buffer + data, b""
        if self._left >= len(data):  # the usual case: within one chunk
            self._left -= len(data)
            return data
        out = []
        at, size = 0, len(data)
        while at < size and not self.complete:
            if self._left:
                take = min(self._left, size - at)
                out.append(data[at : at + take])
                at += take
                self._left -= take
                continue
            end = data.find(b"\n", at)
            if end < 0:
                if size - at > 1024:
                    raise ValueError("chunk size line too long")
                self._buffer = data[at:]
                break
            line = data[at:end].strip()
            at = end + 1
            if self._trailer:  # after the last chunk: trailer fields, up to an empty line
                self.complete = not line
            elif line:  # (the empty line ends the chunk before it)
                self._left = int(line.split(b";", 1)[0], 16)
                self._trailer = self._left == 0
        if at < size:
            self.keep_alive = False  # bytes past the answer's end
        return b"".join(out)

    def _finish_at_eof(self) -> None:
        if self.ended.done():
            return
        if not self.head.done():
            self._end(ConnectionError("the server closed the connection without an answer"))
        elif self._framing == "close" or self._error_body is not None:
            self._end(None)
        else:
            self._end(ConnectionError("the server closed the connection mid-answer"))

    def _check_idle(self) -> None:
        quiet = self.loop.time() - self._last_data
        if quiet >= self.idle_timeout:
            self._end(TimeoutError("no data within the read timeout"))
        else:
            self._timer = self.loop.call_later(self.idle_timeout - quiet, self._check_idle)

    def _end(self, exc: BaseException | None) -> None:
        self._timer.cancel()
        if not self.head.done():
            if exc is None:
                exc = ConnectionError("the answer ended early")
            self.head.set_exception(exc)
            self.head.exception()  # (retrieved: `ended` carries it to the reader)
        if not self.ended.done():
            if exc is None:
                self.ended.set_result(None)
            else:
                self.ended.set_exception(exc)
        if exc is not None and self.transport is not None:
            self.transport.close()  # (the end of a whole answer waits for `release`)

    def error_body(self) -> bytes:
        return b"".join(self._error_body or ())

    def release(self, keep: bool) -> None:
        """The reader is done with this answer. If it was read to its end (`keep`: the body's
        or the reply's last event) and the server keeps the connection, the connection goes
        back to the pool, once the rest of the body (the terminator after a [DONE]) is read;
        else it is closed, which tells the provider we went (a Stop or a timeout ends the
        model's work, not just the display)."""
        transport = self.transport
        if (
            not keep
            or not self.keep_alive
            or self.pool is None
            or transport is None
            or transport.is_closing()
            or not self.ended.done()
            or self.ended.cancelled()
            or self.ended.exception() is not None
        ):
            self.close()
        elif self.complete:
            self._to_pool()
        else:
            self._draining = True
            self._timer.cancel()
            self._timer = self.loop.call_later(DRAIN_SECONDS, self.close)

    def _to_pool(self) -> None:
        self._timer.cancel()
        transport, self.transport = self.transport, None
        if self.keep_alive and transport is not None and self.pool is not None:
            self.pool.put(transport)
        elif transport is not None:
            transport.close()

    def close(self) -> None:
        self._timer.cancel()
        if self.transport is not None:
            self.transport.close()
        for future in (self.head, self.ended):
            if future.done() and not future.cancelled():
                future.exception()  # (seen: a cancelled reader never awaited it)
            else:
                future.cancel()


async def _open_connection(
    loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol], target: _Target
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    """loop.create_connection to the target, on a socket whose reads keep the GIL
    (events.nowait.NowaitSocket): the stream loop reads hundreds of model streams, and
    after every read that let go of the GIL it queued behind the replies' own threads."""
    infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    failure: OSError | None = None
    for family, kind, proto, _name, address in infos:
        sock = NowaitSocket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            return await loop.create_connection(
                factory,
                sock=sock,
                ssl=target.ssl,
                server_hostname=target.host if target.tls else None,
            )
        except OSError as exc:
            sock.close()
            failure = exc
        except BaseException:
            sock.close()
            raise
    raise failure or OSError(f"no address for {target.host}:{target.port}")


class _Upstream:
    """One streamed request, read on the process's stream loop, so the caller can keep its
    own clock: a silent model cannot hold it past a deadline or a visitor's Stop.

    Each text goes straight to `on_text` (on the loop's thread, one at a time); only the
    stream's end or failure is posted to `inbox`. The request goes out with the client's
    headers and its failures become the client's own errors (a 429 is a RateLimitError with
    its Retry-After), but the answer is read by a protocol of the loop (_StreamProtocol),
    and each event's two fields are picked out of it here: the client's stream decoder and
    typed chunk models cost several times that, for every token. Through a proxy (set in
    the environment) the client reads the answer itself."""

    def __init__(
        self,
        endpoint: tuple[str, str | None],
        timeout: float,
        body: dict,
        on_text: Callable[[str], None],
        inbox: queue.SimpleQueue | None = None,
    ) -> None:
        self.inbox: queue.SimpleQueue = inbox if inbox is not None else queue.SimpleQueue()
        self.on_text = on_text
        self.usage: dict | None = None
        self.texts = 0
        self.last_text_at = 0.0
        self._lock = threading.Lock()
        self._closed = False
        self._done = False  # the answer's [DONE] came
        self._task = asyncio.run_coroutine_threadsafe(
            self._read(endpoint, timeout, body), _streams().loop
        )

    async def _read(self, endpoint: tuple[str, str | None], timeout: float, body: dict) -> None:
        streams = _streams()
        target = self._target = streams.target(endpoint)
        if target.proxied:
            await self._read_through_client(endpoint, timeout, body)
            return
        loop = asyncio.get_running_loop()
        pool = streams.pool(target.key)
        request = target.request_bytes(body)
        protocol: _StreamProtocol | None = None
        read_whole = False

        def connected() -> _StreamProtocol:
            nonlocal protocol
            protocol = _StreamProtocol(self._event, timeout, pool)
            return protocol

        try:
            kept = pool.take()
            while True:
                if kept is not None:
                    connected()
                    kept.set_protocol(protocol)
                    protocol.connection_made(kept)
                else:
                    await asyncio.wait_for(_open_connection(loop, connected, target), timeout)
                protocol.transport.write(request)
                try:
                    status = await protocol.head
                except OSError as exc:
                    # A kept connection the server let go meanwhile fails (a write error, an
                    # eof or a reset) before any byte of an answer: the request goes again,
                    # once, on a new connection. Never once the answer began, nor on silence.
                    if kept is None or protocol.received or isinstance(exc, TimeoutError):
                        raise
                    protocol.close()
                    protocol = kept = None
                    continue
                break
            await protocol.ended
            # Read to its end: the reply's last event, or the whole body (not a reply that
            # the caller ended, whose connection must close).
            read_whole = self._done or protocol.complete
            if not 200 <= status < 300:
                response = httpx2.Response(
                    status,
                    headers=list(protocol.headers.items()),
                    content=protocol.error_body(),
                    request=self._request(),
                )
                raise streams.client(endpoint)._make_status_error_from_response(response)
            self.inbox.put((self, "end", None))
        except openai.APIError as exc:
            self.inbox.put((self, "error", exc))
        except TimeoutError:
            self.inbox.put((self, "error", openai.APITimeoutError(request=self._request())))
        except Exception as exc:  # noqa: BLE001 - a refused connection, a transport failure
            failure = openai.APIConnectionError(message=str(exc), request=self._request())
            self.inbox.put((self, "error", failure))
        finally:
            # A connection read to the answer's end is kept for the next request; any other
            # is closed, which tells the provider we went (a Stop or a timeout ends the
            # model's work, not just the display).
            if protocol is not None:
                protocol.release(read_whole)

    def _request(self) -> httpx2.Request:
        return httpx2.Request("POST", self._target.url)

    def _event(self, data: bytes) -> bool:
        """One event of the answer; False once the reply has ended."""
        if data.startswith(b"[DONE]"):
            self._done = True
            return False
        return self._take(json.loads(data))

    async def _read_through_client(
        self, endpoint: tuple[str, str | None], timeout: float, body: dict
    ) -> None:
        try:
            client = _streams().client(endpoint).with_options(timeout=timeout)
            stream = await client.post(
                "/chat/completions",
                body=body,
                cast_to=object,
                stream=True,
                stream_cls=openai.AsyncStream[object],
            )
        except Exception as exc:  # noqa: BLE001 - handed to the caller, which classifies it
            self.inbox.put((self, "error", exc))
            return
        response = stream.response
        try:
            encoded = response.headers.get("content-encoding", "identity") != "identity"
            chunks = response.aiter_bytes() if encoded else response.aiter_raw()
            events = _SSEData()
            async for chunk in chunks:
                for data in events.feed(chunk):
                    if data.startswith(b"[DONE]"):
                        self.inbox.put((self, "end", None))
                        return
                    if not self._take(json.loads(data)):
                        return
            self.inbox.put((self, "end", None))
        except openai.APIError as exc:
            self.inbox.put((self, "error", exc))
        except Exception as exc:  # noqa: BLE001 - a transport failure mid-body
            failure = openai.APIConnectionError(message=str(exc), request=response.request)
            self.inbox.put((self, "error", failure))
        finally:
            # Closing a response not read to its end closes its connection: the provider
            # sees us go (a Stop or a timeout ends the model's work, not just the display).
            await response.aclose()

    def _take(self, chunk: object) -> bool:
        """Use one chunk; False once the caller has ended the reply."""
        if not isinstance(chunk, dict):
            return True
        error = chunk.get("error")
        if error:
            message = error.get("message") if isinstance(error, dict) else None
            raise openai.APIError(
                message=message if isinstance(message, str) else "An error occurred",
                request=self._request(),
                body=error,
            )
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = {
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "total_tokens": usage.get("total_tokens"),
            }
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            text = delta.get("content") if isinstance(delta, dict) else None
            if text and isinstance(text, str):
                with self._lock:
                    if self._closed:
                        return False  # no text after the caller ended the reply
                    self.on_text(text)
                    self.texts += 1
                    self.last_text_at = time.monotonic()
        return True

    def close(self) -> None:
        """End the upstream request now (its task is cancelled, which closes the response
        and its connection). No text reaches `on_text` once this returns."""
        with self._lock:
            self._closed = True
        self._task.cancel()


# How often a reply that can be woken (stream_reply's register_wake) still asks itself
# whether it was stopped, should a wake-up be missed.
WAKELESS_CHECK_SECONDS = 1.0


def stream_reply(
    *,
    model: str,
    temperature: float,
    max_tokens: int,
    messages: list[dict[str, str]],
    on_delta: Callable[[str], None],
    should_cancel: Callable[[], bool] = lambda: False,
    cancel_check_interval: float = 0.05,
    timeouts: ReplyTimeouts | None = None,
    budget_seconds: float | None = None,
    register_wake: Callable[[Callable[[], None]], None] | None = None,
) -> ReplyResult:
    """Stream a reply. Until its first text it must start within `timeouts.first_token`
    (attempts, back-off and a 429's Retry-After all count); then no silence may last longer
    than `timeouts.idle`; and the whole reply ends at `timeouts.total` (or `budget_seconds`).
    A reply ended by a timeout after text came is kept and marked `cut`.

    `on_delta` is called on the reading thread, one call at a time, and never after this
    returns; `should_cancel` is asked every `cancel_check_interval` seconds. With
    `register_wake` (called once with a function that wakes this reply at once, for whoever
    learns of a Stop first), it is asked on every wake and at least every
    WAKELESS_CHECK_SECONDS instead: a few hundred replies each polling 20 times a second
    cost a share of a core on their own."""
    limits = timeouts or ReplyTimeouts.from_config()
    total = limits.total if budget_seconds is None else min(limits.total, budget_seconds)
    started = time.monotonic()
    end_at = started + total
    first_by = min(started + limits.first_token, end_at)
    result = ReplyResult()
    parts: list[str] = []
    backoff = 0.25
    body = {
        "model": model,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    last_check = 0.0
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    if register_wake is not None:
        register_wake(lambda: inbox.put((None, "wake", None)))
        cancel_check_interval = max(cancel_check_interval, WAKELESS_CHECK_SECONDS)
    woken = False

    def cancelled() -> bool:
        nonlocal last_check, woken
        now = time.monotonic()
        if now - last_check < cancel_check_interval and not woken:
            return False
        last_check, woken = now, False
        return should_cancel()

    def on_text(text: str) -> None:
        parts.append(text)
        on_delta(text)

    while not result.cancelled:
        remaining = first_by - time.monotonic()
        if remaining <= 0:
            result.failed = True
            result.error = result.error or "no reply within the first-token timeout"
            break
        endpoint = _endpoint()
        if endpoint is None:
            result.failed, result.error = True, "not configured"
            break
        result.attempts += 1
        # The HTTP read timeout only backs up our own clock (a reader left behind ends).
        upstream = _Upstream(endpoint, max(remaining, limits.idle) + 1, body, on_text, inbox)
        failure: Exception | None = None
        try:
            while True:
                if cancelled():
                    result.cancelled = True
                    break
                now = time.monotonic()
                # Until the first text, the first-token limit; then silence since the last.
                if upstream.texts:
                    deadline = min(upstream.last_text_at + limits.idle, end_at)
                else:
                    deadline = first_by
                if now >= deadline:
                    if parts:
                        result.cut = True
                        result.error = (
                            "reply time limit" if deadline >= end_at else "stream went quiet"
                        )
                    else:
                        result.failed = True
                        result.error = "no reply within the first-token timeout"
                    break
                try:
                    source, kind, value = inbox.get(
                        timeout=min(deadline - now, cancel_check_interval)
                    )
                except queue.Empty:
                    continue
                if kind == "wake":
                    woken = True
                    continue
                if source is not upstream:
                    continue  # an earlier attempt's reader, ending late
                if kind == "error":
                    failure = value  # type: ignore[assignment]
                break
        finally:
            upstream.close()  # a cancel or timeout ends the upstream request too
        if upstream.usage is not None:
            result.usage = upstream.usage
        if failure is None:
            break
        result.error = f"{type(failure).__name__}: {failure}"[:500]
        if parts:
            result.cut = True  # the text so far is kept, marked as incomplete
            break
        if not _retryable(failure):
            result.failed = True
            break
        wait = retry_after_seconds(failure)
        if wait is None:
            wait, backoff = backoff, min(backoff * 2, 4.0)
        if time.monotonic() + wait >= first_by:
            # The provider asks for longer than the reply may take to start: give up now
            # rather than hammer it, or sit out a wait that cannot end in time.
            result.failed = True
            break
        log.warning("assistant attempt %s failed (%s); retrying", result.attempts, failure)
        wake_at = time.monotonic() + wait
        while time.monotonic() < wake_at:
            if cancelled():
                result.cancelled = True
                break
            try:
                _source, kind, _value = inbox.get(
                    timeout=min(cancel_check_interval, max(0.0, wake_at - time.monotonic()))
                )
            except queue.Empty:
                continue
            woken = woken or kind == "wake"
    result.content = "".join(parts)
    result.processing_ms = int((time.monotonic() - started) * 1000)
    return result


def complete(messages: list[dict[str, str]], max_tokens: int = 300) -> str | None:
    """One non-streamed completion (summaries); None when not configured or failing."""
    client = client_or_none()
    if client is None:
        return None
    try:
        response = client.chat.completions.create(
            model=current_app.config["OPENAI_MODEL"],
            temperature=0.2,
            max_tokens=max_tokens,
            messages=messages,
        )
    except Exception as exc:  # noqa: BLE001
        log.warning("completion failed: %s", exc)
        return None
    return (response.choices[0].message.content or "").strip() or None
