"""The live bus: topics of frames that web processes relay to the sockets subscribed to them.

Two transports with one interface:
- `MemoryBus` (embedded mode): per-topic ring buffers in this process.
- `RedisBus` (production): one Redis Stream per topic (XADD with MAXLEN), so any web process
  sees frames published by any worker, and a reader can resume from the last id it saw.

A `Hub` per web process fans frames out to local `Subscription`s; with Redis it runs one
reader thread for all topics subscribed in this process rather than one Redis connection per
browser. Frames are JSON: {"key": ..., "html": ...} (an OOB fragment) or {"key", "json"}.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
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


def _stream_id(frame_id: str) -> tuple[int, int]:
    ms, _, seq = frame_id.partition("-")
    return int(ms), int(seq or 0)


class RedisBus:
    READ_COUNT = 500

    def __init__(self, url: str, prefix: str = "sb:live:", maxlen: int = 1000) -> None:
        import redis

        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=3)
        self.prefix = prefix
        self.maxlen = maxlen

    def _key(self, topic: str) -> str:
        return self.prefix + topic

    def publish(self, topic: str, data: str) -> str:
        frame_id = self.redis.xadd(
            self._key(topic), {"d": data}, maxlen=self.maxlen, approximate=True
        )
        return frame_id.decode() if isinstance(frame_id, bytes) else frame_id

    def publish_many(self, frames: list[tuple[str, str]]) -> None:
        """Several frames in one round trip (a pipeline, in order; not a transaction)."""
        pipe = self.redis.pipeline(transaction=False)
        for topic, data in frames:
            pipe.xadd(self._key(topic), {"d": data}, maxlen=self.maxlen, approximate=True)
        pipe.execute()

    def last_id(self, topic: str) -> str:
        items = self.redis.xrevrange(self._key(topic), count=1)
        if not items:
            return "0-0"
        frame_id = items[0][0]
        return frame_id.decode() if isinstance(frame_id, bytes) else frame_id

    def read(self, positions: dict[str, str], block_ms: int = 0) -> list[tuple[str, str, str]]:
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
                out.append((topic, frame_id, raw.decode() if isinstance(raw, bytes) else raw))
        return out

    def first_id(self, topic: str) -> str | None:
        items = self.redis.xrange(self._key(topic), count=1)
        if not items:
            return None
        frame_id = items[0][0]
        return frame_id.decode() if isinstance(frame_id, bytes) else frame_id

    def ping(self) -> bool:
        return bool(self.redis.ping())


@dataclass(eq=False)
class Subscription:
    topics: frozenset[str]
    hub: Hub
    frames: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=2000))
    # Set when frames were dropped because this client fell behind: send a new snapshot.
    overflowed: bool = False
    # Called after each frame is put (or dropped): wakes a reader that serves many queues.
    notify: Callable[[], None] | None = None

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

    def __init__(self, bus: MemoryBus | RedisBus, buffer: int = 2000) -> None:
        self.bus = bus
        self.buffer = buffer  # frames a subscription holds before it counts as overflowed
        self._lock = threading.Lock()
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        self._positions: dict[str, str] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        if isinstance(bus, MemoryBus):
            bus.add_listener(self._deliver)

    def subscribe(self, topics: Iterable[str]) -> Subscription:
        sub = Subscription(frozenset(topics), self, queue.Queue(maxsize=self.buffer))
        with self._lock:
            for topic in sub.topics:
                if topic not in self._positions and not isinstance(self.bus, MemoryBus):
                    # Start from the stream's current end: the caller sends a snapshot next.
                    self._positions[topic] = self.bus.last_id(topic)
                self._subs[topic].add(sub)
        if not isinstance(self.bus, MemoryBus):
            self._ensure_reader()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            for topic in sub.topics:
                subs = self._subs.get(topic)
                if subs is not None:
                    subs.discard(sub)
                    if not subs:
                        del self._subs[topic]
                        self._positions.pop(topic, None)

    def subscriber_count(self) -> int:
        with self._lock:
            return len({s for subs in self._subs.values() for s in subs})

    def _deliver(self, topic: str, frame_id: str, data: str) -> None:
        with self._lock:
            subs = list(self._subs.get(topic, ()))
        if not subs:
            return
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
        while not self._stop.is_set():
            with self._lock:
                positions = dict(self._positions)
            if not positions:
                self._stop.wait(0.05)
                continue
            try:
                # A short block so topics subscribed meanwhile join the next read quickly.
                entries = self.bus.read(positions, block_ms=200)
                backoff = 0.5
            except Exception as exc:  # noqa: BLE001 - Redis away: keep positions, retry
                log.warning("live bus read failed (%s); retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10)
                continue
            self._detect_gaps(positions, entries)
            for topic, frame_id, data in entries:
                with self._lock:
                    if topic in self._positions:
                        self._positions[topic] = frame_id
                self._deliver(topic, frame_id, data)

    def _detect_gaps(self, positions: dict[str, str], entries) -> None:
        """Mark subscriptions overflowed when the stream was trimmed past our position.

        XREAD quietly starts at the oldest surviving entry, so a hub that fell further behind
        than LIVE_STREAM_MAXLEN would skip frames without anyone knowing; the pages would stay
        stale until they reconnect. A trimmed gap always comes with a full batch (the stream
        holds at least maxlen entries after our position), so only then is it checked."""
        counts: dict[str, int] = defaultdict(int)
        for topic, _, _ in entries:
            counts[topic] += 1
        for topic, count in counts.items():
            if count < getattr(self.bus, "READ_COUNT", count + 1):
                continue
            first = self.bus.first_id(topic)
            position = positions.get(topic, "0-0")
            if first is not None and _stream_id(first) > _stream_id(position):
                log.warning("live hub fell behind on %s; frames were trimmed: resnapshot", topic)
                with self._lock:
                    subs = list(self._subs.get(topic, ()))
                for sub in subs:
                    sub.overflowed = True

    def stop(self) -> None:
        self._stop.set()
