"""The live bus: topics of frames that web processes relay to the sockets subscribed to them.

Two transports with one interface:
- `MemoryBus` (embedded mode): per-topic ring buffers in this process.
- `RedisBus` (production): one Redis Stream per topic (XADD with MAXLEN), so any web process
  sees frames published by any worker, and a reader can resume from the last id it saw.

A `Hub` per web process fans frames out to local `Subscription`s; with Redis it runs one
reader thread for all topics subscribed in this process rather than one Redis connection per
browser. Frames are JSON: {"key": ..., "html": ...} (an OOB fragment) or {"key", "json"}.

A reader that may have missed frames marks its subscriptions `overflowed`, and their sockets
re-snapshot (pages) or catch up from the stream (the widget): when a frame's number in its
topic skips (trimmed away, Redis restarted empty), when Redis was unreachable for a while
(publishes then failed unseen), or when it could not even find a new topic's position.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    topic: str
    id: str
    key: str
    html: str | None = None
    json: Any = None

    @classmethod
    def decode(cls, topic: str, frame_id: str, raw: str | bytes) -> Frame:
        data = json.loads(raw)
        return cls(topic, frame_id, data.get("key", frame_id), data.get("html"), data.get("json"))


def encode(key: str, html: str | None = None, json_data: Any = None) -> str:
    body: dict[str, Any] = {"key": key}
    if html is not None:
        body["html"] = html
    if json_data is not None:
        body["json"] = json_data
    return json.dumps(body, separators=(",", ":"))


class MemoryBus:
    """In-process topics with monotonically increasing ids ("<n>-0", like Redis ids)."""

    def __init__(self, maxlen: int = 1000) -> None:
        self.maxlen = maxlen
        self._streams: dict[str, deque[tuple[int, str]]] = defaultdict(
            lambda: deque(maxlen=self.maxlen)
        )
        self._seq = 0
        self._cond = threading.Condition()
        self._listeners: list[Any] = []

    def publish(self, topic: str, data: str) -> str:
        with self._cond:
            self._seq += 1
            seq = self._seq
            self._streams[topic].append((seq, data))
            self._cond.notify_all()
            listeners = list(self._listeners)
        frame_id = f"{seq}-0"
        for listener in listeners:
            listener(topic, frame_id, data)
        return frame_id

    def publish_many(self, frames: list[tuple[str, str]]) -> None:
        for topic, data in frames:
            self.publish(topic, data)

    def last_id(self, topic: str) -> str:
        with self._cond:
            stream = self._streams.get(topic)
            return f"{stream[-1][0]}-0" if stream else "0-0"

    def read(self, positions: dict[str, str], block_ms: int = 0) -> list[tuple[str, str, str]]:
        """Frames after each topic's id, oldest first; waits up to block_ms for the first."""
        deadline = time.monotonic() + block_ms / 1000
        with self._cond:
            while True:
                out = []
                for topic, last in positions.items():
                    after = int(str(last).split("-")[0])
                    for seq, data in self._streams.get(topic, ()):
                        if seq > after:
                            out.append((topic, f"{seq}-0", data))
                remaining = deadline - time.monotonic()
                if out or remaining <= 0:
                    return sorted(out, key=lambda item: int(item[1].split("-")[0]))
                self._cond.wait(remaining)

    def add_listener(self, listener) -> None:
        with self._cond:
            self._listeners.append(listener)

    def ping(self) -> bool:
        return True

    # One process: every topic counts as watched (see RedisBus.watch), nothing is skipped.
    def watch(self, topics: Iterable[str], seconds: float = 0) -> list[str]:
        return []

    def watched(self, topics: Iterable[str]) -> tuple[set[str], int]:
        return set(topics), 0

    def watch_generation(self) -> int:
        return 0


# Each frame carries its number in its topic (field "n"), counted in Redis in the same step
# as the XADD: a reader that sees a number other than the one after the last it saw knows it
# missed frames (Redis restarted empty, the stream was trimmed past it) and re-snapshots.
_XADD_NUMBERED = """
local n = redis.call('INCR', KEYS[2])
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'd', ARGV[1], 'n', n)
"""


def _number_of(fields: dict) -> int | None:
    raw = fields.get(b"n") or fields.get("n")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


# Page topics watched by an open page: a sorted set of topic -> when its registration runs
# out (Redis's clock, ms), and a counter raised whenever a topic nobody watched gets a
# watcher. Returns the topics that had no live registration.
_WATCH = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local lapsed = {}
for i, topic in ipairs(ARGV) do
  if i > 1 then
    local until_ms = tonumber(redis.call('ZSCORE', KEYS[1], topic))
    if not until_ms or until_ms < ms then
      table.insert(lapsed, topic)
    end
    redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[1]), topic)
  end
end
if #lapsed > 0 then
  redis.call('INCR', KEYS[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms - 60000)
end
return lapsed
"""

_WATCHED = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local out = {tonumber(redis.call('GET', KEYS[2]) or '0')}
for i, topic in ipairs(ARGV) do
  local until_ms = tonumber(redis.call('ZSCORE', KEYS[1], topic))
  if until_ms and until_ms >= ms then
    table.insert(out, topic)
  end
end
return out
"""


class PipelinedScript:
    """A Lua script run for many keys in one round trip.

    redis-py's Script, called on a pipeline, asks SCRIPT EXISTS before every execute: a
    second round trip for each pipeline, which for the live bus doubled the Redis traffic of
    every publish. Here EVALSHA goes out at once; the script is loaded only when Redis
    answers NOSCRIPT (after a restart or a SCRIPT FLUSH) and those calls are sent again."""

    def __init__(self, client: Any, text: str) -> None:
        import hashlib

        self.redis = client
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def run_many(self, calls: Iterable[tuple[Sequence[Any], Sequence[Any]]]) -> list[Any]:
        """Run the script once per (keys, args), in order; their results. Raises the first
        error any call met."""
        from redis.exceptions import NoScriptError

        calls = list(calls)
        results = self._send(calls)
        missing = [i for i, out in enumerate(results) if isinstance(out, NoScriptError)]
        if missing:
            self.redis.script_load(self.text)
            for i, out in zip(missing, self._send([calls[i] for i in missing]), strict=True):
                results[i] = out
        for out in results:
            if isinstance(out, Exception):
                raise out
        return results

    def _send(self, calls: list[tuple[Sequence[Any], Sequence[Any]]]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(self.sha, len(keys), *keys, *args)
        return pipe.execute(raise_on_error=False)


class RedisBus:
    READ_COUNT = 500

    def __init__(self, url: str, prefix: str = "sb:live:", maxlen: int = 1000) -> None:
        import redis

        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=3)
        self.prefix = prefix
        self.maxlen = maxlen
        self._xadd_numbered = self.redis.register_script(_XADD_NUMBERED)
        self._xadd_many = PipelinedScript(self.redis, _XADD_NUMBERED)
        self._watch_script = self.redis.register_script(_WATCH)
        self._watched_script = self.redis.register_script(_WATCHED)

    def _key(self, topic: str) -> str:
        return self.prefix + topic

    def _number_key(self, topic: str) -> str:
        return self.prefix.rstrip(":") + "-n:" + topic

    def publish(self, topic: str, data: str) -> str:
        frame_id = self._xadd_numbered(
            keys=[self._key(topic), self._number_key(topic)], args=[data, self.maxlen]
        )
        return frame_id.decode() if isinstance(frame_id, bytes) else frame_id

    def publish_many(self, frames: list[tuple[str, str]]) -> None:
        """Several frames in one round trip (a pipeline, in order; not a transaction)."""
        self._xadd_many.run_many(
            ([self._key(topic), self._number_key(topic)], [data, self.maxlen])
            for topic, data in frames
        )

    def last_id(self, topic: str) -> str:
        return self.last_position(topic)[0]

    def last_position(self, topic: str) -> tuple[str, int | None]:
        """The id and number of the topic's newest frame ("0-0" and 0 for an empty topic)."""
        items = self.redis.xrevrange(self._key(topic), count=1)
        if not items:
            return "0-0", 0
        frame_id, fields = items[0]
        frame_id = frame_id.decode() if isinstance(frame_id, bytes) else frame_id
        return frame_id, _number_of(fields)

    def read(self, positions: dict[str, str], block_ms: int = 0) -> list[tuple[str, str, str]]:
        return [entry[:3] for entry in self.read_numbered(positions, block_ms)]

    def read_numbered(
        self, positions: dict[str, str], block_ms: int = 0
    ) -> list[tuple[str, str, str, int | None]]:
        """Like read(), each frame with its number in its topic (None if it has none)."""
        if not positions:
            time.sleep(block_ms / 1000)
            return []
        streams = {self._key(t): i for t, i in positions.items()}
        result = self.redis.xread(streams, block=block_ms or None, count=self.READ_COUNT)
        out = []
        for key, entries in result or ():
            key = key.decode() if isinstance(key, bytes) else key
            topic = key[len(self.prefix) :]
            for frame_id, fields in entries:
                frame_id = frame_id.decode() if isinstance(frame_id, bytes) else frame_id
                raw = fields.get(b"d") or fields.get("d")
                text = raw.decode() if isinstance(raw, bytes) else raw
                out.append((topic, frame_id, text, _number_of(fields)))
        return out

    def ping(self) -> bool:
        return bool(self.redis.ping())

    # -- which page topics an open page watches ----------------------------------------
    # A page's frames (a device card, a feed row) are rendered for the page's socket only;
    # the page takes a snapshot whenever it connects. A worker need not render them for a
    # topic no page watches, and with no dashboard open most of a device event's rendering
    # was for nobody. Web processes register the topics of their open pages here before
    # the page's snapshot (Hub.subscribe(watch=True)) and renew them while it stays open.

    def _watch_keys(self) -> list[str]:
        return [self.prefix + "-watched", self.prefix + "-watched-gen"]

    def watch(self, topics: Iterable[str], seconds: float) -> list[str]:
        """Register `topics` as watched for `seconds`; those that had no live registration
        (nobody watched them, or Redis lost it), whose frames may have been skipped."""
        topics = list(topics)
        if not topics:
            return []
        lapsed = self._watch_script(keys=self._watch_keys(), args=[int(seconds * 1000), *topics])
        return [t.decode() if isinstance(t, bytes) else t for t in lapsed]

    def watched(self, topics: Iterable[str]) -> tuple[set[str], int]:
        """Which of `topics` some open page watches now, and the watch generation (raised
        whenever a topic gains its first watcher) to give to `watch_generation` later."""
        out = self._watched_script(keys=self._watch_keys(), args=list(topics))
        return {t.decode() if isinstance(t, bytes) else t for t in out[1:]}, int(out[0])

    def watch_generation(self) -> int:
        return int(self.redis.get(self._watch_keys()[1]) or 0)


@dataclass(eq=False)
class Subscription:
    topics: frozenset[str]
    hub: Hub
    frames: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=2000))
    # Set when frames were dropped because this client fell behind: send a new snapshot.
    overflowed: bool = False
    # Called after each frame is put (or dropped): wakes a reader that serves many queues.
    notify: Callable[[], None] | None = None
    # A page's topics, registered as watched while it is open (Hub.subscribe(watch=True)).
    watched: bool = False

    def put(self, frame: Frame) -> None:
        try:
            self.frames.put_nowait(frame)
        except queue.Full:
            self.overflowed = True
        if self.notify is not None:
            self.notify()

    def drain(self, into: dict[str, Frame] | None = None) -> dict[str, Frame]:
        """Take every frame queued now into `into` (a new dict by default): the newest per
        key, in arrival order."""
        batch: dict[str, Frame] = {} if into is None else into
        while True:
            try:
                frame = self.frames.get_nowait()
            except queue.Empty:
                return batch
            batch.pop(frame.key, None)
            batch[frame.key] = frame

    def close(self) -> None:
        self.hub.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Hub:
    """Fans frames out to this process's subscriptions."""

    BUSY_READ = 32  # frames in one read that make the next wait `read_interval`

    def __init__(
        self, bus: MemoryBus | RedisBus, buffer: int = 2000, read_interval: float = 0.01
    ) -> None:
        self.bus = bus
        self.buffer = buffer  # frames a subscription holds before it counts as overflowed
        # After a read that brought many frames, the next one waits this long: an XREAD
        # names every followed topic, and with hundreds of replies streaming, reading again
        # at once fetched a few frames per call, most of the web process's time (and
        # Redis's) going to the calls themselves. A read of a few frames is followed at
        # once: a visitor's first delta comes right after the typing frame.
        self.read_interval = read_interval
        self._lock = threading.Lock()
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        # Where the reader is in each topic's stream (None: not known yet, Redis was away),
        # and the number of the last frame it saw there (None: unknown).
        self._positions: dict[str, str | None] = {}
        self._numbers: dict[str, int | None] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # The topics of this process's open pages (watch=True subscriptions, counted), when
        # each was last registered with the bus, and when the reader renews them all next.
        self._watched: dict[str, int] = {}
        self._registered: dict[str, float] = {}
        self._renew_at = 0.0
        if isinstance(bus, MemoryBus):
            bus.add_listener(self._deliver)

    # A page topic's registration (RedisBus.watch) lasts WATCH_SECONDS and is renewed every
    # WATCH_RENEW_SECONDS while a page here shows it.
    WATCH_SECONDS = 30.0
    WATCH_RENEW_SECONDS = 10.0

    def subscribe(
        self,
        topics: Iterable[str],
        notify: Callable[[], None] | None = None,
        *,
        watch: bool = False,
    ) -> Subscription:
        """Follow `topics` from their current end. `watch`: they are a page's, which takes
        its snapshot after this returns: they are registered as watched first, so a worker
        that skips rendering a frame nobody watched has committed before the snapshot reads
        (or learns after its commit that a page came, and renders it then)."""
        sub = Subscription(frozenset(topics), self, queue.Queue(maxsize=self.buffer), notify=notify)
        sub.watched = watch
        if isinstance(self.bus, MemoryBus):
            with self._lock:
                for topic in sub.topics:
                    self._subs[topic].add(sub)
            return sub
        if watch:
            self._register(sub.topics)
        with self._lock:
            new = [t for t in sub.topics if t not in self._positions]
        # The stream ends are looked up outside the lock: the reader takes it for every batch,
        # and a round trip under it (its thread waiting for the GIL among hundreds of socket
        # threads when many chats start at once) held every live frame of the process back
        # for up to a second.
        ends: dict[str, tuple[str | None, int | None]] = {}
        for topic in new:
            try:
                ends[topic] = self.bus.last_position(topic)
            except Exception as exc:  # noqa: BLE001 - Redis away: found out later
                # The reader looks the end up once Redis answers and then has the
                # subscription catch up (it cannot know what it missed meanwhile).
                log.warning("live bus unreachable subscribing to %s: %s", topic, exc)
                ends[topic] = (None, None)
        with self._lock:
            for topic in sub.topics:
                if topic not in self._positions:
                    # Start from the stream's current end: the caller sends a snapshot next.
                    # (A topic another subscriber added meanwhile keeps the reader's place.)
                    self._positions[topic], self._numbers[topic] = ends.get(topic, (None, None))
                self._subs[topic].add(sub)
        self._ensure_reader()
        return sub

    def _register(self, topics: Iterable[str]) -> None:
        now = time.monotonic()
        with self._lock:
            for topic in topics:
                self._watched[topic] = self._watched.get(topic, 0) + 1
            # Registered here a moment ago (renewed by the reader since): no round trip.
            due = [
                t
                for t in topics
                if now - self._registered.get(t, -1e9) > self.WATCH_RENEW_SECONDS / 2
            ]
        if not due:
            return
        try:
            self.bus.watch(due, self.WATCH_SECONDS)
        except Exception as exc:  # noqa: BLE001 - Redis away: nothing is published either
            log.warning("live bus unreachable registering %s: %s", ", ".join(due), exc)
            return
        with self._lock:
            for topic in due:
                self._registered[topic] = now

    def _renew_watches(self) -> None:
        """Renew this process's page topics (from the reader, every WATCH_RENEW_SECONDS).
        One whose registration had lapsed (Redis lost it, or this process stalled past it)
        may have had frames skipped: its pages take a new snapshot."""
        now = time.monotonic()
        if now < self._renew_at:
            return
        self._renew_at = now + self.WATCH_RENEW_SECONDS
        with self._lock:
            topics = list(self._watched)
        if not topics:
            return
        lapsed = self.bus.watch(topics, self.WATCH_SECONDS)
        with self._lock:
            for topic in topics:
                if topic in self._watched:
                    self._registered[topic] = now
        if lapsed:
            log.warning("live watch lapsed on %s: re-snapshot", ", ".join(sorted(lapsed)))
            self._mark_behind(lapsed)

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub.watched:
                sub.watched = False  # counted once, however often it is closed
                for topic in sub.topics:
                    left = self._watched.get(topic, 0) - 1
                    if left > 0:
                        self._watched[topic] = left
                    else:
                        self._watched.pop(topic, None)
                        self._registered.pop(topic, None)
            for topic in sub.topics:
                subs = self._subs.get(topic)
                if subs is not None:
                    subs.discard(sub)
                    if not subs:
                        del self._subs[topic]
                        self._positions.pop(topic, None)
                        self._numbers.pop(topic, None)

    def _mark_behind(self, topics: Iterable[str]) -> None:
        """Frames of these topics may have been missed: their subscribers re-snapshot."""
        with self._lock:
            subs = {sub for topic in topics for sub in self._subs.get(topic, ())}
        for sub in subs:
            sub.overflowed = True
            if sub.notify is not None:
                sub.notify()

    def subscriber_count(self) -> int:
        with self._lock:
            return len({s for subs in self._subs.values() for s in subs})

    def _deliver(self, topic: str, frame_id: str, data: str) -> None:
        with self._lock:
            subs = list(self._subs.get(topic, ()))
        if subs:
            self._fan_out(topic, frame_id, data, subs)

    @staticmethod
    def _fan_out(topic: str, frame_id: str, data: str, subs: list[Subscription]) -> None:
        try:
            frame = Frame.decode(topic, frame_id, data)
        except (ValueError, TypeError):
            log.warning("dropping undecodable live frame on %s", topic)
            return
        for sub in subs:
            sub.put(frame)

    def _ensure_reader(self) -> None:
        with self._lock:
            if self._thread and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._read_loop, name="live-hub", daemon=True)
            self._thread.start()

    def _read_loop(self) -> None:
        backoff = 0.5
        failed = False
        while not self._stop.is_set():
            try:
                self._resolve_positions()
                self._renew_watches()
                with self._lock:
                    positions = {t: p for t, p in self._positions.items() if p is not None}
                if not positions:
                    self._stop.wait(0.05)
                    continue
                # A short block so topics subscribed meanwhile join the next read quickly.
                entries = self.bus.read_numbered(positions, block_ms=200)
                backoff = 0.5
            except Exception as exc:  # noqa: BLE001 - Redis away: keep positions, retry
                log.warning("live bus read failed (%s); retrying in %.1fs", exc, backoff)
                failed = True
                self._renew_at = 0.0  # first thing once Redis answers: it may be empty
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10)
                continue
            if failed:
                # Frames published while Redis was away were lost with their publish, which
                # no number reveals: every page and widget here catches up.
                failed = False
                with self._lock:
                    everything = list(self._subs)
                self._mark_behind(everything)
            self._handle(entries)
            if len(entries) >= self.BUSY_READ and self.read_interval > 0:
                self._stop.wait(self.read_interval)

    def _handle(self, entries: list[tuple[str, str, str, int | None]]) -> None:
        """Deliver frames read from the bus. A frame whose number is not the one after the
        last seen in its topic means frames were missed (trimmed away before this reader got
        to them, or lost with a Redis restarted empty): that topic's subscribers re-snapshot."""
        gaps = set()
        delivered: list[tuple[str, str, str, list[Subscription]]] = []
        with self._lock:  # once a batch: the lock is shared with every subscribe
            for topic, frame_id, data, number in entries:
                if topic not in self._positions:
                    continue  # nobody here follows it any more
                self._positions[topic] = frame_id
                last = self._numbers.get(topic)
                self._numbers[topic] = number
                if number is not None and last is not None and number != last + 1:
                    gaps.add(topic)
                subs = self._subs.get(topic)
                if subs:
                    delivered.append((topic, frame_id, data, list(subs)))
        for topic, frame_id, data, subs in delivered:
            self._fan_out(topic, frame_id, data, subs)
        if gaps:
            log.warning("live frames missing on %s: re-snapshot", ", ".join(sorted(gaps)))
            self._mark_behind(gaps)

    def _resolve_positions(self) -> None:
        """Look up the stream ends of topics subscribed while Redis was away."""
        with self._lock:
            unknown = [t for t, p in self._positions.items() if p is None]
        for topic in unknown:
            position, number = self.bus.last_position(topic)
            with self._lock:
                if topic in self._positions and self._positions[topic] is None:
                    self._positions[topic] = position
                    self._numbers[topic] = number
        if unknown:
            self._mark_behind(unknown)

    def stop(self) -> None:
        self._stop.set()
