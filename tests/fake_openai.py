"""A local OpenAI-compatible chat-completions server for tests and benchmarks.

It streams a scripted reply as server-sent events exactly like the real API (one
`chat.completion.chunk` per token, a final chunk with usage, then `data: [DONE]`), can fail
the first N requests with a status code, can stall, and records every request and whether
the client went away mid-stream (so a test can prove a cancel stopped the upstream call).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Script:
    reply: str = "Hello! How can I help you today?"
    chunk_delay: float = 0.0
    fail_first: int = 0
    fail_status: int = 500
    stall_seconds: float = 0.0  # wait this long before the first byte
    # Send a non-streamed answer one byte at a time, this many seconds apart (a model that
    # never goes quiet long enough for a read timeout, yet takes for ever).
    trickle_seconds: float = 0.0
    # Structured JSON responses for non-streaming calls (e.g. sentiment or summaries).
    json_reply: str | None = None
    # A stream that goes quiet mid-reply: after this many tokens, wait stall_mid_seconds.
    stall_after_tokens: int = 0
    stall_mid_seconds: float = 0.0
    # Sent as Retry-After with the scripted failures (e.g. a 429's "2").
    retry_after: str | None = None
    # Pace a stream at this many tokens a second on a fixed schedule (token i is due i/rate
    # seconds after the first), so a slow write does not slow the rest; 0 = as chunk_delay.
    tokens_per_second: float = 0.0
    # Per request: a callable given the request body that returns overrides of `reply` and
    # `tokens_per_second` for that request (a dict), or None for the script as it is.
    per_request: Any = None


@dataclass
class Record:
    body: dict[str, Any]
    path: str = ""
    authorization: str | None = None
    chunks_sent: int = 0
    client_gone: bool = False
    finished: bool = False
    at: float = field(default_factory=time.monotonic)  # when the request came


@dataclass
class FakeOpenAI:
    script: Script = field(default_factory=Script)
    records: list[Record] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    _failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Set by stop(): stalled and trickling answers give up instead of outliving the test.
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                record = Record(body, self.path, self.headers.get("Authorization"))
                with fake._lock:
                    fake.records.append(record)
                    fail = fake._failures < fake.script.fail_first
                    if fail:
                        fake._failures += 1
                if fail:
                    headers = {"Retry-After": fake.script.retry_after}
                    self._json(
                        fake.script.fail_status,
                        {"error": {"message": "scripted failure"}},
                        headers if fake.script.retry_after else None,
                    )
                    return
                if fake.script.stall_seconds and fake._stopping.wait(fake.script.stall_seconds):
                    return
                if body.get("stream"):
                    self._stream(record, body)
                else:
                    content = fake.script.json_reply or fake.script.reply
                    if fake.script.trickle_seconds:
                        self._trickle(record, _completion(body, content))
                        return
                    self._json(200, _completion(body, content))
                    record.finished = True

            def _trickle(self, record: Record, data: dict) -> None:
                payload = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    for index in range(len(payload)):
                        if fake._stopping.wait(fake.script.trickle_seconds):
                            return
                        self.wfile.write(payload[index : index + 1])
                        self.wfile.flush()
                    record.finished = True
                except (BrokenPipeError, ConnectionResetError):
                    record.client_gone = True

            def _json(self, status: int, data: dict, headers: dict | None = None) -> None:
                payload = json.dumps(data).encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _stream(self, record: Record, body: dict) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                overrides = (fake.script.per_request or (lambda _body: None))(body) or {}
                tokens = _tokens(overrides.get("reply", fake.script.reply))
                rate = overrides.get("tokens_per_second", fake.script.tokens_per_second)
                began = time.monotonic()
                try:
                    for index, token in enumerate(tokens):
                        if rate and index:
                            wait = began + index / rate - time.monotonic()
                            if wait > 0:
                                time.sleep(wait)
                        delta = {"content": token}
                        if index == 0:
                            delta["role"] = "assistant"
                        self._event(_chunk(body, delta))
                        record.chunks_sent += 1
                        if index + 1 == fake.script.stall_after_tokens and fake._stopping.wait(
                            fake.script.stall_mid_seconds
                        ):
                            return
                        if fake.script.chunk_delay:
                            time.sleep(fake.script.chunk_delay)
                    usage = {
                        "prompt_tokens": 12,
                        "completion_tokens": len(tokens),
                        "total_tokens": 12 + len(tokens),
                    }
                    self._event(_chunk(body, {}, finish="stop", usage=usage))
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                    record.finished = True
                except (BrokenPipeError, ConnectionResetError):
                    record.client_gone = True
                self.close_connection = True

            def _event(self, data: dict) -> None:
                self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self.server:
            self.server.shutdown()
            self.server.server_close()


def _tokens(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _chunk(body: dict, delta: dict, finish: str | None = None, usage: dict | None = None) -> dict:
    data = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model", "fake"),
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        data["usage"] = usage
    return data


def _completion(body: dict, content: str) -> dict:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fake"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


class PacedOpenAI:
    """A paced streaming server for load: one asyncio loop serves every stream, so hundreds
    of replies at a steady rate do not queue behind a thread each in one interpreter (their
    tokens would leave in bursts, and a benchmark would measure its own fake). Streamed chat
    completions only: `reply` at `tokens_per_second`, or per request as `per_request` (see
    Script) says. Meant to run in a process of its own: `start_in_process()`.

    One clock serves every stream: each wake-up writes every token that is due, at most
    TICK late, instead of a timer per token per stream. With 300 streams at 50 tokens/s
    the timers, and each token's JSON built anew, were a quarter of a core on the same two
    cores as the processes being measured."""

    TICK = 0.002

    def __init__(self, reply: str, tokens_per_second: float, per_request: Any = None) -> None:
        self.reply = reply
        self.tokens_per_second = tokens_per_second
        self.per_request = per_request
        self._due: list = []  # heap of (when, order, stream)
        self._order = 0
        self._more = None  # asyncio.Event: a stream was scheduled onto an empty heap

    @staticmethod
    def _encoded(body: dict, tokens: list[str]) -> list[bytes]:
        """Each token's event, then the final chunk (usage) and [DONE], as bytes."""
        mark = "\\u0000"  # how json.dumps writes the placeholder below
        head, tail = json.dumps(_chunk(body, {"content": "\x00"})).split(mark)
        first = json.dumps(_chunk(body, {"content": "\x00", "role": "assistant"})).split(mark)
        out = []
        for index, token in enumerate(tokens):
            left, right = first if not index else (head, tail)
            out.append(f"data: {left}{json.dumps(token)[1:-1]}{right}\n\n".encode())
        usage = {"prompt_tokens": 12, "completion_tokens": len(tokens)}
        usage["total_tokens"] = 12 + len(tokens)
        final = json.dumps(_chunk(body, {}, finish="stop", usage=usage))
        out.append(f"data: {final}\n\ndata: [DONE]\n\n".encode())
        return out

    async def _handle(self, reader, writer) -> None:
        import asyncio
        import heapq

        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = json.loads(await reader.readexactly(length) or b"{}")
            overrides = (self.per_request or (lambda _body: None))(body) or {}
            events = self._encoded(body, _tokens(overrides.get("reply", self.reply)))
            rate = overrides.get("tokens_per_second", self.tokens_per_second)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
            )
            loop = asyncio.get_running_loop()
            if not rate or len(events) <= 2:
                writer.write(b"".join(events))
            else:
                writer.write(events[0])
                ended = loop.create_future()
                stream = [writer, events, 1, loop.time(), rate, ended]
                if self._more is None:
                    self._more = asyncio.Event()
                    loop.create_task(self._clock())
                self._order += 1
                heapq.heappush(self._due, (stream[3] + 1 / rate, self._order, stream))
                self._more.set()
                await ended
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _clock(self) -> None:
        """Write every due token, then sleep until the next is due (at least TICK)."""
        import asyncio
        import heapq

        loop = asyncio.get_running_loop()
        while True:
            if not self._due:
                self._more.clear()
                await self._more.wait()
            now = loop.time()
            while self._due and self._due[0][0] <= now:
                _when, _order, stream = heapq.heappop(self._due)
                writer, events, index, began, rate, ended = stream
                if writer.transport.is_closing():
                    ended.set_result(None)  # the client went
                    continue
                if index == len(events) - 2:  # the last token: the final chunk goes with it
                    writer.write(events[index] + events[index + 1])
                    ended.set_result(None)
                    continue
                writer.write(events[index])
                stream[2] = index + 1
                self._order += 1
                heapq.heappush(self._due, (began + (index + 1) / rate, self._order, stream))
            if self._due:
                await asyncio.sleep(max(self._due[0][0] - loop.time(), self.TICK))

    def serve(self, ready) -> None:
        """Serve for ever on 127.0.0.1 (a free port), sending the base URL to `ready`."""
        import asyncio

        async def main() -> None:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=4096)
            port = server.sockets[0].getsockname()[1]
            ready.send(f"http://127.0.0.1:{port}/v1")
            async with server:
                await server.serve_forever()

        asyncio.run(main())

    def start_in_process(self):
        """(base URL, the process): the server in a process of its own (spawned)."""
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe(duplex=False)
        process = context.Process(target=self.serve, args=(child,), daemon=True)
        process.start()
        child.close()
        if not parent.poll(30):
            process.kill()
            raise RuntimeError("the paced model server did not start")
        return parent.recv(), process
