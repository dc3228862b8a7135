"""The chat widget's reply stream against the model server read directly (issue 4).

Production mode: one throwaway PostgreSQL database and Redis namespace, one gunicorn web
process (gthread), the Procfile's `worker` (`dramatiq tasks.worker`, 2 processes × 8 threads,
every queue but `assistant`) and `assistant` (`--queues assistant`, 1 process × 32 threads:
the replies), and a local OpenAI-compatible server (tests/fake_openai.py) in the benchmark
process that the workers reach through OPENAI_BASE_URL. Every figure is measured in the same
run against the same fake server:

- time to first delta (TTFD), *direct*: the `openai` client (stream=True, one client reused)
  asks the fake server for a short reply; from the request to the first content chunk.
- TTFD *through Switchboard*: a /ws/chat client (a visitor on an origin the tenant allows)
  sends a `message` frame; from the send to the first `delta` frame of its reply. The two
  alternate sample by sample, each Switchboard sample waiting for `done` before the next.
  Visitors change every 8 messages (the default limit is 10 messages a minute per visitor),
  and each new socket waits 0.3 s after `session_init` before its first message.
  *added* = Switchboard − direct, at p50 and p99 of each side.
- the added time, stage by stage, from timestamps taken outside the app's code: the visitor
  Message's created_at (web process), the Redis Stream ids (Redis's ms clock) of the reply's
  `typing` and first `delta` frames on the live bus, and when the fake server received the
  model request. This module is also loaded into the workers (EXTRA_ACTOR_MODULES), where a
  middleware records, for `generate_reply`'s messages (sent by the web process right after
  its commit), when each was enqueued (Dramatiq's message_timestamp, ms) and when a worker
  started it.
  Means are used for the shares, so the stages add up to the whole.
- TTFD *after idle*: the same, but each message is sent after the whole system was idle for
  a couple of seconds — the usual case for a chat widget, and the one in which Dramatiq's
  Redis consumers would have backed off their polling (they wait on a wake-up token
  instead: tasks/redis_broker.py).
- deltas/s: K visitors each get a long reply (N tokens, no delay between chunks) at the same
  time through the one web process; delta frames received by all clients ÷ the time from the
  first delta to the last. Their messages go out at the same moment (--chat-stagger-ms
  spreads them; runs before 2026-12-02 used 25 ms, a precaution that outlived the pool stall
  it was for). The base is the fake server read directly by K concurrent `openai` clients
  (same window). Every reply is checked: sequence numbers 1..N exactly once each, in order,
  text equal to the model's, `done` carrying N, and the saved Message equal to the model's
  text, and no reply frame may reach a socket before the visitor's own message.
- relay ceiling: the same K sockets; the frames ReplyStream.delta would publish (without
  the console's HTML copy) are XADDed onto their chats' live-bus topics from here in
  pipelines, then `done`: what one web process relays with the workers and the model out
  of the way.
CPU seconds of the web process group, the worker process group and the benchmark process
(fake server and clients) are read from /proc around the throughput figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable

import dramatiq
from dramatiq.middleware import Middleware

from bench.common import (
    BenchError,
    CpuMeter,
    ProdEnv,
    create_tenant_user,
    dramatiq_workers,
    note,
    prod_app,
    result,
    sized,
    summarize,
    web_server,
)

NAME = "chat"
DESCRIPTION = "time to first delta through /ws/chat vs the model directly, and deltas/s relayed"

DEFAULTS = {
    # name: (full run, --quick)
    "samples": (50, 10),
    "idle_samples": (6, 1),
    "chats": (20, 5),
    "tokens": (400, 200),
    "warmup": (8, 3),
}
ORIGIN = "http://shop.bench.example"
SHORT_REPLY = "Thanks for asking! Orders usually ship within two working days of payment."
TARGET_ADDED_MS = 5.0  # issue 4: added TTFD under 5 ms at p50
MESSAGES_PER_VISITOR = 8  # under the default CHAT_RATE_LIMIT_PER_MINUTE (10)
SETTLE_SECONDS = 0.3  # a new socket's topic joins the web process's bus reader
STAMPS_KEY = "bench:chat:starts"  # under REDIS_PREFIX; written by _StampStarts in the workers
STAMPED_ACTORS = ("t_generate_reply",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("chat")
    group.add_argument(
        "--chat-samples", type=int, help="TTFD samples of each kind (default 50; --quick 10)"
    )
    group.add_argument(
        "--chat-idle-samples",
        type=int,
        help="TTFD samples after the system was idle (default 6; --quick 1; 0 skips)",
    )
    group.add_argument(
        "--chat-idle-seconds",
        type=float,
        default=2.0,
        help="idle time before each of those (default 2)",
    )
    group.add_argument(
        "--chat-chats", type=int, help="concurrent long replies (default 20; --quick 5)"
    )
    group.add_argument(
        "--chat-tokens", type=int, help="tokens per long reply (default 400; --quick 200)"
    )
    group.add_argument(
        "--chat-stagger-ms",
        type=float,
        default=0.0,
        help="gap between the K visitors' messages (default 0: all at once)",
    )
    group.add_argument(
        "--chat-worker-processes", type=int, default=2, help="dramatiq --processes (default 2)"
    )
    group.add_argument(
        "--chat-worker-threads", type=int, default=8, help="dramatiq --threads (default 8)"
    )
    group.add_argument(
        "--chat-assistant-processes",
        type=int,
        default=1,
        help="dramatiq --queues assistant --processes (default 1, as the Procfile)",
    )
    group.add_argument(
        "--chat-assistant-threads",
        type=int,
        default=32,
        help="their --threads (default 32, as the Procfile)",
    )
    group.add_argument(
        "--chat-web-threads", type=int, default=32, help="gunicorn --threads (default 32)"
    )


def _size(args: argparse.Namespace, name: str):
    return sized(args, name, DEFAULTS, NAME)


def run(args: argparse.Namespace) -> list[dict]:
    from tests.fake_openai import FakeOpenAI, Script

    samples, idle_samples, chats, tokens = (
        _size(args, n) for n in ("samples", "idle_samples", "chats", "tokens")
    )
    if samples < 1 or chats < 1 or tokens < 1:
        raise BenchError("--chat-samples, --chat-chats and --chat-tokens must be at least 1")
    if chats > args.chat_web_threads - 4:
        raise BenchError(f"{chats} sockets need more than --chat-web-threads (each holds one)")
    rows: list[dict] = []
    # The app's logging set-up shows every HTTP request the openai client makes at INFO.
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    fake = FakeOpenAI(Script(reply=SHORT_REPLY)).start()
    fake.records = _StampedRecords()
    # http.server listens with a backlog of 5: K clients connecting at once overflow it.
    fake.server.socket.listen(128)
    try:
        env = {
            "OPENAI_BASE_URL": fake.base_url,
            "OPENAI_API_KEY": "bench-key",
            "OPENAI_MODEL": "fake-model",
        }
        # The workers import this module too (EXTRA_ACTOR_MODULES): see _StampStarts.
        with prod_app("chat", actor_modules=[__name__], env=env) as penv:
            site = _Site.create(penv)
            procs, threads = args.chat_worker_processes, args.chat_worker_threads
            note(
                f"starting gunicorn (gthread, 1 process × {args.chat_web_threads} threads) and "
                f"`dramatiq tasks.worker` with {procs} processes × {threads} threads for the "
                f"handlers and {args.chat_assistant_processes} × {args.chat_assistant_threads} "
                "for the `assistant` queue"
            )
            with contextlib.ExitStack() as stack:
                web = stack.enter_context(
                    web_server(penv, threads=args.chat_web_threads, wait=False)
                )
                # As the Procfile: `worker` runs the handlers, `assistant` the replies.
                workers = stack.enter_context(
                    dramatiq_workers(
                        penv,
                        processes=procs,
                        threads=threads,
                        env={
                            "SWITCHBOARD_BENCH_CHAT_STAMPS": "1",
                            "WORKER_SKIP_QUEUES": "assistant",
                        },
                    )
                )
                assistant = stack.enter_context(
                    dramatiq_workers(
                        penv,
                        processes=args.chat_assistant_processes,
                        threads=args.chat_assistant_threads,
                        env={"SWITCHBOARD_BENCH_CHAT_STAMPS": "1"},
                        queues=("assistant",),
                    )
                )
                web.wait_ready()
                bench = _ChatBench(penv, site, web, workers, assistant, fake)
                rows += bench.latency(
                    samples, idle_samples, args.chat_idle_seconds, _size(args, "warmup")
                )
                rows += bench.throughput(chats, tokens, args.chat_stagger_ms / 1000)
    finally:
        fake.stop()
    return rows


# ---------------------------------------------------------------- inside the workers


class _StampStarts(Middleware):
    """When each message on the reply path was enqueued (Dramatiq's message_timestamp) and
    when a worker started it, into a Redis hash: the two queue waits, seen from outside the
    app's code. One HSET per such message is all it adds."""

    def __init__(self) -> None:
        self.redis = None

    def before_process_message(self, broker, message) -> None:
        if message.actor_name not in STAMPED_ACTORS or not message.args:
            return
        started = time.time()
        if self.redis is None:
            import redis

            self.redis = redis.Redis.from_url(os.environ["REDIS_URL"])
        self.redis.hset(
            os.environ["REDIS_PREFIX"] + STAMPS_KEY,
            f"{message.actor_name}:{message.args[0]}",
            f"{message.message_timestamp / 1000} {started}",
        )


if os.environ.get("SWITCHBOARD_BENCH_CHAT_STAMPS") == "1":
    dramatiq.get_broker().add_middleware(_StampStarts())


# ---------------------------------------------------------------- set-up and helpers


class _StampedRecords(list):
    """The fake server's request log, with the wall-clock time each request arrived."""

    def append(self, record) -> None:
        record.arrived_at = time.time()
        super().append(record)


class _Site:
    """A tenant whose widget may be embedded on ORIGIN, with a default agent."""

    def __init__(self, tenant_id: int, widget_key: str) -> None:
        self.tenant_id, self.widget_key = tenant_id, widget_key

    @classmethod
    def create(cls, penv: ProdEnv) -> _Site:
        from extensions import db
        from models.accounts import Tenant
        from models.chats import Agent

        user = create_tenant_user(penv, "Bench Shop")
        with penv.app.app_context():
            tenant = db.session.get(Tenant, user.tenant_id)
            tenant.allowed_origins = ORIGIN
            db.session.add(
                Agent(
                    tenant_id=tenant.id,
                    name="Helper",
                    model="fake-model",
                    is_default=True,
                    system_prompt="You help shoppers with their orders.",
                )
            )
            db.session.commit()
            site = cls(tenant.id, tenant.widget_key)
            db.session.remove()
        return site


def _ms(seconds: float) -> float:
    return seconds * 1000


def _stats_text(st: dict) -> str:
    return (
        f"p50 {st['p50']:.1f} ms, p99 {st['p99']:.1f} ms, min {st['min']:.1f}, max {st['max']:.1f}"
    )


class _Visitor:
    """One widget socket (a new visitor): session_init done, frames timestamped."""

    def __init__(self, base_url: str, widget_key: str) -> None:
        from tests.chat_client import ChatClient

        self.client = ChatClient(base_url, widget_key, ORIGIN)
        self.client.send("session_init")
        self.chat_id = self.client.expect("session")["chat_id"]
        self.sent = 0

    def recv(self, timeout: float) -> tuple[float, float, dict] | None:
        """(perf_counter, wall time, frame) of the next frame, or None after min(timeout, 1 s).

        Callers keep their own deadline: a socket timeout alone would never fire while the
        server's pings keep arriving (websocket-client answers them inside recv)."""
        import websocket

        try:
            frame = self.client.recv(min(timeout, 1.0))
        except websocket.WebSocketTimeoutException:
            return None
        if frame.get("type") == "message" and frame.get("chat_id"):
            # A chat exists from its first message on; its ack names it.
            self.chat_id = frame["chat_id"]
        return time.perf_counter(), time.time(), frame

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


class _Visitors:
    """Hands out sockets, a fresh visitor every MESSAGES_PER_VISITOR messages."""

    def __init__(self, base_url: str, widget_key: str) -> None:
        self.base_url, self.widget_key = base_url, widget_key
        self.current: _Visitor | None = None

    def next(self) -> _Visitor:
        if self.current is None or self.current.sent >= MESSAGES_PER_VISITOR:
            self.close()
            self.current = _Visitor(self.base_url, self.widget_key)
            time.sleep(SETTLE_SECONDS)
        self.current.sent += 1
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


def _in_threads(count: int, target: Callable[[int], None], name: str) -> None:
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [
        threading.Thread(target=guarded, args=(i,), name=f"{name}-{i}", daemon=True)
        for i in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        cause = errors[0].__cause__ or errors[0].__context__
        raise BenchError(f"{name}: {errors[0]!r} (from {cause!r})") from errors[0]


# ---------------------------------------------------------------- the benchmark


class _ChatBench:
    def __init__(self, penv: ProdEnv, site: _Site, web, workers, assistant, fake) -> None:
        import openai

        self.penv, self.site, self.web, self.fake = penv, site, web, fake
        self.workers, self.assistant = workers, assistant
        self.openai = openai.OpenAI(base_url=fake.base_url, api_key="bench-key", max_retries=0)
        self.tag = uuid.uuid4().hex[:6]

    # ------------------------------------------------------------ one sample of each kind

    def direct_ttfd(self, n: int) -> float:
        """Seconds from the request to the first content chunk; the stream is read to the end."""
        start = time.perf_counter()
        stream = self.openai.chat.completions.create(
            model="fake-model",
            messages=[
                {"role": "system", "content": "You help shoppers with their orders."},
                {"role": "user", "content": f"Where is my order? (direct {self.tag}-{n})"},
            ],
            stream=True,
            stream_options={"include_usage": True},
        )
        first = None
        with contextlib.closing(stream):
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter()
        if first is None:
            raise BenchError("the direct stream had no content")
        return first - start

    def switchboard_sample(self, visitor: _Visitor, label: str) -> dict:
        """Send one message; timestamps of the send, the ack, typing, first delta and done."""
        marker = f"{label} {self.tag}"
        sample: dict = {"marker": marker}
        sample["sent_wall"] = time.time()
        sample["sent"] = time.perf_counter()
        visitor.client.send("message", content=f"Where is my order? ({marker})")
        deadline = time.monotonic() + 30
        reply_id = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(
                    f"no complete reply within 30 s ({marker}): {sample}; "
                    + self.diagnose(sample.get("message_id"))
                )
            got = visitor.recv(remaining)
            if got is None:
                continue
            at, wall, frame = got
            kind = frame.get("type")
            if kind == "error":
                raise BenchError(f"the chat socket answered an error: {frame}")
            if kind == "message" and (frame.get("message") or {}).get("sender") == "visitor":
                sample["message_id"] = frame["message"]["id"]
                sample["ack_wall"] = wall
                reply_id = f"r{sample['message_id']}"
            elif frame.get("reply_id") != reply_id or reply_id is None:
                continue
            elif kind == "typing":
                sample["typing_wall"] = wall
            elif kind == "delta" and "first_delta" not in sample:
                sample["first_delta"], sample["first_delta_wall"] = at, wall
            elif kind == "done":
                if "first_delta" not in sample:
                    raise BenchError(f"a reply without deltas: {frame}")
                return sample

    def diagnose(self, message_id: int | None) -> str:
        """Where a reply that never came got to: the spine's rows, the queues, the bus."""
        from sqlalchemy import select

        from extensions import db
        from models.chats import Message
        from models.events import OutboxEvent, ProcessedEvent
        from services.chats import chat_topic

        if message_id is None:
            return "no ack for the message either"
        parts = []
        with contextlib.suppress(Exception), self.penv.app.app_context():
            try:
                message = db.session.get(Message, message_id)
                events = db.session.execute(
                    select(OutboxEvent.id, OutboxEvent.status, OutboxEvent.attempts).where(
                        OutboxEvent.topic == "message.created",
                        OutboxEvent.entity_id == message_id,
                    )
                ).all()
                parts.append(f"outbox rows {[tuple(e) for e in events]}")
                handled = db.session.execute(
                    select(ProcessedEvent.handler, ProcessedEvent.status).where(
                        ProcessedEvent.event_id.in_([e.id for e in events])
                    )
                ).all()
                parts.append(f"handled {[tuple(h) for h in handled]}")
                replies = db.session.scalars(
                    select(Message.id).where(Message.in_response_to_id == message_id)
                ).all()
                parts.append(f"reply messages {replies}")
                parts.append(f"queues {self.penv.queue_sizes()}")
                if message is not None:
                    key = self.penv.app.config["REDIS_PREFIX"] + "live:"
                    key += chat_topic(message.tenant_id, message.chat_id)
                    redis = self.penv.redis()
                    frames = redis.xrevrange(key, count=5)
                    redis.close()
                    parts.append(f"last bus frames {[f[1].get(b'd', b'')[:80] for f in frames]}")
            finally:
                db.session.remove()
        return "; ".join(parts)

    # ------------------------------------------------------------ TTFD

    def latency(
        self, samples: int, idle_samples: int, idle_seconds: float, warmup: int
    ) -> list[dict]:
        rows: list[dict] = []
        self.fake.script.reply, self.fake.script.chunk_delay = SHORT_REPLY, 0.0
        visitors = _Visitors(self.web.url, self.site.widget_key)
        try:
            note(f"warm-up: {warmup} replies (worker processes load VADER, templates, …)")
            for n in range(warmup):
                self.direct_ttfd(-n)
                self.switchboard_sample(visitors.next(), f"warm-{n}")
            visitors.close()
            self.penv.drain()

            note(f"TTFD: {samples} direct and {samples} through /ws/chat, alternating")
            direct, through = [], []
            for n in range(samples):
                direct.append(self.direct_ttfd(n))
                through.append(self.switchboard_sample(visitors.next(), f"sample-{n}"))
                self.workers.check_alive()
                self.assistant.check_alive()
            visitors.close()
            d = summarize([_ms(x) for x in direct])
            s = summarize([_ms(x["first_delta"] - x["sent"]) for x in through])
            rows.append(
                result(
                    "TTFD direct p50",
                    d["p50"],
                    "ms",
                    detail=(
                        f"openai client (one, reused) → fake server, request to first content "
                        f"chunk; "
                        f"{samples} samples, {_stats_text(d)}"
                    ),
                )
            )
            rows.append(result("TTFD direct p99", d["p99"], "ms"))
            rows.append(
                result(
                    "TTFD through Switchboard p50",
                    s["p50"],
                    "ms",
                    ratio=s["p50"] / d["p50"],
                    vs="direct p50",
                    detail=(
                        f"/ws/chat `message` sent → first `delta` frame, same script, waiting for "
                        f"`done` between samples; {samples} samples, {_stats_text(s)}"
                    ),
                )
            )
            rows.append(
                result(
                    "TTFD through Switchboard p99",
                    s["p99"],
                    "ms",
                    ratio=s["p99"] / d["p99"],
                    vs="direct p99",
                )
            )
            added50, added99 = s["p50"] - d["p50"], s["p99"] - d["p99"]
            verdict = "meets" if added50 < TARGET_ADDED_MS else "misses"
            rows.append(
                result(
                    "added TTFD p50",
                    added50,
                    "ms",
                    ratio=added50 / TARGET_ADDED_MS,
                    vs=f"target {TARGET_ADDED_MS:g} ms",
                    detail=(
                        f"Switchboard p50 − direct p50; issue 4's target: under "
                        f"{TARGET_ADDED_MS:g} ms at p50 — {verdict} it. Consists of: message "
                        "save, its commit, the web process sending `generate_reply`, its "
                        "queue wait, its reads, the model request, bus publish, relay to the "
                        "socket (stage rows below)"
                    ),
                )
            )
            rows.append(
                result(
                    "added TTFD p99",
                    added99,
                    "ms",
                    detail="Switchboard p99 − direct p99",
                )
            )
            rows += self.breakdown(through)
            rows.append(self.client_construction())
            rows += self.round_trips()

            if idle_samples > 0:
                rows += self.idle_latency(idle_samples, idle_seconds, d)
        finally:
            visitors.close()
        return rows

    def idle_latency(self, count: int, idle_seconds: float, direct: dict) -> list[dict]:
        note(f"TTFD after {idle_seconds:g} s idle: {count} samples")
        visitors = _Visitors(self.web.url, self.site.widget_key)
        through = []
        try:
            for n in range(count):
                visitor = visitors.next()
                self.penv.drain()
                time.sleep(idle_seconds)
                through.append(self.switchboard_sample(visitor, f"idle-{n}"))
        finally:
            visitors.close()
        s = summarize([_ms(x["first_delta"] - x["sent"]) for x in through])
        hops = self._stages(through)
        hop_text = ", ".join(
            f"{name} {sum(v) / len(v):.0f} ms"
            for name, v in hops.items()
            if name.startswith("queue wait")
        )
        return [
            result(
                f"TTFD after {idle_seconds:g} s idle p50",
                s["p50"],
                "ms",
                ratio=s["p50"] / direct["p50"],
                vs="direct p50",
                detail=(
                    f"{count} sample{'s' if count != 1 else ''}, each after the queues drained "
                    f"and {idle_seconds:g} s "
                    f"passed; {_stats_text(s)}; mean {hop_text} "
                    "(an idle consumer waits on its queue's wake-up token, not a poll)"
                ),
            ),
            result(
                f"added TTFD after {idle_seconds:g} s idle p50",
                s["p50"] - direct["p50"],
                "ms",
                ratio=(s["p50"] - direct["p50"]) / TARGET_ADDED_MS,
                vs=f"target {TARGET_ADDED_MS:g} ms",
                detail=f"p99 {s['p99'] - direct['p99']:.0f} ms (against the direct p99)",
            ),
        ]

    # ------------------------------------------------------------ where the time goes

    STAGES = (
        ("socket → message saved", "web: frame read, rate limit (Redis), chat load, INSERT"),
        (
            "commit → reply enqueued",
            "web: commit with the outbox row, then the send of generate_reply, which goes out "
            "before the message.created event is sent to its handler groups (chat_auto_reply "
            "only as a fallback)",
        ),
        ("queue wait: assistant", "until the `assistant` process starts generate_reply"),
        ("generate_reply set-up", "its one read, the claim, history, commit, typing frame's XADD"),
        (
            "worker → model request",
            "the process's shared OpenAI client: connection (kept alive), request",
        ),
        (
            "model → delta published",
            "first chunk from the fake server, openai parsing, XADD (direct TTFD is in here)",
        ),
        ("bus → socket → client", "web's XREAD wakes, pump thread, ws send, client read"),
    )

    def _stages(self, through: list[dict]) -> dict[str, list[float]]:
        """Per stage, its milliseconds in each sample (the stages add up to the TTFD)."""
        from sqlalchemy import select

        from extensions import db
        from models.chats import Message

        ids = [x["message_id"] for x in through]
        arrivals = {}
        for record in list(self.fake.records):
            messages = record.body.get("messages") or [{}]
            arrivals[str(messages[-1].get("content", ""))] = getattr(record, "arrived_at", None)
        redis = self.penv.redis()
        with self.penv.app.app_context():
            try:
                created = dict(
                    db.session.execute(
                        select(Message.id, Message.created_at).where(Message.id.in_(ids))
                    ).all()
                )
                chat_of = dict(
                    db.session.execute(
                        select(Message.id, Message.chat_id).where(Message.id.in_(ids))
                    ).all()
                )
            finally:
                db.session.remove()
            # The live bus frames' Redis Stream ids are Redis's ms clock when each was added.
            published: dict[str, float] = {}
            prefix = self.penv.app.config["REDIS_PREFIX"] + "live:"
            from services.chats import chat_topic

            for chat_id in set(chat_of.values()):
                key = prefix + chat_topic(self.site.tenant_id, chat_id)
                for frame_id, fields in redis.xrange(key):
                    frame_key = json.loads(fields.get(b"d") or b"{}").get("key", "")
                    if frame_key.startswith("typing-r") or (
                        frame_key.startswith("delta-r") and frame_key.endswith("-1")
                    ):
                        published[frame_key] = int(frame_id.decode().split("-")[0]) / 1000
        # Stamped in the workers by _StampStarts: "enqueued started" per actor:argument.
        starts = {
            key.decode(): tuple(float(v) for v in value.split())
            for key, value in redis.hgetall(self.penv.prefix + STAMPS_KEY).items()
        }
        redis.close()

        stages: dict[str, list[float]] = {name: [] for name, _ in self.STAGES}
        for x in through:
            mid = x["message_id"]
            points = [
                x["sent_wall"],
                created[mid].timestamp() if mid in created else None,
                starts.get(f"t_generate_reply:{mid}", (None, None))[0],
                starts.get(f"t_generate_reply:{mid}", (None, None))[1],
                published.get(f"typing-r{mid}"),
                arrivals.get(f"Where is my order? ({x['marker']})"),
                published.get(f"delta-r{mid}-1"),
                x["first_delta_wall"],
            ]
            if any(p is None for p in points):
                continue  # a timestamp is missing: leave the sample out of the breakdown
            for (name, _), a, b in zip(self.STAGES, points[:-1], points[1:], strict=True):
                stages[name].append(_ms(b - a))
        return stages

    def client_construction(self, count: int = 10) -> dict:
        """What a reply would pay first if services.assistant built a client per reply."""
        import openai

        times = []
        for _ in range(count):
            start = time.perf_counter()
            client = openai.OpenAI(
                api_key="bench-key", base_url=self.fake.base_url, timeout=30, max_retries=0
            )
            times.append(_ms(time.perf_counter() - start))
            client.close()
        st = summarize(times)
        return result(
            "  openai.OpenAI() construction p50",
            st["p50"],
            "ms",
            detail=(
                f"in this process, {count} times, p99 {st['p99']:.1f} ms: a new client (httpx "
                "pool, SSL context with the CA bundle): what services.assistant saves on every "
                "reply by building one client per worker process and reusing it"
            ),
        )

    def round_trips(self, count: int = 200, idle_ms: float = 5.0) -> list[dict]:
        """A round trip to each server the reply's path uses, back to back and after the
        caller slept: what one hop between processes costs on this machine at best."""
        from sqlalchemy import text

        from extensions import db

        def timed(call, pause: float) -> dict:
            times = []
            for _ in range(count):
                if pause:
                    time.sleep(pause)
                start = time.perf_counter()
                call()
                times.append(_ms(time.perf_counter() - start))
            return summarize(times[count // 10 :])

        rows = []
        redis_client = self.penv.redis()
        with self.penv.app.app_context(), db.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            for label, call in (
                ("Redis PING", redis_client.ping),
                ("PostgreSQL SELECT 1", lambda: conn.execute(text("SELECT 1")).scalar()),
            ):
                busy, idle = timed(call, 0.0), timed(call, idle_ms / 1000)
                rows.append(
                    result(
                        f"  round trip: {label}, after {idle_ms:g} ms idle, p50",
                        idle["p50"],
                        "ms",
                        ratio=idle["p50"] / busy["p50"],
                        vs="back to back",
                        detail=(
                            f"from this process, {count} times each way; back to back p50 "
                            f"{busy['p50']:.3f} ms, after {idle_ms:g} ms idle p99 "
                            f"{idle['p99']:.3f} ms: a process woken from sleep answers later "
                            "(every hop on the way to the first delta wakes one: web, Redis, "
                            "PostgreSQL, the assistant process, the model server, the socket)"
                        ),
                    )
                )
        redis_client.close()
        return rows

    def breakdown(self, through: list[dict]) -> list[dict]:
        stages = self._stages(through)
        counted = len(next(iter(stages.values())))
        if not counted:
            return [result("added TTFD breakdown", "n/a", detail="no sample had every timestamp")]
        total = sum(sum(v) / len(v) for v in stages.values())
        rows = []
        for name, what in self.STAGES:
            values = stages[name]
            st = summarize(values)
            rows.append(
                result(
                    f"  stage: {name}",
                    st["mean"],
                    "ms",
                    ratio=st["mean"] / total if total else None,
                    vs="of the mean TTFD",
                    detail=f"mean; p50 {st['p50']:.1f}, p99 {st['p99']:.1f} ms — {what}",
                )
            )
        rows[0]["detail"] += (
            f" ({counted}/{len(through)} samples had every timestamp; Redis Stream ids are "
            "whole ms, so the stages around the bus are ±1 ms each)"
        )
        return rows

    # ------------------------------------------------------------ deltas per second

    def throughput(self, chats: int, tokens: int, stagger: float) -> list[dict]:
        reply = " ".join(f"tok{i}" for i in range(tokens))
        self.fake.script.reply, self.fake.script.chunk_delay = reply, 0.0
        rows: list[dict] = []
        self.penv.drain()

        note(f"upstream read directly: {chats} concurrent streams of {tokens} tokens")
        direct = self._direct_streams(chats, tokens)
        rows.append(
            result(
                "upstream deltas/s, read directly",
                direct["rate"],
                "deltas/s",
                detail=(
                    f"{chats} concurrent openai clients (threads in the benchmark process, "
                    f"as the fake server) × {tokens} tokens: {direct['count']} content chunks "
                    f"in {direct['window']:.2f} s (first chunk → last)"
                ),
            )
        )

        note(f"through /ws/chat: {chats} concurrent replies of {tokens} tokens")
        cpu = CpuMeter(
            web=self.web.proc.pid,
            workers=self.workers.proc.pid,
            assistant=self.assistant.proc.pid,
            bench="self",
        )
        sockets = [_Visitor(self.web.url, self.site.widget_key) for _ in range(chats)]
        try:
            time.sleep(SETTLE_SECONDS)
            cpu.start()
            through = self._switchboard_streams(sockets, reply, tokens, stagger)
            cpu.stop()
            self.workers.check_alive()
            saved = self._saved_replies(through["message_ids"], reply)
            checks = (
                f"{through['complete']}/{chats} replies complete with seq 1..{tokens} in "
                f"order, {through['lost']} lost, {through['duplicated']} duplicated, "
                f"{through['bad_text']} with other text, {through['early']} reply frames "
                f"before the visitor's message, {saved} saved Messages equal to the "
                "model's text"
            )
            rows.append(
                result(
                    "deltas/s relayed, one web process",
                    through["rate"],
                    "deltas/s",
                    ratio=through["rate"] / direct["rate"],
                    vs="upstream read directly",
                    detail=(
                        f"{chats} visitors × {tokens}-token replies, their messages sent "
                        f"{stagger * 1000:g} ms apart: "
                        f"{through['count']} delta frames in {through['window']:.2f} s (first "
                        f"delta → last; {through['span']:.2f} s from the sends); {checks}; CPU "
                        f"{cpu.text()}"
                    ),
                )
            )
            if through["problems"]:
                rows.append(
                    result(
                        "stream problems",
                        len(through["problems"]),
                        "replies",
                        detail="; ".join(through["problems"][:5]),
                    )
                )

            note(f"relay ceiling: frames published straight onto {chats} chats' topics")
            cpu.start()
            ceiling = self._bus_streams(sockets, tokens)
            cpu.stop()
            rows.append(
                result(
                    "bus → socket relay, one web process",
                    ceiling["rate"],
                    "deltas/s",
                    ratio=ceiling["rate"] / direct["rate"],
                    vs="upstream read directly",
                    detail=(
                        f"{tokens} delta frames for each of the {chats} chats' topics (as "
                        "ReplyStream publishes them, minus the console's HTML copy) XADDed "
                        "here in pipelines of 50 per chat, so the workers and the model are "
                        "out of the way (the readers here and other load share the CPUs): "
                        f"{ceiling['count']} frames received in {ceiling['window']:.2f} s; "
                        f"{ceiling['lost']} lost, {ceiling['duplicated']} duplicated; CPU "
                        f"{cpu.text()}"
                    ),
                )
            )
        finally:
            for visitor in sockets:
                visitor.close()
        return rows

    def _direct_streams(self, count: int, tokens: int) -> dict:
        import openai

        firsts, lasts, counts = [0.0] * count, [0.0] * count, [0] * count
        barrier = threading.Barrier(count)

        def read(i: int) -> None:
            client = openai.OpenAI(base_url=self.fake.base_url, api_key="bench-key", max_retries=0)
            with client:
                barrier.wait()
                stream = client.chat.completions.create(
                    model="fake-model",
                    messages=[{"role": "user", "content": f"Tell me everything ({i})"}],
                    stream=True,
                )
                with contextlib.closing(stream):
                    for chunk in stream:
                        if chunk.choices and chunk.choices[0].delta.content:
                            now = time.perf_counter()
                            if not counts[i]:
                                firsts[i] = now
                            lasts[i] = now
                            counts[i] += 1

        _in_threads(count, read, "direct-stream")
        total = sum(counts)
        if total != count * tokens:
            raise BenchError(f"the fake server sent {total} chunks, not {count * tokens}")
        window = max(lasts) - min(firsts)
        return {"rate": total / window, "count": total, "window": window}

    def _switchboard_streams(
        self, sockets: list[_Visitor], reply: str, tokens: int, stagger: float
    ) -> dict:
        count = len(sockets)
        barrier = threading.Barrier(count)
        sent_at = [0.0] * count
        seqs: list[list[int]] = [[] for _ in range(count)]
        texts: list[list[str]] = [[] for _ in range(count)]
        times: list[list[float]] = [[] for _ in range(count)]
        done: list[dict | None] = [None] * count
        message_ids: list[int | None] = [None] * count
        early = [0] * count  # reply frames before the visitor's own message came back

        def chat(i: int) -> None:
            visitor = sockets[i]
            barrier.wait()
            time.sleep(i * stagger)
            sent_at[i] = time.perf_counter()
            visitor.client.send("message", content=f"Tell me everything ({self.tag}-{i})")
            reply_id = None
            deadline = time.monotonic() + 60
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchError(
                        f"reply {i} incomplete after 60 s ({len(seqs[i])} deltas); "
                        + self.diagnose(message_ids[i])
                    )
                got = visitor.recv(remaining)
                if got is None:
                    continue
                at, _wall, frame = got
                kind = frame.get("type")
                if kind == "error":
                    raise BenchError(f"the chat socket answered an error: {frame}")
                if kind == "message" and (frame.get("message") or {}).get("sender") == "visitor":
                    message_ids[i] = frame["message"]["id"]
                    reply_id = f"r{message_ids[i]}"
                elif reply_id is None:
                    # This socket's one chat has one reply: a frame of it came before the
                    # message it answers (the widget would show the answer above it).
                    early[i] += kind in ("typing", "delta", "done")
                    continue
                elif frame.get("reply_id") != reply_id:
                    continue
                elif kind == "delta":
                    seqs[i].append(frame["seq"])
                    texts[i].append(frame["text"])
                    times[i].append(at)
                elif kind == "done":
                    done[i] = frame
                    return

        _in_threads(count, chat, "ws-chat")
        return self._verify(seqs, texts, times, done, reply, tokens, sent_at) | {
            "message_ids": message_ids,
            "early": sum(early),
        }

    @staticmethod
    def _verify(seqs, texts, times, done, reply, tokens, sent_at) -> dict:
        expected = list(range(1, tokens + 1))
        lost = duplicated = bad_text = complete = 0
        problems = []
        for i, got in enumerate(seqs):
            seen = set(got)
            lost += len(set(expected) - seen)
            duplicated += len(got) - len(seen)
            if "".join(texts[i]) != reply:
                bad_text += 1
            final = done[i] or {}
            if got == expected and final.get("seq") == tokens:
                complete += 1
            else:
                gaps = [b for a, b in zip(got, got[1:], strict=False) if b != a + 1]
                problems.append(
                    f"reply {i}: {len(got)} deltas, done.seq {final.get('seq')}, "
                    f"first gap/repeat before seq {gaps[:1] or '-'}"
                )
        all_times = [t for ts in times for t in ts]
        count = len(all_times)
        window = max(all_times) - min(all_times) if count > 1 else float("nan")
        return {
            "rate": count / window if window else float("nan"),
            "count": count,
            "window": window,
            "span": max(all_times) - min(sent_at) if count else float("nan"),
            "lost": lost,
            "duplicated": duplicated,
            "bad_text": bad_text,
            "complete": complete,
            "problems": problems,
        }

    def _saved_replies(self, message_ids: list[int | None], reply: str) -> int:
        from sqlalchemy import select

        from extensions import db
        from models.chats import Message

        self.penv.drain()
        with self.penv.app.app_context():
            try:
                contents = db.session.scalars(
                    select(Message.content).where(
                        Message.in_response_to_id.in_([m for m in message_ids if m]),
                        Message.sender == "assistant",
                    )
                ).all()
            finally:
                db.session.remove()
        return sum(1 for c in contents if c == reply)

    def _bus_streams(self, sockets: list[_Visitor], tokens: int) -> dict:
        from sqlalchemy import select

        from events.live import encode
        from extensions import db
        from models.chats import Chat
        from services.chat_live import ReplyStream
        from services.chats import chat_topic

        with self.penv.app.app_context():
            try:
                chat_ids = {
                    str(public): pk
                    for public, pk in db.session.execute(
                        select(Chat.public_id, Chat.id).where(Chat.tenant_id == self.site.tenant_id)
                    )
                }
            finally:
                db.session.remove()
        count = len(sockets)
        pks = [chat_ids[visitor.chat_id] for visitor in sockets]
        reply_ids = [f"rbus{self.tag}{i}" for i in range(count)]
        texts_sent = [f" tok{n}" if n else "tok0" for n in range(tokens)]
        bus = self.penv.app.extensions["switchboard.live"].bus
        batch = 50
        # The frames ReplyStream.delta publishes (without the console's HTML copy), pipelined
        # in batches so that the publisher is not what limits the rate.
        pipelines = []
        for first in range(0, tokens, batch):
            pipe = bus.redis.pipeline(transaction=False)
            for i in range(count):
                key = bus.prefix + chat_topic(self.site.tenant_id, pks[i])
                for n in range(first, min(first + batch, tokens)):
                    data = encode(
                        f"delta-{reply_ids[i]}-{n + 1}",
                        json_data={
                            "type": "delta",
                            "reply_id": reply_ids[i],
                            "seq": n + 1,
                            "text": texts_sent[n],
                        },
                    )
                    pipe.xadd(key, {"d": data}, maxlen=bus.maxlen, approximate=True)
            pipelines.append(pipe)

        barrier = threading.Barrier(count + 1)
        seqs: list[list[int]] = [[] for _ in range(count)]
        texts: list[list[str]] = [[] for _ in range(count)]
        times: list[list[float]] = [[] for _ in range(count)]
        done: list[dict | None] = [None] * count
        started = [0.0]

        def publish() -> None:
            with self.penv.app.app_context():
                barrier.wait()
                started[0] = time.perf_counter()
                for pipe in pipelines:
                    pipe.execute()
                for i in range(count):
                    stream = ReplyStream(self.site.tenant_id, pks[i], reply_ids[i])
                    stream.seq = tokens
                    stream.done(None, usage=None)

        def read(i: int) -> None:
            barrier.wait()
            deadline = time.monotonic() + 60
            while done[i] is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchError(f"bus reply {i} incomplete after 60 s")
                got = sockets[i].recv(remaining)
                if got is None:
                    continue
                at, _wall, frame = got
                if frame.get("reply_id") != reply_ids[i]:
                    continue
                if frame.get("type") == "delta":
                    seqs[i].append(frame["seq"])
                    texts[i].append(frame["text"])
                    times[i].append(at)
                elif frame.get("type") == "done":
                    done[i] = frame

        def role(j: int) -> None:
            if j == count:
                publish()
            else:
                read(j)

        _in_threads(count + 1, role, "bus-relay")
        reply = "".join(texts_sent)
        return self._verify(seqs, texts, times, done, reply, tokens, [started[0]])
