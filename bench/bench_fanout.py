"""Live fan-out: many dashboard sockets on one web process (issue 7).

Production mode: one throwaway PostgreSQL database and Redis namespace, and **one** gunicorn
web process (gthread, as the Procfile) with a thread per client and some to spare
(`--threads` = clients + 100, and `--worker-connections` above that: gunicorn's default of
1,000 would stop accepting at 1,000 connections). Threads rather than gevent because that is
how the app is built and deployed: flask-sock / simple-websocket park a thread per socket
(plus a reader thread of their own), and psycopg, SQLAlchemy and redis-py block; under gevent
they would all need monkey-patching, and a libpq call would still stall every socket of the
process. Those threads sleep: the process's one broadcaster (events/fanout.py) writes every
frame, building and compressing each distinct message once per LIVE_COALESCE_MS window and
writing the same bytes to every socket without blocking.

One tenant (5 users, 24 devices in three locations, so the snapshot is a real grid) has its
devices dashboard open in N browser tabs: each user logs in once and opens /devices/ for the
page's signed /ws/live URL; the clients connect to it with that user's session cookie and the
console's Origin, offering permessage-deflate as browsers do (--no-fanout-deflate: not).
The clients speak the WebSocket protocol in a few lines of their own (framing, inflating with
one context per connection as browsers do; wsproto's per-event work made the one bench process
the bottleneck at 1,000 sockets) over non-blocking sockets watched by its asyncio loop; each
read carries the kernel's receive timestamp (SO_TIMESTAMPNS), so a busy client loop cannot
inflate the latencies (how late the loop handled reads is reported, as is the bench process's CPU).

Frames are published straight onto the live bus (the app's RedisBus, what
`services.live.publish` calls) on the tenant's "devices" topic by a thread paced at 200
frames/s for 10 s (--quick 3 s). Each frame is a real rendered device card (`device_card`
of `devices/_card.html`, ~900 bytes) with its own key and element id, so coalescing never
merges two, and a `data-fo="run:seq:stamp"` attribute (stamp: CLOCK_REALTIME ns just before
the XADD). Latency is publish → kernel receipt, for every frame at every client.

On one web process (production's LIVE_COALESCE_MS, 100; --fanout-coalesce-ms for another),
in turn: 1 client (the baseline), then 50 and 200 (--fanout-ramp; --quick 50), then N
(1,000; --quick 200), each set of clients connected, measured and dropped before the next:

- connect: the time to open all of them (≤ --fanout-connect-concurrency handshakes in
  flight), and per socket from TCP connect to its snapshot.
- memory: the worker's RSS with the sockets open and idle (per socket over the fresh
  process), and its peak while frames flow; threads and file descriptors held, and again
  5 s after the clients dropped their connections (a dead client must free its thread).
- latency p50 / p99 / max over all (frame, client) pairs, against the 1-client figures;
  target p99 < 100 ms at 200 frames/s.
- delivery: frames delivered per second in total (vs clients × 200/s) from the first publish
  to the last receipt, and per-client counts (min / median / max). Target: no client starved,
  every client gets every frame; otherwise the shortfall, how many distinct frames reached
  anyone, and re-sent snapshots (a subscription that overflowed). The wait for stragglers
  ends 2 s after the last progress or 10 s after publishing ended.
- CPU of the web worker (and how much of it in the kernel) and of the bench process
  (clients + publisher) over that window, in cores.

The peer, side by side in the same run (--no-fanout-peer: not): the usual Django Channels way
to push HTML to dashboards (bench/peer_channels/: Django, Channels, daphne and channels_redis,
pinned, in a throwaway virtualenv of its own built on first use). One daphne process, like our
one web process; the RedisPubSubChannelLayer on the same Redis (a prefix of the run's
namespace); one AsyncWebsocketConsumer that joins the "devices" group and sends each fragment
it is given. The same clients (daphne declines permessage-deflate, so its frames arrive
uncompressed), the same cards with the same `data-fo` stamps, published at the same rate by
publish.py in the peer's virtualenv with the layer's own group_send (the stamp taken just
before it), measured the same way at the last two client counts (200 and 1,000; --quick 50 and
200). Rows for each side: frames delivered/s, p50 / p99, clients starved, CPU of the server
process; then Switchboard ÷ the peer. The figure `fanout_vs_channels_ratio` (FIGURES, filled
by run()) is Switchboard's delivered frames/s ÷ the peer's at the largest count; target ≥ 20×
with Switchboard's p99 ≤ 100 ms there.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import hashlib
import os
import re
import socket
import statistics
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from bench.common import (
    PASSWORD,
    BenchError,
    LiveClient,
    ProdEnv,
    child_pids,
    note,
    percentile,
    proc_cpu_times,
    proc_open_files,
    proc_rss_mb,
    proc_status,
    prod_app,
    raise_open_files_limit,
    result,
    sized,
    summarize,
    web_server,
)

NAME = "fanout"
DESCRIPTION = "N dashboard sockets on one gthread web process: bus → socket fan-out latency"

DEFAULTS = {
    # name: (full run, --quick)
    "clients": (1000, 200),
    "seconds": (10.0, 3.0),
}
P99_TARGET_MS = 100.0
DEFLATE_TAIL = b"\x00\x00\xff\xff"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MARK = re.compile(r'data-fo="(\d+):(\d+):(\d+)"')
SNAPSHOT_MARK = 'id="device-grid"'
WARM_FRAMES = 3
# Linux's SO_TIMESTAMPNS (= SCM_TIMESTAMPNS; 35 on x86 and arm): the socket module lacks it.
SO_TIMESTAMPNS = 35
ANCILLARY_BYTES = socket.CMSG_SPACE(16)  # one struct timespec
READ_BYTES = 16 * 1024
# Client counts measured between the 1-client baseline and --fanout-clients: (full, --quick).
DEFAULT_RAMP = ("50,200", "50")
PEER_STEPS = 2  # the peer is measured at the last this many client counts
PEER_RATIO_TARGET = 20.0
# Summary figures of the last run(), by name, for bench/run.py to print.
FIGURES: dict[str, float] = {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fanout")
    group.add_argument(
        "--fanout-clients", type=int, help="WebSocket clients (default 1000; --quick 200)"
    )
    group.add_argument(
        "--fanout-seconds", type=float, help="seconds of publishing (default 10; --quick 3)"
    )
    group.add_argument(
        "--fanout-rate", type=float, default=200.0, help="frames/s published (default 200)"
    )
    group.add_argument(
        "--fanout-users", type=int, default=5, help="users of the tenant the clients share (5)"
    )
    group.add_argument(
        "--fanout-ramp",
        help="client counts measured between the 1-client baseline and --fanout-clients, "
        "comma separated (default 50,200; --quick 50; '' for none)",
    )
    group.add_argument(
        "--fanout-coalesce-ms",
        type=int,
        help="LIVE_COALESCE_MS of the web process (default: production's)",
    )
    group.add_argument(
        "--fanout-deflate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clients offer permessage-deflate, as browsers do (default: yes)",
    )
    group.add_argument(
        "--fanout-connect-concurrency",
        type=int,
        default=100,
        help="WebSocket handshakes in flight at once while connecting (default 100)",
    )
    group.add_argument(
        "--fanout-peer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the Django Channels peer side by side (bench/peer_channels/, its own "
        "virtualenv, built on first use; default: yes)",
    )


def _size(args: argparse.Namespace, name: str):
    return sized(args, name, DEFAULTS, NAME)


# ---------------------------------------------------------------- the tenant


@dataclass
class _Tenant:
    tenant_id: int
    emails: list[str]
    card_head: str  # a rendered device card, split where the bench's id and mark go
    card_tail: str

    def frame_html(self, run: int, seq: int, stamp: int) -> str:
        mark = f'id="device-card-fo{seq}" data-fo="{run}:{seq}:{stamp}"'
        return self.card_head + mark + self.card_tail


def _seed_tenant(penv: ProdEnv, users: int, devices: int = 24) -> _Tenant:
    """A tenant with `users` users and `devices` devices in three locations."""
    from extensions import db
    from models.accounts import Tenant
    from models.devices import Device, Location, Manufacturer
    from services.accounts import create_user
    from services.live import fragments, render_macro

    tag = uuid.uuid4().hex[:6]
    with penv.app.app_context():
        try:
            tenant = Tenant(name=f"Fanout {tag}")
            db.session.add(tenant)
            db.session.flush()
            emails = []
            for i in range(users):
                email = f"fanout-{tag}-{i}@example.com"
                create_user(email, PASSWORD, tenant, role="admin" if i == 0 else "agent")
                emails.append(email)
            maker = Manufacturer(code=f"fo{tag}", name="Fanout Audio")
            db.session.add(maker)
            db.session.flush()
            locations = [Location(tenant_id=tenant.id, name=f"Stage {n}") for n in "ABC"]
            db.session.add_all(locations)
            db.session.flush()
            for n in range(devices):
                db.session.add(
                    Device(
                        tenant_id=tenant.id,
                        manufacturer_id=maker.id,
                        api_device_id=f"rx-{n}",
                        name=f"Receiver {n:02d}",
                        model="ULXD4",
                        location_id=locations[n % 3].id,
                        is_online=n % 5 != 0,
                        state={
                            "channel_name": f"Mic {n}",
                            "battery_bars": n % 6,
                            "battery_minutes": 60 + 7 * n,
                            "rf_level": 40 + n,
                            "audio_level": 20 + n,
                        },
                    )
                )
            db.session.commit()
            device = db.session.scalars(
                db.select(Device).where(Device.tenant_id == tenant.id).order_by(Device.id)
            ).first()
            with fragments():
                card = render_macro("devices/_card.html", "device_card", d=device, oob=True)
            head, tail = card.split(f'id="device-card-{device.id}"', 1)
            return _Tenant(tenant.id, emails, head, tail)
        finally:
            db.session.remove()


# ---------------------------------------------------------------- the clients


class _Run:
    """What every client counts into: the frames of the run being measured."""

    def __init__(self) -> None:
        self.run = 0
        self.size = 0
        self.latencies = array.array("d")  # ms, one per (frame, client)
        self.any = bytearray()  # frames that reached at least one client
        self.last_ns = 0
        # ms from the kernel's receipt of a read's last segment to the client handling it:
        # what user-space timestamps would have added to the latencies.
        self.client_delay = array.array("d")

    def start(self, run: int, size: int, sockets: list[_Socket]) -> None:
        self.run, self.size = run, size
        self.latencies = array.array("d")
        self.any = bytearray(size)
        self.last_ns = 0
        self.client_delay = array.array("d")
        for sock in sockets:
            sock.seen = bytearray(size)
            sock.frames = sock.duplicates = sock.messages = sock.snapshots = 0


_Parsed = tuple[bool, list[tuple[int, int, int]]]  # (is a snapshot, (run, seq, stamp) marks)
# Distinct compressed payloads already inflated and parsed (see _Socket): a thousand clients
# receive the same bytes, and inflating each copy cost the bench more than the server spent.
# Uncompressed payloads (a server that declines permessage-deflate) likewise.
_PARSED: dict[bytes, _Parsed] = {}
_PARSED_PLAIN: dict[bytes, _Parsed] = {}


def _remember(cache: dict[bytes, _Parsed], body: bytes, parsed: _Parsed) -> _Parsed:
    if len(cache) > 5000:
        cache.clear()
    cache[body] = parsed
    return parsed


def _parse(text: str) -> _Parsed:
    marks = [(int(r), int(n), int(t)) for r, n, t in MARK.findall(text)]
    return SNAPSHOT_MARK in text, marks


def frame_header(buffer: bytearray) -> tuple[int, int, int, int] | None:
    """The first two bytes, payload size and payload offset of the WebSocket frame at the
    start of `buffer`, once all of it has arrived; None until then."""
    if len(buffer) < 2:
        return None
    first, second = buffer[0], buffer[1]
    size, offset = second & 0x7F, 2
    if size == 126:
        if len(buffer) < 4:
            return None
        size, offset = int.from_bytes(buffer[2:4], "big"), 4
    elif size == 127:
        if len(buffer) < 10:
            return None
        size, offset = int.from_bytes(buffer[2:10], "big"), 10
    return (first, second, size, offset) if len(buffer) >= offset + size else None


class _Socket:
    """One browser tab's /ws/live socket over a non-blocking socket that the event loop's
    selector watches. The protocol is spoken here in a few lines (RFC 6455 framing, RFC 7692
    inflating with one context per connection, as a browser keeps it) rather than through
    wsproto, whose per-event Python work made a single bench process the bottleneck at 1,000
    sockets. Reads carry the kernel's receive timestamp (SO_TIMESTAMPNS), so a busy client
    loop delays the bookkeeping, not the measured receipt time."""

    def __init__(self, run: _Run, host: str, target: str, headers: list, deflate: bool) -> None:
        self.tally = run
        self.key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self.key}",
            "Sec-WebSocket-Version: 13",
        ]
        if deflate:
            # As Chromium offers it, plus server_no_context_takeover: then every message
            # inflates on its own, identical bytes are identical text, and a payload a
            # thousand clients receive is inflated and parsed once (_PARSED). The server
            # compresses each message with a fresh context whatever is negotiated.
            lines.append(
                "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits; "
                "server_no_context_takeover"
            )
        lines += [f"{name.decode()}: {value.decode()}" for name, value in headers]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self.ready: asyncio.Future = self.loop.create_future()
        self.buffer = bytearray()
        self.upgraded = False
        self.inflater = None  # zlib decompressobj once permessage-deflate is agreed
        self.fresh_contexts = False  # server_no_context_takeover agreed
        self.fragments: list[bytes] = []
        self.compressed = False
        self.seen = bytearray()
        self.frames = self.duplicates = self.messages = self.snapshots = 0
        self.lost: str | None = None
        self.closing = False

    async def open(self, host: str, port: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock = sock
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await self.loop.sock_connect(sock, (host, port))
        self.loop.add_reader(sock.fileno(), self._readable)
        self._write(self.request)

    def _write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)  # the handshake, pongs: small, the buffer takes them
        except OSError as exc:
            self._fail(f"send failed: {exc!r}")
            self.abort()

    def _readable(self) -> None:
        sock = self.sock
        while sock is not None and not self.closing:
            try:
                data, ancillary, _flags, _addr = sock.recvmsg(READ_BYTES, ANCILLARY_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(f"connection lost: {exc!r}")
                self.abort()
                return
            if not data:
                self._fail("connection closed by the server")
                self.abort()
                return
            handled = time.time_ns()
            received = handled
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                    sec, nsec = struct.unpack_from("qq", value)
                    received = sec * 1_000_000_000 + nsec
            self.tally.client_delay.append((handled - received) / 1e6)
            self._feed(data, received)
            sock = self.sock

    def _upgrade(self) -> bool:
        """Read the handshake's answer; False while it is incomplete."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        del buffer[: end + 4]
        status = head[0].split(" ", 2)
        if len(status) < 2 or status[1] != "101":
            self._fail(f"handshake refused: {head[0]}")
            self.abort()
            return False
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        digest = hashlib.sha1((self.key + WS_GUID).encode()).digest()
        if fields.get("sec-websocket-accept") != base64.b64encode(digest).decode():
            self._fail("handshake: wrong Sec-WebSocket-Accept")
            self.abort()
            return False
        extensions = fields.get("sec-websocket-extensions", "")
        if "permessage-deflate" in extensions:
            self.inflater = zlib.decompressobj(-15)
            self.fresh_contexts = "server_no_context_takeover" in extensions
        self.upgraded = True
        return True

    def _feed(self, data: bytes, received: int) -> None:
        buffer = self.buffer
        buffer += data
        if not self.upgraded and not self._upgrade():
            return
        while (header := frame_header(buffer)) is not None:
            first, second, size, offset = header
            if second & 0x80:
                self._fail("protocol error: a masked frame from the server")
                self.abort()
                return
            payload = bytes(buffer[offset : offset + size])
            del buffer[: offset + size]
            opcode = first & 0x0F
            if opcode in (0x1, 0x0):  # text, continuation
                if opcode == 0x1:
                    self.fragments, self.compressed = [], bool(first & 0x40)
                self.fragments.append(payload)
                if first & 0x80:
                    body = b"".join(self.fragments)
                    self.fragments = []
                    if not self.compressed:
                        parsed = _PARSED_PLAIN.get(body)
                        if parsed is None:
                            parsed = _remember(_PARSED_PLAIN, body, _parse(body.decode()))
                        self._count(parsed, received)
                    elif self.inflater is None:
                        self._fail("protocol error: compressed without permessage-deflate")
                        self.abort()
                        return
                    elif self.fresh_contexts:
                        parsed = _PARSED.get(body)
                        if parsed is None:
                            text = zlib.decompressobj(-15).decompress(body + DEFLATE_TAIL)
                            parsed = _remember(_PARSED, body, _parse(text.decode()))
                        self._count(parsed, received)
                    else:
                        text = self.inflater.decompress(body + DEFLATE_TAIL)
                        self._message(text.decode(), received)
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                self._fail(f"closed by the server: {code} {payload[2:].decode(errors='replace')}")
                self.abort()
                return
            elif opcode == 0x9:  # ping: answer with a masked pong
                mask = os.urandom(4)
                masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                self._write(bytes([0x8A, 0x80 | len(payload)]) + mask + masked)
            elif opcode != 0xA:
                self._fail(f"protocol error: unexpected opcode {opcode}")
                self.abort()
                return

    def _message(self, text: str, received: int) -> None:
        self._count(_parse(text), received)

    def _count(self, parsed: _Parsed, received: int) -> None:
        if not self.ready.done():
            self.ready.set_result(received)  # the snapshot comes first
            return
        self.messages += 1
        snapshot, marks = parsed
        if snapshot:
            self.snapshots += 1  # the subscription overflowed and was re-snapshotted
        tally = self.tally
        run = tally.run
        seen, anywhere, latencies = self.seen, tally.any, tally.latencies
        got = False
        for frame_run, n, stamp in marks:
            if frame_run != run:
                continue
            if seen[n]:
                self.duplicates += 1
                continue
            seen[n] = anywhere[n] = 1
            self.frames += 1
            latencies.append((received - stamp) / 1e6)
            got = True
        if got and received > tally.last_ns:
            tally.last_ns = received

    def _fail(self, reason: str) -> None:
        if self.closing:
            return
        if self.lost is None:
            self.lost = reason
        if not self.ready.done():
            self.ready.set_exception(BenchError(reason))

    def abort(self) -> None:
        """Drop the connection at once (RST), as a browser tab that vanished would."""
        self.closing = True
        if self.ready.done() and not self.ready.cancelled():
            self.ready.exception()  # retrieved: no "exception never retrieved" warnings
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                self.loop.remove_reader(sock.fileno())
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()


@dataclass
class _Target:
    """Where the clients connect: the web process and the signed URL of each user's page."""

    host: str
    port: int
    pages: list[tuple[str, list]]  # (path?query, headers) per user


def _targets(base_url: str, emails: list[str]) -> _Target:
    parts = urlsplit(base_url)
    pages = []
    for email in emails:
        with LiveClient(base_url) as browser:
            browser.login(email)
            url = urlsplit(browser.live_url("/devices/"))
            cookie = "; ".join(f"{c.name}={c.value}" for c in browser.http.cookies)
        headers = [(b"Cookie", cookie.encode()), (b"Origin", base_url.encode())]
        pages.append((f"{url.path}?{url.query}", headers))
    return _Target(parts.hostname, parts.port, pages)


# ---------------------------------------------------------------- publishing


class _Publisher:
    """Publishes numbered frames onto the live bus from a thread, paced at `rate`/s."""

    def __init__(self, penv: ProdEnv, tenant: _Tenant) -> None:
        from events.live import encode
        from services.live import tenant_topic

        self.bus = penv.app.extensions["switchboard.live"].bus  # what services.live uses
        self.encode = encode
        self.topic = tenant_topic(tenant.tenant_id, "devices")
        self.tenant = tenant
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.first_ns = self.last_ns = 0
        self.sent = 0
        self.thread: threading.Thread | None = None

    def start(self, run: int, count: int, rate: float) -> threading.Thread:
        self.first_ns = self.last_ns = 0
        self.sent = 0
        self.thread = threading.Thread(
            target=self._publish, args=(run, count, rate), name="fanout-publisher", daemon=True
        )
        self.thread.start()
        return self.thread

    def halt(self) -> None:
        """Stop a publishing thread that is still running (after an error or Ctrl-C)."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        self.stop.clear()

    def _publish(self, run: int, count: int, rate: float) -> None:
        try:
            start = time.perf_counter()
            for seq in range(count):
                if self.stop.is_set():
                    return
                delay = start + seq / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                stamp = time.time_ns()  # CLOCK_REALTIME, as the kernel's receive stamps
                html = self.tenant.frame_html(run, seq, stamp)
                self.bus.publish(self.topic, self.encode(f"fanout-{run}-{seq}", html=html))
                if not self.first_ns:
                    self.first_ns = stamp
                self.last_ns = stamp
                self.sent += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the measuring coroutine
            self.error = exc


# ---------------------------------------------------------------- one measurement


@dataclass
class _Web:
    pid: int  # the gunicorn worker (or the peer's daphne)
    target: _Target
    coalesce_ms: int
    rss_boot: float  # MiB, before any socket
    threaded: bool = True  # a thread per socket, which a dropped client must free


async def _connect(
    web: _Web, run: _Run, count: int, deflate: bool, concurrency: int, sockets: list[_Socket]
) -> tuple[list[float], list[str]]:
    """Open `count` sockets; per socket ms from TCP connect to snapshot, and the failures."""
    limit = asyncio.Semaphore(concurrency)
    host_header = f"{web.target.host}:{web.target.port}"
    failures: list[str] = []

    async def one(i: int) -> float | None:
        target, headers = web.target.pages[i % len(web.target.pages)]
        async with limit:
            sock = _Socket(run, host_header, target, headers, deflate)
            sockets.append(sock)
            start = time.time_ns()
            try:
                await asyncio.wait_for(sock.open(web.target.host, web.target.port), 30)
                ready_ns = await asyncio.wait_for(sock.ready, 60)
            except (OSError, TimeoutError, BenchError) as exc:
                failures.append(f"{exc.__class__.__name__}: {exc}")
                sock.abort()
                return None
            return (ready_ns - start) / 1e6

    times = await asyncio.gather(*(one(i) for i in range(count)))
    return [t for t in times if t is not None], failures


async def _wait(predicate: Callable[[], bool], timeout: float, stall: float = 0.0, progress=None):
    """Wait until predicate(); give up after `timeout`, or after `stall` s without progress()."""
    deadline = time.monotonic() + timeout
    last, last_change = (progress() if progress else None), time.monotonic()
    while not predicate():
        now = time.monotonic()
        if now >= deadline:
            return False
        if progress is not None:
            value = progress()
            if value != last:
                last, last_change = value, now
            elif stall and now - last_change >= stall:
                return False
        await asyncio.sleep(0.05)
    return True


async def _measure(
    web: _Web,
    publisher: _Publisher,
    clients: int,
    rate: float,
    seconds: float,
    *,
    deflate: bool,
    concurrency: int,
    run_id: int,
) -> dict:
    run = _Run()
    sockets: list[_Socket] = []
    out: dict = {"clients": clients, "concurrency": concurrency}
    try:
        out["rss_before"] = proc_rss_mb(web.pid)
        out["threads_before"] = int(proc_status(web.pid).get("Threads", 0))
        out["fds_before"] = proc_open_files(web.pid)
        start = time.perf_counter()
        setup, failures = await _connect(web, run, clients, deflate, concurrency, sockets)
        out["connect_s"] = time.perf_counter() - start
        out["setup_ms"], out["failures"] = setup, failures
        live = [s for s in sockets if s.lost is None and s.ready.done()]
        if not live:
            raise BenchError(f"no socket connected: {failures[:3]}")
        await asyncio.sleep(0.5)  # let the server's threads settle before reading its memory
        out["rss_open"] = proc_rss_mb(web.pid)
        out["threads_open"] = int(proc_status(web.pid).get("Threads", 0))
        out["fds_open"] = proc_open_files(web.pid)

        # Warm-up (first compressed messages, first reads): a few frames, briefly awaited.
        run.start(run_id * 2 - 1, WARM_FRAMES, live)
        thread = publisher.start(run.run, WARM_FRAMES, rate)
        warmed = await _wait(lambda: all(s.frames >= WARM_FRAMES for s in live), 10.0)
        thread.join()
        out["warm_short"] = 0 if warmed else sum(s.frames < WARM_FRAMES for s in live)
        await asyncio.sleep(0.2)

        count = max(1, int(rate * seconds))
        run.start(run_id * 2, count, live)
        user0, sys0 = proc_cpu_times(web.pid)
        cpu_self, wall = time.process_time(), time.perf_counter()
        peak = out["rss_open"]
        thread = publisher.start(run.run, count, rate)
        while thread.is_alive():
            await asyncio.sleep(0.1)
            peak = max(peak, proc_rss_mb(web.pid))
        if publisher.error is not None:
            raise BenchError(f"publishing failed: {publisher.error!r}")
        published_s = (publisher.last_ns - publisher.first_ns) / 1e9

        def total() -> int:
            return sum(s.frames for s in live)

        # Until every client has every frame, or nothing more arrives for 2 s; a server
        # that has fallen far behind gets as long again as the publishing took, no more.
        out["drained"] = await _wait(
            lambda: total() >= count * len(live),
            max(5.0, seconds),
            stall=2.0,
            progress=total,
        )
        window = time.perf_counter() - wall
        user1, sys1 = proc_cpu_times(web.pid)
        out["cpu_web"] = (user1 + sys1 - user0 - sys0) / window
        out["cpu_web_sys"] = (sys1 - sys0) / window
        out["cpu_bench"] = (time.process_time() - cpu_self) / window
        out["rss_peak"] = max(peak, proc_rss_mb(web.pid))
        out.update(
            count=count,
            connected=len(live),
            published_rate=(count - 1) / published_s if published_s > 0 else float("nan"),
            per_client=[s.frames for s in live],
            duplicates=sum(s.duplicates for s in live),
            snapshots=sum(s.snapshots for s in live),
            messages=sum(s.messages for s in live),
            lost=[s.lost for s in live if s.lost],
            delivered=total(),
            distinct=sum(run.any),
            highest=max((i for i, got in enumerate(run.any) if got), default=-1),
            span_s=((run.last_ns or publisher.last_ns) - publisher.first_ns) / 1e9,
            window_s=window,
            latency=summarize(run.latencies.tolist()),
            client_delay=summarize(run.client_delay.tolist()),
        )
        return out
    finally:
        publisher.halt()
        for sock in sockets:
            sock.abort()
        if len(sockets) > 1 and "threads_open" in out and web.threaded:
            # Dead clients must free their threads: the worker's count falls back.
            with contextlib.suppress(asyncio.CancelledError):
                await _wait(
                    lambda: (
                        int(proc_status(web.pid).get("Threads", 0))
                        <= out["threads_open"] - 0.9 * len(sockets)
                    ),
                    5.0,
                )
            out["threads_after"] = int(proc_status(web.pid).get("Threads", 0))
            out["fds_after"] = proc_open_files(web.pid)


# ---------------------------------------------------------------- the benchmark


def run(args: argparse.Namespace) -> list[dict]:
    FIGURES.clear()
    clients, seconds = _size(args, "clients"), _size(args, "seconds")
    rate = args.fanout_rate
    if clients < 1 or rate <= 0 or seconds <= 0:
        raise BenchError("--fanout-clients, --fanout-rate and --fanout-seconds must be positive")
    steps = _steps(args, clients)
    # The bench holds a socket per client; the worker a socket and an epoll fd per client.
    limit = raise_open_files_limit(3 * clients + 1024)
    if limit < 2 * clients + 256:
        raise BenchError(f"open-files limit {limit} is too low for {clients} clients")
    with prod_app("fanout") as penv:
        coalesce_ms = args.fanout_coalesce_ms
        if coalesce_ms is None:
            coalesce_ms = penv.app.config["LIVE_COALESCE_MS"]  # production's default
        tenant = _seed_tenant(penv, max(1, args.fanout_users))
        publisher = _Publisher(penv, tenant)
        measured: dict[int, dict] = {}
        rows = _one_web_process(
            args, penv, tenant, publisher, steps, rate, seconds, coalesce_ms, measured
        )
        if args.fanout_peer:
            rows += _peer(args, penv, tenant, steps, rate, seconds, measured)
        return rows


def _steps(args: argparse.Namespace, clients: int) -> list[int]:
    """1 client (the baseline), the ramp's client counts, then `clients`."""
    ramp = args.fanout_ramp
    if ramp is None:
        ramp = DEFAULT_RAMP[1 if args.quick else 0]
    counts = [int(c) for c in ramp.split(",") if c.strip()]
    return sorted({1, clients, *(c for c in counts if 1 < c < clients)})


def _one_web_process(
    args: argparse.Namespace,
    penv: ProdEnv,
    tenant: _Tenant,
    publisher: _Publisher,
    steps: list[int],
    rate: float,
    seconds: float,
    coalesce_ms: int,
    measured: dict[int, dict],
) -> list[dict]:
    """Switchboard's side; each step's measurement is also kept in `measured` by client count."""
    clients = steps[-1]
    threads = clients + 100
    env = {
        "LIVE_COALESCE_MS": str(coalesce_ms),
        # gunicorn stops accepting at worker_connections (default 1000) open connections.
        "GUNICORN_CMD_ARGS": f"--worker-connections {clients + 200}",
    }
    note(f"gunicorn gthread, 1 worker × {threads} threads, LIVE_COALESCE_MS={coalesce_ms}")
    rows: list[dict] = []
    with web_server(penv, workers=1, threads=threads, env=env) as server:
        pids = child_pids(server.proc.pid)
        if len(pids) != 1:
            raise BenchError(f"expected one gunicorn worker, found {pids}")
        web = _Web(pids[0], _targets(server.url, tenant.emails), coalesce_ms, proc_rss_mb(pids[0]))
        options = {"deflate": args.fanout_deflate, "concurrency": args.fanout_connect_concurrency}
        base = None
        for step, n in enumerate(steps):
            note(f"{n} client(s): connecting, then {rate:g} frames/s for {seconds:g} s")
            got = asyncio.run(
                _measure(web, publisher, n, rate, seconds, run_id=step + 1, **options)
            )
            if server.proc.poll() is not None:
                raise BenchError(f"gunicorn exited with {server.proc.returncode}")
            measured[n] = got
            if base is None:
                base = got
                rows += _baseline_rows(got, coalesce_ms)
            else:
                rows += _rows(base, got, web, rate, seconds, threads, args.fanout_deflate)
    return rows


# ---------------------------------------------------------------- the Channels peer


def _peer(
    args: argparse.Namespace,
    penv: ProdEnv,
    tenant: _Tenant,
    steps: list[int],
    rate: float,
    seconds: float,
    measured: dict[int, dict],
) -> list[dict]:
    """The Django Channels peer at the last PEER_STEPS client counts, then the comparison.
    A peer that cannot be built or run gives a row saying so; Switchboard's rows stand."""
    from bench import peer_channels

    counts = [n for n in steps if n > 1][-PEER_STEPS:] or steps[-1:]
    try:
        python = peer_channels.ensure_venv()
    except BenchError as exc:
        return [
            result(
                "Channels peer",
                "skipped",
                detail=f"{exc} (--no-fanout-peer leaves the peer out)",
            )
        ]
    options = {"deflate": args.fanout_deflate, "concurrency": args.fanout_connect_concurrency}
    rows: list[dict] = []
    try:
        # The pub/sub channels are named after a prefix of the run's Redis namespace.
        with peer_channels.daphne(
            python, penv.redis_url, f"{penv.prefix}peer:", penv.tmpdir
        ) as peer:
            note(
                f"Channels peer: daphne, 1 process, RedisPubSubChannelLayer "
                f"({peer_channels.versions(python)})"
            )
            target = _Target(
                peer.host, peer.port, [("/ws/devices/", [(b"Origin", peer.url.encode())])]
            )
            web = _Web(peer.pid, target, 0, proc_rss_mb(peer.pid), threaded=False)
            publisher = peer_channels.PeerPublisher(
                peer, python, tenant.card_head, tenant.card_tail, penv.tmpdir
            )
            try:
                for step, n in enumerate(counts):
                    _settle(peer.pid)
                    note(
                        f"Channels peer, {n} client(s): connecting, then {rate:g} frames/s "
                        f"for {seconds:g} s"
                    )
                    got = asyncio.run(
                        _measure(web, publisher, n, rate, seconds, run_id=100 + step, **options)
                    )
                    peer.check_alive()
                    rows += _peer_rows(got, web, rate, seconds)
                    if n in measured:
                        rows += _compare_rows(measured[n], got, n == steps[-1])
            finally:
                publisher.close()
    except BenchError as exc:
        rows.append(result("Channels peer", "failed", detail=str(exc).strip()[-1500:]))
    return rows


def _settle(pid: int, timeout: float = 20.0) -> None:
    """Wait (bounded) until a server has worked off what the last step left it: a peer that
    fell behind still writes to, and tears down, the sockets the clients dropped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = sum(proc_cpu_times(pid))
        time.sleep(0.5)
        if sum(proc_cpu_times(pid)) - before < 0.05:  # under a tenth of a core
            return
    note(f"the server was still busy {timeout:g} s after the last step")


# ---------------------------------------------------------------- rows


def _baseline_rows(base: dict, ms: int) -> list[dict]:
    lat = base["latency"]
    if not lat.get("count"):
        raise BenchError("the single client received no frame")
    return [
        result(
            f"p50 latency, 1 client, coalesce {ms}",
            lat["p50"],
            "ms",
            detail=(
                f"{base['delivered']}/{base['count']} frames in {base['messages']} socket "
                f"messages; web worker {base['cpu_web']:.2f} cores"
            ),
        ),
        result(
            f"p99 latency, 1 client, coalesce {ms}",
            lat["p99"],
            "ms",
            detail=f"max {lat['max']:.0f} ms"
            + (
                f"; at a steady rate a frame waits up to {ms} ms for the next message, "
                f"so p99 ≈ {ms} ms at best"
                if ms
                else ""
            ),
        ),
    ]


def _rows(base: dict, full: dict, web: _Web, rate: float, seconds: float, threads: int, deflate):
    n, ms = full["clients"], web.coalesce_ms
    tag = f"{n} clients, coalesce {ms}"
    lat, base_lat = full["latency"], base["latency"]
    if not lat.get("count"):
        raise BenchError(f"{tag}: no frame reached any of the {full['connected']} clients")
    rows = []
    setup, failed = full["setup_ms"], full["failures"]
    rows.append(
        result(
            f"connect, {tag}",
            full["connect_s"],
            "s",
            detail=(
                f"{len(setup)}/{n} sockets connected, ≤{full['concurrency']} handshakes at "
                f"once; TCP connect → snapshot per socket p50 {percentile(setup, 50):.0f} ms, "
                f"p99 {percentile(setup, 99):.0f} ms, max {max(setup):.0f} ms"
                + (f"; {len(failed)} failed, e.g. {failed[0]}" if failed else "")
            ),
        )
    )
    per_socket_kb = (full["rss_open"] - web.rss_boot) * 1024 / max(1, full["connected"])
    rows.append(
        result(
            f"web worker RSS, {tag}",
            full["rss_open"],
            "MiB",
            detail=(
                f"sockets open and idle: +{per_socket_kb:.0f} KiB per socket over the fresh "
                f"process's {web.rss_boot:.0f} MiB"
                f"{' (permessage-deflate negotiated)' if deflate else ' (no compression)'}, "
                f"{full['rss_before']:.0f} MiB before this step; peak {full['rss_peak']:.0f} "
                f"MiB while frames flowed; threads {full['threads_before']} → "
                f"{full['threads_open']} (--threads {threads}) → {full.get('threads_after', '?')}"
                f" 5 s after the clients left; fds {full['fds_before']} → {full['fds_open']} → "
                f"{full.get('fds_after', '?')}"
            ),
        )
    )
    rows.append(
        result(
            f"p50 latency, {tag}",
            lat["p50"],
            "ms",
            ratio=lat["p50"] / base_lat["p50"],
            vs="1 client",
            detail=(
                f"publish → receipt over {lat['count']:,} (frame, client) pairs; "
                f"{rate:g} frames/s for {seconds:g} s (publisher achieved "
                f"{full['published_rate']:.0f}/s)"
            ),
        )
    )
    met = "met" if lat["p99"] < P99_TARGET_MS else "MISSED"
    rows.append(
        result(
            f"p99 latency, {tag}",
            lat["p99"],
            "ms",
            ratio=lat["p99"] / base_lat["p99"],
            vs="1 client",
            detail=f"target < {P99_TARGET_MS:.0f} ms: {met}; max {lat['max']:,.0f} ms",
        )
    )
    expected = full["count"] * full["connected"]
    delivered_rate = full["delivered"] / full["span_s"] if full["span_s"] > 0 else float("nan")
    rows.append(
        result(
            f"frames delivered/s, {tag}",
            delivered_rate,
            "frames/s",
            ratio=delivered_rate / (rate * full["connected"]),
            vs=f"{full['connected']} × {rate:g}/s",
            detail=(
                f"{full['delivered']:,}/{expected:,} (frame, client) pairs, from the first "
                f"publish to the last receipt ({full['span_s']:.1f} s), in "
                f"{full['messages']:,} socket messages "
                f"({full['messages'] / max(1, full['connected']) / full['span_s']:.1f}/s per "
                "client)" + ("" if full["drained"] else "; gave up waiting for the rest")
            ),
        )
    )
    per_client = full["per_client"]
    starved = [c for c in per_client if c < full["count"]]
    notes = []
    if starved:
        notes.append(
            f"{len(starved)} clients short, {expected - full['delivered']:,} frames missing in "
            f"all; {full['distinct']} distinct frames reached any client (highest #"
            f"{full['highest']} of {full['count']})"
        )
    else:
        notes.append("no client starved: every client got every frame")
    if full["snapshots"]:
        notes.append(f"{full['snapshots']} snapshots re-sent (a subscription overflowed)")
    if full["duplicates"]:
        notes.append(f"{full['duplicates']} duplicate frames")
    if full["lost"]:
        notes.append(f"{len(full['lost'])} sockets lost, e.g. {full['lost'][0]}")
    if full["warm_short"]:
        notes.append(f"{full['warm_short']} clients lacked warm-up frames after 10 s")
    rows.append(
        result(
            f"frames per client, min, {tag}",
            min(per_client),
            "frames",
            detail=(
                f"median {statistics.median(per_client):.0f}, max {max(per_client)} of "
                f"{full['count']} published; target: no client starved — " + "; ".join(notes)
            ),
        )
    )
    delay = full["client_delay"]
    rows.append(
        result(
            f"CPU, web worker, {tag}",
            full["cpu_web"],
            "cores",
            ratio=full["cpu_web"] / base["cpu_web"] if base["cpu_web"] > 0 else None,
            vs="1 client",
            detail=(
                f"{full['cpu_web_sys']:.2f} of it in the kernel, over {full['window_s']:.1f} s "
                f"of publishing and delivery; the bench process (clients + publisher) used "
                f"{full['cpu_bench']:.2f} cores; it handled reads p50 "
                f"{delay.get('p50', float('nan')):.1f} ms, p99 "
                f"{delay.get('p99', float('nan')):.0f} ms after the kernel received them "
                "(not counted in the latencies)"
            ),
        )
    )
    return rows


def _delivered_rate(got: dict) -> float:
    """(frame, client) pairs delivered per second, from the first publish to the last receipt."""
    return got["delivered"] / got["span_s"] if got["span_s"] > 0 else float("nan")


def _starved(got: dict) -> int:
    return sum(c < got["count"] for c in got["per_client"])


def _div(a: float, b: float) -> float | None:
    return a / b if b and b == b and a == a else None


def _peer_rows(full: dict, web: _Web, rate: float, seconds: float) -> list[dict]:
    n = full["clients"]
    tag = f"Channels peer, {n} clients"
    lat = full["latency"]
    nan = float("nan")
    expected = full["count"] * full["connected"]
    delivered = _delivered_rate(full)
    setup, failed = full["setup_ms"], full["failures"]
    connect = f"{len(setup)}/{n} sockets connected in {full['connect_s']:.1f} s" + (
        f" ({len(failed)} failed, e.g. {failed[0]})" if failed else ""
    )
    rows = [
        result(
            f"frames delivered/s, {tag}",
            delivered,
            "frames/s",
            ratio=delivered / (rate * full["connected"]),
            vs=f"{full['connected']} × {rate:g}/s",
            detail=(
                f"{full['delivered']:,}/{expected:,} (frame, client) pairs from the first "
                f"publish to the last receipt ({full['span_s']:.1f} s), publisher achieved "
                f"{full['published_rate']:.0f}/s; {connect}"
                + (
                    ""
                    if full["drained"]
                    else "; gave up waiting for the rest (2 s without progress, or "
                    f"{max(5.0, seconds):g} s after publishing)"
                )
            ),
        ),
        result(
            f"p50 latency, {tag}",
            lat.get("p50", nan),
            "ms",
            detail=f"publish → receipt over {lat['count']:,} (frame, client) pairs"
            if lat.get("count")
            else "no frame reached any client",
        ),
        result(
            f"p99 latency, {tag}",
            lat.get("p99", nan),
            "ms",
            detail=(
                f"max {lat['max']:,.0f} ms (frames never delivered are not in it)"
                if lat.get("count")
                else ""
            ),
        ),
    ]
    per_client = full["per_client"]
    notes = [
        f"per client min {min(per_client)}, median {statistics.median(per_client):.0f}, max "
        f"{max(per_client)} of {full['count']} published; {full['distinct']} distinct frames "
        "reached any client"
    ]
    if full["lost"]:
        notes.append(f"{len(full['lost'])} sockets lost, e.g. {full['lost'][0]}")
    if full["warm_short"]:
        notes.append(f"{full['warm_short']} clients lacked warm-up frames after 10 s")
    rows.append(
        result(
            f"clients starved, {tag}",
            _starved(full),
            "clients",
            detail="clients that got less than every frame; " + "; ".join(notes),
        )
    )
    delay = full["client_delay"]
    per_socket_kb = (full["rss_open"] - web.rss_boot) * 1024 / max(1, full["connected"])
    rows.append(
        result(
            f"CPU, daphne, {tag}",
            full["cpu_web"],
            "cores",
            detail=(
                f"{full['cpu_web_sys']:.2f} of it in the kernel, over {full['window_s']:.1f} s; "
                f"RSS {full['rss_open']:.0f} MiB with the sockets open (+{per_socket_kb:.0f} KiB "
                f"per socket), peak {full['rss_peak']:.0f} MiB; the bench process used "
                f"{full['cpu_bench']:.2f} cores and handled reads p50 "
                f"{delay.get('p50', nan):.1f} ms after the kernel received them"
            ),
        )
    )
    return rows


def _compare_rows(ours: dict, peer: dict, main: bool) -> list[dict]:
    """Switchboard ÷ the peer at one client count; at the largest (`main`), the figure
    fanout_vs_channels_ratio and the issue's target."""
    n = ours["clients"]
    tag = f"Switchboard vs Channels, {n} clients"
    nan = float("nan")
    ours_rate, peer_rate = _delivered_rate(ours), _delivered_rate(peer)
    ours_p99 = ours["latency"].get("p99", nan)
    peer_p99 = peer["latency"].get("p99", nan)
    ratio = _div(ours_rate, peer_rate)
    detail = (
        f"Switchboard {ours_rate:,.0f} frames/s, p99 {ours_p99:,.0f} ms, "
        f"{_starved(ours)}/{ours['connected']} clients starved; Channels {peer_rate:,.0f} "
        f"frames/s, p99 {peer_p99:,.0f} ms, {_starved(peer)}/{peer['connected']} starved"
    )
    if main:
        met = ratio is not None and ratio >= PEER_RATIO_TARGET and ours_p99 <= P99_TARGET_MS
        detail += (
            f"; target ≥ {PEER_RATIO_TARGET:g}× with p99 ≤ {P99_TARGET_MS:g} ms: "
            f"{'met' if met else 'MISSED'}; figure fanout_vs_channels_ratio"
        )
        if ratio is not None:
            FIGURES["fanout_vs_channels_ratio"] = ratio
    rows = [
        result(
            f"frames delivered/s, {tag}",
            ours_rate,
            "frames/s",
            ratio=ratio,
            vs="Channels peer",
            detail=detail,
        ),
        result(
            f"p99 latency, {tag}",
            ours_p99,
            "ms",
            ratio=_div(ours_p99, peer_p99),
            vs="Channels peer",
            detail=f"Channels p99 {peer_p99:,.0f} ms, p50 {peer['latency'].get('p50', nan):,.0f}"
            f" ms; Switchboard p50 {ours['latency'].get('p50', nan):,.0f} ms",
        ),
    ]
    ours_per_core = _div(ours_rate, ours["cpu_web"])
    peer_per_core = _div(peer_rate, peer["cpu_web"])
    rows.append(
        result(
            f"CPU, {tag}",
            ours["cpu_web"],
            "cores",
            ratio=_div(ours["cpu_web"], peer["cpu_web"]),
            vs="Channels peer",
            detail=(
                f"web worker vs daphne ({peer['cpu_web']:.2f} cores); frames delivered per "
                f"CPU-second: Switchboard {ours_per_core or nan:,.0f}, Channels "
                f"{peer_per_core or nan:,.0f}"
            ),
        )
    )
    return rows
