"""One sender per web process for the pages' live sockets (/ws/live).

A thread per page socket used to take its frames from its own queue, join them and send them
through simple-websocket, which compressed them for that client alone. With a thousand
dashboards open on one process, each of 200 frames a second went into a thousand queues, a
thousand threads woke to compress the same HTML a thousand times, and the process spent its
time handing the GIL around (bench/bench_fanout.py: p99 17 s at 1,000 sockets).

The `Broadcaster` takes each topic's frames once per tick, builds each distinct message once
(the HTML of the topics a group of sockets shares, coalesced by key), encodes the WebSocket
frame once and writes the same bytes to every socket without blocking. Compression: when a
client negotiated permessage-deflate, the message is deflated with a fresh context, which
every such client can read whether or not it agreed to "no context takeover"; so one
compression serves them all. All data messages of such a socket go through here (snapshots
too), so simple-websocket's own compressor never runs for it and no client holds a window
that disagrees with ours. Control frames (ping, pong, close) stay with simple-websocket.

A socket that cannot take its bytes keeps them queued and gets them when it drains; one that
falls more than LIVE_SUBSCRIPTION_BUFFER frames behind stops receiving frames, and its own
thread sends it a fresh snapshot. A socket's thread otherwise sleeps until the client says
something or goes.

Ticks: a frame after a quiet spell goes out at once; frames that come within LIVE_COALESCE_MS
of a send wait for the window to end and go out together, coalesced: of frames that replace
the same thing only the newest; appends (keys made by `append_key`) always.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from events.live import Frame, Hub, Subscription
from events.nowait import send_nowait

log = logging.getLogger(__name__)

_TEXT_FIN = 0x81
_RSV1 = 0x40


@dataclass(frozen=True)
class Wire:
    """How one socket takes data messages: plain, or deflated with a window of `wbits`."""

    deflate: bool = False
    wbits: int = 15


def wire_of(ws: Any) -> Wire | None:
    """The socket's negotiated framing, or None when this module cannot write to it directly
    (a TLS socket, an extension it does not know, a simple-websocket it does not recognise)."""
    sock = getattr(ws, "sock", None)
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
        return None
    connection = getattr(getattr(ws, "ws", None), "connection", None)
    extensions = getattr(getattr(connection, "_proto", None), "extensions", None)
    if extensions is None:
        return None
    wire = Wire()
    for extension in extensions:
        if not extension.enabled():
            continue
        if extension.name != "permessage-deflate":
            return None
        bits = int(getattr(extension, "server_max_window_bits", 15) or 15)
        # zlib's raw deflate has no 8-bit window; such a client gets plain messages (RSV1
        # clear), which permessage-deflate allows message by message.
        wire = Wire(deflate=bits >= 9, wbits=bits)
    return wire


def encode_text(text: str, wire: Wire) -> bytes:
    """One unmasked, final text frame (a server's) carrying `text`."""
    payload = text.encode()
    first = _TEXT_FIN
    if wire.deflate:
        compressor = zlib.compressobj(6, zlib.DEFLATED, -wire.wbits)
        payload = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        payload = payload[:-4]  # the 00 00 ff ff tail, as RFC 7692 says
        first |= _RSV1
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", first, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, 126, size)
    else:
        header = struct.pack("!BBQ", first, 127, size)
    return header + payload


APPEND_PREFIX = "append:"


def append_key(name: str) -> str:
    """The key of a frame that adds something to a page (a new message, a new row): such a
    frame is never merged away, whatever frames come after it."""
    return APPEND_PREFIX + name


def coalesce(frames: Iterable[Frame]) -> list[Frame]:
    """A tick's frames as they go out, in arrival order: of frames that replace the same thing
    (one key) only the newest, at its own place; every append, once. A replace of something
    whose append comes later in the tick goes after that append: on the page it would
    otherwise find nothing to replace.

    Merging by key alone once let a message's sentiment update (a replace) swallow the
    message itself (an append with the same key): the page never showed it."""
    out: list[Frame | None] = []
    replaces: dict[str, int] = {}
    appends: set[str] = set()
    for frame in frames:
        if frame.key.startswith(APPEND_PREFIX):
            if frame.key not in appends:  # the same append delivered twice is one
                appends.add(frame.key)
                out.append(frame)
                early = replaces.pop(frame.key[len(APPEND_PREFIX) :], None)
                if early is not None:
                    replaces[out[early].key] = len(out)
                    out.append(out[early])
                    out[early] = None
            continue
        earlier = replaces.get(frame.key)
        if earlier is not None:
            out[earlier] = None
        replaces[frame.key] = len(out)
        out.append(frame)
    return [frame for frame in out if frame is not None]


def take_queued(sub: Subscription) -> list[Frame]:
    """Every frame queued on `sub` now, oldest first."""
    frames = []
    while True:
        try:
            frames.append(sub.frames.get_nowait())
        except queue.Empty:
            return frames


class Peer:
    """One page socket the broadcaster writes to. Its own thread waits on `ws.event`."""

    def __init__(self, ws: Any, topics: Iterable[str], wire: Wire, limit: int) -> None:
        self.ws = ws
        self.sock: socket.socket = ws.sock
        self.topics = frozenset(topics)
        self.wire = wire
        self.limit = limit  # frames queued before the peer counts as behind
        self.lock = threading.Lock()
        self._queue: deque[tuple[memoryview, int]] = deque()  # (bytes left, frames in it)
        self._queued_frames = 0
        self._head_started = False  # the first queued message is partly written
        self.live = False  # its snapshot is queued: messages may be written
        self.behind = False  # frames were dropped: it needs a fresh snapshot
        self.dead = False

    def wake(self) -> None:
        self.ws.event.set()

    def control(self, data: bytes) -> int:
        """simple-websocket's own writes (pings every LIVE_PING_SECONDS, pongs, the close):
        between messages, never inside one that is partly written, and never blocking."""
        with self.lock:
            if self._head_started:
                self._queue.insert(1, (memoryview(data), 0))
                return len(data)
            try:
                sent = send_nowait(self.sock, data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent < len(data):
                self._queue.appendleft((memoryview(data)[sent:], 0))
                self._head_started = sent > 0
            return len(data)

    # All below: called with self.lock held.
    def _enqueue(self, data: bytes, frames: int, first: bool = False) -> None:
        item = (memoryview(data), frames)
        if first:
            # Before everything queued, except a message already partly on the wire.
            head = self._queue.popleft() if self._head_started and self._queue else None
            self._queue.appendleft(item)
            if head is not None:
                self._queue.appendleft(head)
        else:
            self._queue.append(item)
        self._queued_frames += frames

    def offer(self, data: bytes, frames: int) -> bool:
        """Queue a message and write what the socket takes; False if it is still backlogged."""
        if self.dead or self.behind:
            return True
        if not self._queue and self.live:
            # The usual case: nothing waiting, the kernel takes it all; no queueing.
            try:
                sent = send_nowait(self.sock, data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.dead = True
                self.wake()
                return True
            if sent == len(data):
                return True
            self._queue.append((memoryview(data)[sent:], frames))
            self._queued_frames += frames
            self._head_started = sent > 0
            return False
        if self._queued_frames + frames > self.limit:
            self.behind = True
            self.wake()
            return True
        self._enqueue(data, frames)
        return self.flush()

    def flush(self) -> bool:
        """Write queued bytes without blocking; True when nothing is left to write."""
        if not self.live or self.dead:
            return True
        while self._queue:
            view, frames = self._queue[0]
            try:
                sent = send_nowait(self.sock, view)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                self.dead = True
                self._queue.clear()
                self._queued_frames = 0
                self.wake()
                return True
            if sent < len(view):
                self._queue[0] = (view[sent:], frames)
                self._head_started = True
                return False
            self._queue.popleft()
            self._queued_frames -= frames
            self._head_started = False
        return True

    def await_snapshot(self) -> None:
        """Drop what is queued (but a partly written message) and hold new messages back
        until `start` puts the next snapshot in front of them."""
        with self.lock:
            head = self._queue[0] if self._head_started and self._queue else None
            self._queue.clear()
            self._queued_frames = 0
            if head is not None:
                self._queue.append(head)
                self._queued_frames = head[1]
            self.behind = False
            self.live = False

    def start(self, snapshot: str) -> bool:
        """Send `snapshot` first, then the messages held back meanwhile."""
        data = encode_text(snapshot, self.wire)
        with self.lock:
            self._enqueue(data, 0, first=True)
            self.live = True
            return self.flush()


class _GuardedSocket:
    """Stands in for `ws.sock` once the broadcaster writes to the socket: simple-websocket's
    reader thread (pings, pongs) and `ws.close()` then write through the peer's lock."""

    def __init__(self, peer: Peer) -> None:
        self._peer = peer
        self._sock = peer.sock

    def send(self, data: bytes) -> int:
        return self._peer.control(data)

    def sendall(self, data: bytes) -> None:
        self._peer.control(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _wait_for_work(signal: threading.Event, lock: threading.Lock, backlogged: set) -> bool:
    """A sender thread's sleep: until signalled, or 20 ms while some socket is backlogged
    (its bytes are retried then). Whether one was backlogged when it began."""
    with lock:
        pending = bool(backlogged)
    signal.wait(0.02 if pending else 1.0)
    signal.clear()
    return pending


class Broadcaster:
    """Writes the live topics' frames to this process's page sockets (see the module doc)."""

    def __init__(self, hub: Hub, config: Mapping[str, Any]) -> None:
        self.hub = hub
        self.config = config
        self._lock = threading.Lock()
        self._peers: set[Peer] = set()
        self._topics: dict[str, tuple[Subscription, set[Peer]]] = {}
        self._backlogged: set[Peer] = set()
        self._signal = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_send = 0.0

    # -- the sockets' threads -------------------------------------------------------------
    def attach(self, ws: Any, topics: Iterable[str], wire: Wire) -> Peer:
        peer = Peer(ws, topics, wire, limit=int(self.config["LIVE_SUBSCRIPTION_BUFFER"]))
        ws.sock = _GuardedSocket(peer)
        with self._lock:
            for topic in peer.topics:
                entry = self._topics.get(topic)
                if entry is None:
                    sub = self.hub.subscribe([topic], watch=True)
                    sub.notify = self._signal.set
                    entry = self._topics[topic] = (sub, set())
                entry[1].add(peer)
            self._peers.add(peer)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="live-broadcaster", daemon=True
                )
                self._thread.start()
        return peer

    def detach(self, peer: Peer) -> None:
        with peer.lock:
            peer.dead = True
        with self._lock:
            self._peers.discard(peer)
            self._backlogged.discard(peer)
            for topic in peer.topics:
                entry = self._topics.get(topic)
                if entry is None:
                    continue
                entry[1].discard(peer)
                if not entry[1]:
                    entry[0].close()
                    del self._topics[topic]

    def peer_count(self) -> int:
        with self._lock:
            return len(self._peers)

    def start(self, peer: Peer, snapshot: str) -> None:
        """Send the peer its snapshot, then the frames held back meanwhile; what the socket
        does not take at once is written by the broadcaster's thread as it drains."""
        if not peer.start(snapshot):
            with self._lock:
                if peer in self._peers:
                    self._backlogged.add(peer)
            self._signal.set()

    # -- the broadcaster's thread ---------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            backlogged = _wait_for_work(self._signal, self._lock, self._backlogged)
            try:
                if backlogged:
                    self._flush_backlogged()
                if not self._pending():
                    continue
                window = int(self.config["LIVE_COALESCE_MS"]) / 1000
                wait = self._last_send + window - time.monotonic()
                if wait > 0:
                    self._stop.wait(wait)
                self._last_send = time.monotonic()
                self._send(self._take())
            except Exception:  # noqa: BLE001 - one bad tick must not end every page's updates
                log.exception("live broadcaster tick failed")
                self._stop.wait(0.5)

    def _pending(self) -> bool:
        with self._lock:
            return any(not sub.frames.empty() or sub.overflowed for sub, _ in self._topics.values())

    def _take(self) -> dict[str, list[Frame]]:
        """Each topic's frames since the last tick, coalesced (see `coalesce`)."""
        with self._lock:
            entries = [(topic, sub, set(peers)) for topic, (sub, peers) in self._topics.items()]
        batch: dict[str, list[Frame]] = {}
        for topic, sub, peers in entries:
            frames = coalesce(take_queued(sub))
            if sub.overflowed:
                # This process's hub dropped frames of the topic: every page on it re-snapshots.
                sub.overflowed = False
                for peer in peers:
                    with peer.lock:
                        peer.behind = True
                    peer.wake()
            if frames:
                batch[topic] = frames
        return batch

    def _send(self, batch: dict[str, list[Frame]]) -> None:
        if not batch:
            return
        with self._lock:
            peers = list(self._peers)
        topics = sorted(batch)
        messages: dict[tuple[Wire, tuple[str, ...]], tuple[bytes, int] | None] = {}
        backlogged = []
        for peer in peers:
            mine = tuple(t for t in topics if t in peer.topics)
            if not mine:
                continue
            key = (peer.wire, mine)
            if key not in messages:
                # Pages swap HTML; JSON-only frames (for the chat widget) are not for them.
                parts = [f.html for t in mine for f in batch[t] if f.html]
                text = "".join(parts)
                messages[key] = (encode_text(text, peer.wire), len(parts)) if parts else None
            message = messages[key]
            if message is None:
                continue
            with peer.lock:
                done = peer.offer(*message)
            if not done:
                backlogged.append(peer)
        if backlogged:
            with self._lock:
                self._backlogged.update(p for p in backlogged if p in self._peers)

    def _flush_backlogged(self) -> None:
        with self._lock:
            peers = list(self._backlogged)
        done = []
        for peer in peers:
            with peer.lock:
                if peer.flush():
                    done.append(peer)
        with self._lock:
            self._backlogged.difference_update(done)

    def stop(self) -> None:
        self._stop.set()
        self._signal.set()


class QueuedWriter:
    """Stands in for a chat socket's `ws.sock` (see `SocketPump`): every write, data or
    control, goes out in order without blocking; what the kernel does not take now waits in
    a queue that the pump's thread writes as the socket drains. A client that leaves more
    than `limit` bytes unread, or whose socket fails, is cut off: its socket is shut down, so
    simple-websocket's reader sees the end and the socket's own thread finishes."""

    def __init__(self, sock: socket.socket, limit: int, on_backlog: Any) -> None:
        self._sock = sock
        self.limit = limit
        self._on_backlog = on_backlog
        self.lock = threading.Lock()
        self._queue: deque[memoryview] = deque()
        self._queued = 0
        self.dead = False

    def send(self, data: bytes) -> int:
        backlog = False
        with self.lock:
            if self.dead:
                return len(data)  # the reader is ending the socket; nothing more goes out
            view = memoryview(data)
            if not self._queue:
                try:
                    sent = send_nowait(self._sock, view)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self._cut_off()
                    return len(data)
                if sent == len(view):
                    return len(data)
                view = view[sent:]
                backlog = True
            if self._queued + len(view) > self.limit:
                log.warning("chat socket cut off: %d bytes unread", self._queued + len(view))
                self._cut_off()
                return len(data)
            self._queue.append(view)
            self._queued += len(view)
        if backlog:
            self._on_backlog(self)
        return len(data)

    sendall = send

    def flush(self) -> bool:
        """Write what is queued without blocking; True when nothing is left."""
        with self.lock:
            while self._queue and not self.dead:
                view = self._queue[0]
                try:
                    sent = send_nowait(self._sock, view)
                except (BlockingIOError, InterruptedError):
                    return False
                except OSError:
                    self._cut_off()
                    break
                self._queued -= sent
                if sent < len(view):
                    self._queue[0] = view[sent:]
                    return False
                self._queue.popleft()
            return True

    def _cut_off(self) -> None:  # with self.lock held
        self.dead = True
        self._queue.clear()
        self._queued = 0
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class SocketPump:
    """One thread per web process that moves frames from the chat sockets' subscriptions to
    their sockets (/ws/chat, blueprints/live/chat.py).

    A thread per socket used to wait on its own queue: with two hundred replies streaming,
    every frame the hub delivered woke one of two hundred threads, and the hub's own thread
    queued for the GIL behind them: frames reached visitors up to a second late while the
    process used half a core. Here the hub marks a client ready (`ready`, the subscription's
    `notify`) and this thread calls its `deliver()`, which sends through a `QueuedWriter`
    and so never blocks on a slow client."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: dict[Any, None] = {}  # clients with frames, in the order they became so
        self._backlogged: set[QueuedWriter] = set()
        self._signal = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ready(self, client: Any) -> None:
        with self._lock:
            self._ready[client] = None
            self._start()
        self._signal.set()

    def backlogged(self, writer: QueuedWriter) -> None:
        with self._lock:
            self._backlogged.add(writer)
            self._start()
        self._signal.set()

    def _start(self) -> None:  # with self._lock held
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="chat-pump", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            _wait_for_work(self._signal, self._lock, self._backlogged)
            with self._lock:
                ready = list(self._ready)
                self._ready.clear()
                writers = list(self._backlogged)
            for client in ready:
                try:
                    client.deliver()
                except Exception:  # noqa: BLE001 - one socket's failure is not every socket's
                    log.exception("chat socket delivery failed")
            if writers:
                done = [w for w in writers if w.flush()]
                with self._lock:
                    self._backlogged.difference_update(done)
                    # A write queued between its flush and now is not left behind.
                    self._backlogged.update(w for w in done if w._queue)

    def stop(self) -> None:
        self._stop.set()
        self._signal.set()
