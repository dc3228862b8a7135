"""The Shure service: a command-string client for ULX-D, QLX-D, SLX-D and Axient Digital receivers.

Shure receivers push a REP whenever a property changes and a SAMPLE at the meter rate, so the
client keeps one persistent connection per receiver (host, port) and a cached snapshot of what
the receiver said. One I/O thread per service (the hub) reads every connection and runs their
deadlines; it sleeps until a receiver speaks or a deadline is due, so hundreds of receivers
cost one thread, not hundreds of threads waking on a tick. Connecting blocks (name
resolution, the address check, the TCP connect), so a few connector threads do it.

A poll (`fetch`) never talks to the receivers itself: it asks every connection for a fresh
round-trip (`< GET DEVICE_ID >`), waits for the answers against one shared deadline and builds
reports from the snapshots. A receiver that is down, slow or hung therefore costs a poll at
most its timeout, and never delays the others.

A new connection first asks `< GET MODEL >`: Axient Digital and SLX-D answer with their model,
ULX-D and QLX-D (which have no MODEL property) with `< REP ERR >` or not at all. Only then does
it ask for everything and turn meters on, so every property and SAMPLE line is read with its
family's names and layout (shure_protocol.FAMILIES).

Connections reconnect on their own with jittered exponential back-off, and a silence watchdog
drops a connection that has said nothing for `silence_timeout` seconds (a hung receiver keeps
its TCP connection open but stops answering). Connections nobody polled for `idle_timeout`
seconds close themselves, so endpoints removed from the database don't keep sockets open.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import math
import os
import random
import selectors
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from events.nowait import recv_nowait, send_nowait
from services import netpolicy
from services.devices import DeviceReport, ManufacturerService, register
from services.manufacturers import shure_protocol as proto
from services.meters import SHARE_SECONDS, Leases, MeterPump, snapshot_json

log = logging.getLogger(__name__)

SERVICE_CODE = "shure"

# Optional app config keys (read on every fetch when an app context is active).
CONFIG_KEYS = {
    "DEVICES_SHURE_METER_RATE_MS": "meter_rate_ms",
    "DEVICES_SHURE_SILENCE_TIMEOUT": "silence_timeout",
    "DEVICES_SHURE_CONNECT_TIMEOUT": "connect_timeout",
    "DEVICES_SHURE_BACKOFF_INITIAL": "backoff_initial",
    "DEVICES_SHURE_BACKOFF_MAX": "backoff_max",
    "DEVICES_SHURE_IDLE_TIMEOUT": "idle_timeout",
    "DEVICES_SHURE_LEASE_SECONDS": "lease_seconds",
}


@dataclass(frozen=True)
class ShureSettings:
    meter_rate_ms: int = 1000  # SAMPLE frames per channel; they double as a heartbeat
    silence_timeout: float = 5.0  # no frame for this long: reconnect
    connect_timeout: float = 2.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    idle_timeout: float = 600.0  # close connections no poll asked about for this long
    identify_timeout: float = 1.0  # no answer to GET MODEL by then: a ULX-D/QLX-D
    # How long a process owns a receiver's one connection without renewing (services/meters):
    # when it dies, another process takes the receiver over after at most this long.
    lease_seconds: float = 10.0


def backoff_delay(attempt: int, initial: float, cap: float, rng: random.Random) -> float:
    """Delay before reconnect attempt `attempt` (1, 2, …): exponential, capped, and jittered
    into [half, full] so many clients that lost a receiver together don't retry in step."""
    ceiling = min(cap, initial * 2 ** max(0, attempt - 1))
    return rng.uniform(ceiling / 2, ceiling)


# ---------------------------------------------------------------- level buckets

# Meter samples jitter by a few dB from one sample to the next. A poll reports levels in coarse
# buckets - RF in 10 dB steps (-120, -110, … dBm), audio in 10 dB steps (-50, -40, … 0 dBFS) -
# after smoothing the samples (exponential moving average), and a level only moves to another
# bucket when it is more than 2 dB past the edge (hysteresis). So device.updated events say
# "the RF dropped from -60 to -80 dBm", not "the RF wobbled by 1 dB". Battery run time is
# reported in 5-minute steps for the same reason: the bars carry the alerts, the minutes are
# a guide, and one update per transmitter every minute would bury the activity log.
LEVEL_STEP_DB = 10
LEVEL_HYSTERESIS_DB = 2
LEVEL_SMOOTHING = 0.3  # weight of the newest sample
BATTERY_MINUTES_STEP = 5


class LevelBucket:
    def __init__(self, step: int = LEVEL_STEP_DB, hysteresis: int = LEVEL_HYSTERESIS_DB) -> None:
        self.step, self.hysteresis = step, hysteresis
        self.smoothed: float | None = None
        self.bucket: int | None = None

    def add(self, value: float) -> int:
        if self.smoothed is None:
            self.smoothed = float(value)
        else:
            self.smoothed += LEVEL_SMOOTHING * (value - self.smoothed)
        level = self.smoothed
        current = self.bucket
        if (
            current is None
            or level < current - self.hysteresis
            or level >= current + self.step + self.hysteresis
        ):
            self.bucket = int(math.floor(level / self.step) * self.step)
        return self.bucket

    def reset(self) -> None:
        self.smoothed = self.bucket = None


def round_minutes(minutes: int | None) -> int | None:
    if minutes is None:
        return None
    return minutes - minutes % BATTERY_MINUTES_STEP


# ---------------------------------------------------------------- snapshot


def merge_antennas(seen: list[str]) -> str | None:
    """The antenna status over a poll's samples: a position counts as lit when any sample lit
    it. Diversity hops between antennas many times a second; "which antennas carried the
    signal since the last poll" is what stays still enough to show and log."""
    if not seen:
        return None
    width = max(len(text) for text in seen)
    merged = []
    for position in range(width):
        letters = [text[position] for text in seen if len(text) > position]
        lit = [letter for letter in letters if letter != "X"]
        merged.append(max(lit) if lit else "X")
    return "".join(merged)


@dataclass
class ChannelState:
    number: int
    name: str = ""
    tx_type: str = ""
    battery_bars: int | None = None
    battery_minutes: int | None = None
    frequency_mhz: float | None = None
    group_channel: str | None = None
    audio_gain_db: int | None = None
    audio_muted: bool | None = None
    interference: bool | None = None
    encryption_warning: bool | None = None
    tx_offset_db: int | None = None
    power_lock: bool | None = None
    menu_lock: bool | None = None
    lock: str | None = None  # Axient's TX_LOCK, as sent
    reported_quality: int | None = None  # CHAN_QUALITY
    reported_antenna: str | None = None  # ANTENNA_STATUS
    antenna: str | None = None
    quality: int | None = None
    antennas_seen: list[str] = field(default_factory=list)
    qualities_seen: list[int] = field(default_factory=list)
    rf: LevelBucket = field(default_factory=LevelBucket)
    audio: LevelBucket = field(default_factory=LevelBucket)

    @property
    def tx_on(self) -> bool:
        return proto.transmitter_present(self.tx_type)

    @property
    def tx_lock(self) -> str | None:
        return self.lock or proto.combined_lock(self.power_lock, self.menu_lock)

    def close_window(self) -> None:
        """Fold the samples since the last poll into the values a poll reports."""
        antenna = merge_antennas(self.antennas_seen)
        if antenna is not None:
            self.antenna = antenna
        if self.qualities_seen:
            self.quality = min(self.qualities_seen)  # the worst moment is what matters
        self.antennas_seen.clear()
        self.qualities_seen.clear()

    def state(self) -> dict[str, Any]:
        state = {
            "channel_name": self.name,
            "battery_bars": self.battery_bars,
            "battery_minutes": round_minutes(self.battery_minutes),
            "tx_on": self.tx_on,
            "frequency_mhz": self.frequency_mhz,
        }
        # Levels only once sampled: "no sample yet" is not a change worth an update.
        if self.rf.bucket is not None:
            state["rf_level"] = self.rf.bucket
        if self.audio.bucket is not None:
            state["audio_level"] = self.audio.bucket
        # What the family reports at all; a family without a property leaves it out.
        extras = {
            "group_channel": self.group_channel,
            "audio_gain_db": self.audio_gain_db,
            "audio_muted": self.audio_muted,
            "interference": self.interference,
            "encryption_warning": self.encryption_warning,
            "tx_offset_db": self.tx_offset_db,
            "tx_lock": self.tx_lock,
            "quality": self.quality if self.quality is not None else self.reported_quality,
            "antenna": self.antenna or self.reported_antenna,
        }
        state.update({key: value for key, value in extras.items() if value is not None})
        return state


@dataclass
class ReceiverSnapshot:
    host: str
    port: int
    connected: bool = False
    fresh: bool = False
    model: str = ""
    firmware: str = ""
    device_id: str = ""
    family: str = ""
    channels: dict[int, dict[str, Any]] = field(default_factory=dict)
    channel_names: dict[int, str] = field(default_factory=dict)
    tx_types: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ConnectionStatus:
    host: str
    port: int
    state: str
    connects: int
    failures: int
    frames: int
    last_error: str
    errors: int = 0
    family: str = ""


# ---------------------------------------------------------------- the I/O thread

# Threads that open connections at once, at most. Resolving a name, checking its addresses
# and the TCP connect block - up to connect_timeout for an unplugged receiver - so they run
# here, never on the hub. Enough for every receiver of a large venue at once: with 16, forty
# switched-off receivers listed first held the live ones past the first poll's timeout (a
# thread that hangs in connect costs nothing but its stack, and ends CONNECTOR_IDLE after).
CONNECTORS = 256
# A connector thread with nothing to do for this long ends: a settled fleet has none.
CONNECTOR_IDLE = 2.0
# One read per ready connection and turn of the hub: a receiver that floods frames gets a
# slice, then everyone else's turn comes.
READ_SIZE = 65536


class _Connectors:
    """A small pool of threads for the blocking part of connecting."""

    def __init__(self, limit: int = CONNECTORS, idle: float = CONNECTOR_IDLE) -> None:
        self.limit, self.idle = limit, idle
        self._cond = threading.Condition()
        self._jobs: deque[Callable[[], None]] = deque()
        self._threads = 0
        self._waiting = 0  # threads waiting for a job

    def submit(self, job: Callable[[], None]) -> None:
        with self._cond:
            self._jobs.append(job)
            self._cond.notify()
            if len(self._jobs) > self._waiting and self._threads < self.limit:
                self._threads += 1
                thread = threading.Thread(target=self._work, name="shure connect", daemon=True)
                thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                deadline = time.monotonic() + self.idle
                while not self._jobs:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._threads -= 1
                        return
                    self._waiting += 1
                    self._cond.wait(remaining)
                    self._waiting -= 1
                job = self._jobs.popleft()
            try:
                job()
            except Exception:  # noqa: BLE001 - one bad connect must not end the pool
                log.exception("shure: connecting failed")


_HUBS: weakref.WeakSet[_Hub] = weakref.WeakSet()


def _hubs_after_fork() -> None:
    for hub in list(_HUBS):
        hub._after_fork()


class _Hub:
    """The one I/O thread of a ShureService: one selector over every connected receiver
    (and a wake socket), and one heap of the connections' next deadlines. It sleeps until a
    receiver says something, another thread asks for something (`call`), or a deadline is
    due - never on a fixed tick, so idle receivers cost nothing. It runs while it has
    connections and ends with the last one."""

    def __init__(self) -> None:
        self._reset()
        _HUBS.add(self)

    def _reset(self) -> None:
        self.connectors = _Connectors()
        self._lock = threading.Lock()
        # Guarded by _lock:
        self._members: set[ReceiverConnection] = set()
        self._jobs: deque[tuple[ReceiverConnection, Callable[[], None]]] = deque()
        self._thread: threading.Thread | None = None
        # The thread that ended last: it is still finishing (closing its selector) after it
        # has let go of the hub's state, and a shutdown waits for that too.
        self._ended: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        # Only touched by the hub thread:
        self._selector: selectors.BaseSelector | None = None
        self._timers: list[tuple[float, int, ReceiverConnection]] = []
        self._order = itertools.count()

    # -- any thread

    def join(self, conn: ReceiverConnection) -> None:
        with self._lock:
            self._members.add(conn)
            self._ensure_thread()

    def call(self, conn: ReceiverConnection, job: Callable[[], None]) -> None:
        """Run `job` (a method of `conn`) on the hub thread, soon."""
        with self._lock:
            self._jobs.append((conn, job))
            self._ensure_thread()
            try:
                self._wake_w.send(b"!")  # type: ignore[union-attr]
            except OSError:  # already woken (buffer full)
                pass

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def wait_ended(self, timeout: float) -> None:
        with self._lock:
            thread = self._thread or self._ended
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._thread = threading.Thread(target=self._run, name="shure hub", daemon=True)
            self._thread.start()

    # -- the hub thread

    def leave(self, conn: ReceiverConnection) -> None:
        with self._lock:
            self._members.discard(conn)

    def watch(self, sock: socket.socket, conn: ReceiverConnection, writing: bool) -> None:
        assert self._selector is not None
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
        try:
            self._selector.modify(sock, events, conn)
        except KeyError:
            self._selector.register(sock, events, conn)

    def unwatch(self, sock: socket.socket) -> None:
        if self._selector is not None:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass

    def schedule(self, conn: ReceiverConnection, when: float) -> None:
        """Wake `conn` at `when` (the earliest asked for counts; later entries are dropped
        when they come up, see _run_timers)."""
        if when < conn._timer_at:
            conn._timer_at = when
            heapq.heappush(self._timers, (when, next(self._order), conn))

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        self._selector = selector
        with self._lock:
            wake_r = self._wake_r
        assert wake_r is not None
        selector.register(wake_r, selectors.EVENT_READ, None)
        try:
            while True:
                timeout = None
                if self._timers:
                    timeout = max(0.0, self._timers[0][0] - time.monotonic())
                for key, mask in selector.select(timeout):
                    conn = key.data
                    if conn is None:
                        try:
                            while wake_r.recv(4096):
                                pass
                        except (BlockingIOError, InterruptedError):
                            pass
                    else:
                        self._dispatch(conn, conn._on_io, mask)
                self._run_jobs()
                self._run_timers()
                with self._lock:
                    if not self._members and not self._jobs:
                        self._end()
                        return
        except Exception:  # noqa: BLE001 - a bug here: close everything rather than hang
            log.exception("shure: I/O thread failed")
            with self._lock:
                members = list(self._members)
            for conn in members:
                self._dispatch(conn, conn._finish)
            with self._lock:
                self._end()
        finally:
            selector.close()

    def _after_fork(self) -> None:
        """In a forked child: the hub thread did not come along (and a lock may have been
        held by a thread that did not either). Its connections are the parent's: each is
        marked stopped, so the service opens its own, and its copy of the socket closed."""
        members = list(self._members)
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._selector is not None:
            self._selector.close()
        self._reset()
        for conn in members:
            conn._cond = threading.Condition()
            conn.state = "stopped"
            if conn._sock is not None:
                conn._sock.close()
                conn._sock = None

    def _end(self) -> None:
        """The thread ends (lock held): the next call or join starts another, which must
        find none of this one's state."""
        if self._thread is threading.current_thread():
            self._ended, self._thread = self._thread, None
            self._selector = None
            self._timers.clear()
            for sock in (self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()
            self._wake_r = self._wake_w = None

    def _run_jobs(self) -> None:
        with self._lock:
            jobs = list(self._jobs)
            self._jobs.clear()
        for conn, job in jobs:
            self._dispatch(conn, job)

    def _run_timers(self) -> None:
        now = time.monotonic()
        due = []
        while self._timers and self._timers[0][0] <= now:
            when, _, conn = heapq.heappop(self._timers)
            if when == conn._timer_at:  # else superseded by an earlier one
                conn._timer_at = math.inf
                due.append(conn)
        for conn in due:
            self._dispatch(conn, conn._on_timer)

    @staticmethod
    def _dispatch(conn: ReceiverConnection, job: Callable[..., None], *args: Any) -> None:
        try:
            job(*args)
        except Exception:  # noqa: BLE001 - a bug in one connection ends that one only
            log.exception("shure %s: connection failed", conn.label)
            try:
                conn._finish()
            except Exception:  # noqa: BLE001
                log.exception("shure %s: not closed cleanly", conn.label)


os.register_at_fork(after_in_child=_hubs_after_fork)


# ---------------------------------------------------------------- one receiver

MAX_CHANNELS = 8  # the largest receivers have 4; a hostile "channel 99" makes no state
MAX_WINDOW = 1000  # samples folded per poll (10 per second for 100 s)
# Sent by ULX-D receivers and never by QLX-D ones (which share the dialect otherwise).
ULXD_ONLY_PROPERTIES = frozenset(
    {"HIGH_DENSITY", "AUDIO_SUMMING_MODE", "FREQUENCY_DIVERSITY_MODE", "RF_INT_DET", "AUDIO_MUTE"}
)


class ReceiverConnection:
    """A persistent connection to one receiver, run by its service's I/O thread (the hub;
    a connection made on its own gets a hub of its own)."""

    def __init__(
        self,
        host: str,
        port: int,
        settings: ShureSettings,
        address_problem: netpolicy.AddressCheck | None = None,
        hub: _Hub | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.settings = settings
        # Why an address may not be connected to (the device network policy); the service
        # hands over the app's current one on every poll. Without one, the defaults apply.
        self.address_problem = address_problem or netpolicy.device_checker({})
        self.label = f"{host}:{port}"
        self._hub = hub or _Hub()
        self._rng = random.Random()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._started = False
        self._probe_wanted = False
        self._synced = False  # this session's hello was answered
        # This session's GET MODEL: sent at, and answered (by REP MODEL, REP ERR or silence).
        self._identify_sent_at: float | None = None
        self._identified = False
        self.family: proto.Family | None = None
        self._ulxd_markers: set[str] = set()  # properties only a ULX-D (not a QLX-D) has
        self.errors = 0  # REP ERR answers
        # Only touched by the hub thread: the session and the connection's next deadline.
        self._sock: socket.socket | None = None
        self._parser: proto.FrameParser | None = None
        self._outbox = bytearray()
        self._send_stalled_at: float | None = None
        self._answered = False  # this session heard anything at all
        self._keepalive_sent = 0.0
        self._attempt = 0
        self._timer_at = math.inf
        # Guarded by _cond:
        self.state = "idle"  # idle | connecting | connected | backoff | stopped
        self._connecting = False  # a connector thread is opening a socket for it
        self.connects = 0
        self.failures = 0
        # When the attempt (or session) behind the last failure began: a poll is answered
        # "down" only by a failure that began after it asked, not by an attempt under way
        # from before the receiver came back.
        self.failed_attempt_began = 0.0
        self._attempt_began = 0.0
        self.frames = 0
        self.last_error = ""
        self.next_attempt_at = 0.0
        self.last_frame_at = 0.0
        self.probe_reply_at = 0.0
        self.last_used = time.monotonic()
        self.model = self.firmware = self.device_id = ""
        self.channels: dict[int, ChannelState] = {}
        # Told of what the receiver pushes (services.meters.MeterPump), from the hub thread.
        self.listener: Any = None

    # -- used by fetch (any thread)

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._hub.join(self)
        self._hub.call(self, self._attempt_connect)

    def stop(self, wait: float | None = None) -> None:
        """Close the connection; wait up to `wait` seconds (a connect under way ends within
        connect_timeout) until its socket is closed."""
        self._stop.set()
        if not self._started:
            self._set(state="stopped")
            return
        self._hub.call(self, self._finish)
        if wait is None:
            wait = self.settings.connect_timeout + 1.0
        if wait <= 0 or self._hub.on_thread():
            return
        deadline = time.monotonic() + wait
        with self._cond:
            while self.state != "stopped" or self._connecting:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    @property
    def alive(self) -> bool:
        return self._started and not self._stop.is_set() and self.state != "stopped"

    def request_probe(self) -> None:
        """Ask for a round-trip now."""
        with self._cond:
            self.last_used = time.monotonic()
            self._probe_wanted = True
        if self._started:
            self._hub.call(self, self._on_probe)

    def wait_fresh(self, since: float, deadline: float) -> bool:
        """Wait until the receiver answered after `since`; False when it can't before the
        deadline (down, refused, hung)."""
        with self._cond:
            while True:
                if self.probe_reply_at >= since and self.state == "connected":
                    return True
                if self.state == "stopped":
                    return False
                if self.state == "backoff" and (
                    self.failed_attempt_began >= since or self.next_attempt_at >= deadline
                ):
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)

    def snapshot(self, fresh: bool, close: bool = True) -> ReceiverSnapshot:
        """What the receiver said. A poll's snapshot (`close`) folds the samples since the
        last poll into its antenna and quality; a look in between (a pushed change, the
        snapshot shared with other processes) leaves the window open for the next poll."""
        with self._cond:
            return ReceiverSnapshot(
                host=self.host,
                port=self.port,
                connected=self.state == "connected",
                fresh=fresh,
                model=self._model_name(),
                firmware=self.firmware,
                device_id=self.device_id,
                family=self._family().label if self.family else "",
                channels=self._channel_states(close),
                channel_names={n: ch.name for n, ch in self.channels.items()},
                tx_types={n: ch.tx_type for n, ch in self.channels.items()},
            )

    def status(self) -> ConnectionStatus:
        with self._cond:
            return ConnectionStatus(
                self.host,
                self.port,
                self.state,
                self.connects,
                self.failures,
                self.frames,
                self.last_error,
                self.errors,
                self._family().code if self.family else "",
            )

    def _family(self) -> proto.Family:
        """ULX-D until told otherwise; a ULX-D without any ULX-D-only property is a QLX-D."""
        family = self.family or proto.ULXD
        if family is proto.ULXD and self._is_qlxd():
            return proto.QLXD
        return family

    def _is_qlxd(self) -> bool:
        if any(ch.tx_type.upper().startswith("QLXD") for ch in self.channels.values()):
            return True
        return not self._ulxd_markers and len(self.channels) == 1

    def _model_name(self) -> str:
        if self.model or self.family is None or self.family.sample_layout != "ulxd":
            return self.model
        return proto.ulxd_model_name(len(self.channels), self._is_qlxd())

    def _channel_states(self, close: bool = True) -> dict[int, dict[str, Any]]:
        states = {}
        for number, channel in sorted(self.channels.items()):
            if close or len(channel.antennas_seen) >= MAX_WINDOW:
                channel.close_window()
                states[number] = channel.state()
            else:
                # state() reads the last poll's antenna and quality, never the open window,
                # so the window is only peeked at: no copy of the channel per look.
                states[number] = channel.state()
                peek = merge_antennas(channel.antennas_seen)
                if peek is not None:
                    states[number]["antenna"] = peek
                if channel.qualities_seen:
                    states[number]["quality"] = min(channel.qualities_seen)
        return states

    def _set(self, **values: Any) -> None:
        with self._cond:
            for name, value in values.items():
                setattr(self, name, value)
            self._cond.notify_all()

    # -- the hub thread

    def _idle(self, now: float | None = None) -> bool:
        return (now or time.monotonic()) - self.last_used > self.settings.idle_timeout

    def _attempt_connect(self) -> None:
        if self._stop.is_set() or self._idle():
            self._finish()
            return
        with self._cond:
            self.state = "connecting"
            self._connecting = True
            self._attempt_began = time.monotonic()
            self._cond.notify_all()
        self._hub.connectors.submit(self._connect_elsewhere)

    def _connect_elsewhere(self) -> None:
        """In a connector thread: open the socket, hand it (or why not) to the hub."""
        result: socket.socket | Exception
        try:
            result = self._connect()
        except Exception as exc:  # noqa: BLE001 - OSError, DestinationError, or a bug: retried
            result = exc
        self._hub.call(self, lambda: self._connected(result))

    def _connect(self) -> socket.socket:
        """Resolve once, check every address, connect to one of those: a name that starts
        resolving elsewhere (DNS rebinding) cannot slip a different address in between."""
        addresses = netpolicy.checked_addresses(self.host, self.port, self.address_problem)
        return netpolicy.connect(addresses, self.port, self.settings.connect_timeout)

    def _connected(self, result: socket.socket | Exception) -> None:
        with self._cond:
            self._connecting = False
            self._cond.notify_all()
        if isinstance(result, socket.socket):
            if self._stop.is_set() or self.state == "stopped" or self._idle():
                result.close()
                self._finish()
            else:
                self._begin_session(result)
            return
        if self._stop.is_set() or self.state == "stopped":
            self._finish()
            return
        if isinstance(result, netpolicy.DestinationError):
            refused = isinstance(result, netpolicy.DestinationRefused)
            reason = f"{'refused' if refused else 'lookup failed'}: {result}"
            if refused and reason != self.last_error:  # once, not every back-off
                log.warning("shure %s: not connecting: %s", self.label, result)
            self._failed(reason, began=self._attempt_began)
        else:
            if not isinstance(result, OSError):
                log.error("shure %s: connecting failed", self.label, exc_info=result)
            self._failed(f"connect: {result}", began=self._attempt_began)
        self._retry(healthy=False)

    def _failed(self, reason: str, began: float | None = None) -> None:
        """Count a failure of the attempt that began at `began` (a lost session: now)."""
        log.debug("shure %s: %s", self.label, reason)
        with self._cond:
            self.failures += 1
            self.failed_attempt_began = time.monotonic() if began is None else began
            self.last_error = reason
            self.state = "backoff"
            # Not scheduled yet: _retry (or _finish) right after this sets the next attempt
            # and wakes the waiting polls, which then know whether it comes in time.
            self.next_attempt_at = 0.0

    def _retry(self, healthy: bool) -> None:
        """After a failed connect or a lost session: back off, then connect again."""
        if self._stop.is_set() or self._idle():
            self._finish()
            return
        self._attempt = 1 if healthy else self._attempt + 1
        delay = backoff_delay(
            self._attempt, self.settings.backoff_initial, self.settings.backoff_max, self._rng
        )
        self._set(state="backoff", next_attempt_at=time.monotonic() + delay)
        self._arm()

    def _begin_session(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._parser = proto.FrameParser()
        self._outbox.clear()
        self._send_stalled_at = None
        self._answered = False
        self._keepalive_sent = 0.0
        now = time.monotonic()
        with self._cond:
            self.connects += 1
            self.last_frame_at = now
            self._synced = False
            self._identified = False
            self._identify_sent_at = now
            self._probe_wanted = False  # the hello below answers any pending probe
            self.state = "connected"
            self._cond.notify_all()
        self._hub.watch(sock, self, writing=False)
        # Alone, so that a REP ERR can only be its answer.
        self._send(proto.format_get("MODEL"))
        self._arm()

    def _lost(self, reason: str) -> None:
        """The session ended badly: count it, close it, back off."""
        self._failed(reason)
        answered = self._answered
        self._close_session()
        self._retry(healthy=answered)

    def _close_session(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            self._hub.unwatch(sock)
            sock.close()
        self._parser = None
        self._outbox.clear()
        self._send_stalled_at = None

    def _finish(self) -> None:
        """Stopped (asked to, idle, or a bug): close the socket and leave the hub."""
        self._close_session()
        if self.state != "stopped":
            if self._idle():
                log.info("shure %s: no poll asked about it for a while; closed", self.label)
            self._set(state="stopped")
        self._timer_at = math.inf  # its pending deadline, if any, is dropped when it comes up
        self._hub.leave(self)

    def _arm(self) -> None:
        """Schedule the next deadline of the connection's state."""
        if self._sock is not None:
            settings = self.settings
            due = self.last_frame_at + settings.silence_timeout  # the watchdog
            if self._keepalive_sent < self.last_frame_at:
                due = min(due, self.last_frame_at + settings.silence_timeout / 2)
            if not self._identified:
                due = min(due, (self._identify_sent_at or 0.0) + settings.identify_timeout)
            if self._send_stalled_at is not None:
                due = min(due, self._send_stalled_at + settings.connect_timeout)
            due = min(due, self.last_used + settings.idle_timeout)
        elif self.state == "backoff":
            due = self.next_attempt_at
        else:
            return
        self._hub.schedule(self, due)

    def _on_timer(self) -> None:
        now = time.monotonic()
        if self._sock is None:
            if self.state == "backoff":
                if now >= self.next_attempt_at:
                    self._attempt_connect()
                else:
                    self._arm()
            return
        if self._stop.is_set() or self._idle(now):
            self._finish()
            return
        if (
            self._send_stalled_at is not None
            and now - self._send_stalled_at >= self.settings.connect_timeout
        ):
            self._lost("send timed out (the receiver reads nothing)")
            return
        if not self._identified and (
            now - (self._identify_sent_at or 0.0) >= self.settings.identify_timeout
        ):
            # Some firmware ignores what it does not know rather than answer REP ERR.
            with self._cond:
                self._identify(None)
            self._send(self._hello())
            if self._sock is None:
                return
        silence = now - self.last_frame_at
        if silence >= self.settings.silence_timeout:
            self._lost(f"silent for {silence:.1f} s")
            return
        # Half-way to the watchdog, ask something: a receiver that meters nothing
        # (METER_RATE off or unsupported) still answers a GET.
        if silence >= self.settings.silence_timeout / 2 and self._keepalive_sent < (
            self.last_frame_at
        ):
            self._keepalive_sent = now
            self._send(proto.format_get("DEVICE_ID"))
            if self._sock is None:
                return
        self._arm()

    def _on_probe(self) -> None:
        if self._sock is None or not self._identified:
            return  # the hello, once identified, answers it
        with self._cond:
            wanted, self._probe_wanted = self._probe_wanted, False
        if wanted:
            # Until the receiver answered the hello (it may have been hung when we
            # connected), ask for everything again.
            self._send(proto.format_get("DEVICE_ID") if self._synced else self._hello())

    def _on_io(self, mask: int) -> None:
        if self._sock is not None and mask & selectors.EVENT_WRITE:
            self._flush()
        if self._sock is not None and mask & selectors.EVENT_READ:
            self._read()

    def _read(self) -> None:
        assert self._sock is not None and self._parser is not None
        try:
            data = recv_nowait(self._sock, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(f"{type(exc).__name__}: {exc}")
            return
        if not data:
            self._lost("closed by receiver")
            return
        frames = self._parser.feed(data)
        if frames:
            self._answered = True
            if self._apply(frames):
                self._send(self._hello())

    def _send(self, data: bytes) -> None:
        """Queue `data` and send what the socket takes now. The socket never blocks the hub:
        what it does not take waits for it to become writable, and a receiver that reads
        nothing for connect_timeout is dropped (as a blocking send with that timeout was)."""
        if self._sock is None:
            return
        self._outbox += data
        self._flush()

    def _flush(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            while self._outbox:
                sent = send_nowait(sock, self._outbox)
                del self._outbox[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._lost(f"{type(exc).__name__}: {exc}")
            return
        if self._outbox and self._send_stalled_at is None:
            self._send_stalled_at = time.monotonic()
            self._hub.watch(sock, self, writing=True)
            self._arm()
        elif not self._outbox and self._send_stalled_at is not None:
            self._send_stalled_at = None
            self._hub.watch(sock, self, writing=False)

    def _hello(self) -> bytes:
        """What an identified connection asks: everything, then meters on."""
        return (
            proto.format_get("ALL", 0)
            + proto.format_get("FW_VER")
            + proto.format_meter_rate(self.settings.meter_rate_ms)
            # Last, so its answer means every answer before it has arrived.
            + proto.format_get("DEVICE_ID")
        )

    def _channel(self, number: int) -> ChannelState:
        channel = self.channels.get(number)
        if channel is None:
            channel = self.channels[number] = ChannelState(number)
        return channel

    def _identify(self, model: str | None) -> None:
        """The answer to this session's GET MODEL (None: REP ERR or no answer)."""
        self._identified = True
        family = proto.family_for_model(model)
        if model is not None:
            self.model = proto.text_value(model)
        self.family = family or proto.ULXD
        log.debug("shure %s: %s (%s)", self.label, self.family.label, self.model or "no MODEL")

    def _apply(self, frames: Iterable[proto.Frame]) -> bool:
        """Apply frames; True when they identified the receiver (the hello is due)."""
        now = time.monotonic()
        identified_now = False
        # (channel, RF dBm, audio dBFS, quality, antenna, battery bars, TX on) per SAMPLE.
        samples: list[tuple] = []
        synced_before = self._synced
        changed = False
        with self._cond:
            for frame in frames:
                self.frames += 1
                self.last_frame_at = now
                if frame.kind == "ERR":
                    self.errors += 1
                    if not self._identified:
                        self._identify(None)
                        identified_now = True
                    else:
                        log.debug("shure %s: REP ERR", self.label)
                    continue
                if frame.kind == "SAMPLE":
                    if frame.channel and frame.channel <= MAX_CHANNELS and frame.key == "ALL":
                        channel = self._channel(frame.channel)
                        levels = self._apply_sample(channel, frame.values)
                        samples.append(
                            (frame.channel, *levels, channel.battery_bars, channel.tx_on)
                        )
                    continue
                if frame.kind != "REP":
                    continue
                if frame.channel is None:
                    if frame.key == "MODEL" and not self._identified:
                        self._identify(frame.value or "")
                        identified_now = True
                        continue
                    self._apply_device(frame)
                    # A DEVICE_ID is most often the answer to a probe, not news.
                    changed = changed or frame.key != "DEVICE_ID"
                elif 0 < frame.channel <= MAX_CHANNELS:
                    self._apply_channel(self._channel(frame.channel), frame)
                    changed = changed or frame.key != "METER_RATE"
            self._cond.notify_all()
            # Only what a synced session hears is a change of the receiver; the answers to
            # the hello are its first state, pushed once the hello is complete.
            pushed = self._synced and (changed or not synced_before)
        listener = self.listener
        if listener is not None and (pushed or samples):
            try:
                listener.pushed(self, pushed, samples)
            except Exception:  # noqa: BLE001 - the live view is best effort; the poll goes on
                log.exception("shure %s: pushed frames not handled", self.label)
        return identified_now

    def _apply_sample(
        self, channel: ChannelState, values: tuple[str, ...]
    ) -> tuple[float | None, float | None, int | None, str | None]:
        """Fold a SAMPLE into the channel; its (RF dBm, audio dBFS, quality, antenna) for the
        live meters."""
        if not channel.tx_on:
            # Without a transmitter the meters read the noise floor: nothing to report, and
            # the next transmitter's levels start afresh.
            channel.rf.reset()
            channel.audio.reset()
            return None, None, None, None
        sample = proto.parse_sample(self._family().sample_layout, values)
        if sample is None:
            return None, None, None, None  # truncated, or not this family's layout
        if sample.antenna is not None and len(channel.antennas_seen) < MAX_WINDOW:
            channel.antennas_seen.append(sample.antenna)
        if sample.quality is not None and len(channel.qualities_seen) < MAX_WINDOW:
            channel.qualities_seen.append(sample.quality)
        if sample.rf_dbm is not None:
            channel.rf.add(sample.rf_dbm)
        if sample.audio_dbfs is not None:
            channel.audio.add(sample.audio_dbfs)
        return sample.rf_dbm, sample.audio_dbfs, sample.quality, sample.antenna

    def _apply_device(self, frame: proto.Frame) -> None:
        value = frame.value or ""
        if frame.key == "MODEL":
            self.model = proto.text_value(value)
        elif frame.key == "FW_VER":
            self.firmware = proto.text_value(value)
        elif frame.key == "DEVICE_ID":
            self.device_id = proto.text_value(value)
            self.probe_reply_at = time.monotonic()
            self._synced = True
        elif frame.key in ULXD_ONLY_PROPERTIES:
            self._ulxd_markers.add(frame.key)

    def _apply_channel(self, channel: ChannelState, frame: proto.Frame) -> None:
        if frame.key in ULXD_ONLY_PROPERTIES:
            self._ulxd_markers.add(frame.key)
        family = self._family()
        target = family.properties.get(frame.key)
        if target is None:
            return
        value = frame.value
        if target == "name":
            channel.name = proto.text_value(value)
        elif target == "tx_model":
            channel.tx_type = proto.text_value(value)
        elif target == "battery_bars":
            channel.battery_bars = proto.battery_bars(value)
        elif target == "battery_minutes":
            channel.battery_minutes = proto.battery_minutes(value)
        elif target == "frequency":
            channel.frequency_mhz = proto.frequency_mhz(value)
        elif target == "group_channel":
            channel.group_channel = proto.group_channel(value)
        elif target == "audio_gain":
            channel.audio_gain_db = proto.audio_gain_db(value)
        elif target == "audio_mute":
            channel.audio_muted = proto.on_off(value)
        elif target == "interference":
            channel.interference = proto.interference(value)
        elif target == "encryption_warning":
            channel.encryption_warning = proto.encryption_warning(value)
        elif target == "tx_offset":
            channel.tx_offset_db = proto.tx_offset_db(value, family.tx_offset_bias)
        elif target == "power_lock":
            channel.power_lock = proto.on_off(value)
        elif target == "menu_lock":
            channel.menu_lock = proto.on_off(value)
        elif target == "tx_lock":
            channel.lock = proto.tx_lock(value)
        elif target == "quality":
            channel.reported_quality = proto.ascii_int(value, 0, 5)
        elif target == "antenna":
            channel.reported_antenna = proto.antenna_text(value)


# ---------------------------------------------------------------- the service


class ShureService(ManufacturerService):
    code = SERVICE_CODE
    name = "Shure"

    def __init__(self, settings: ShureSettings | None = None) -> None:
        self.settings = settings or ShureSettings()
        self._connections: dict[tuple[str, int], ReceiverConnection] = {}
        self._lock = threading.Lock()
        self._hub = _Hub()  # one I/O thread for every connection of this service
        self.address_problem: netpolicy.AddressCheck = netpolicy.device_checker({})
        # Who this service is among every process's: the holder of its receivers' leases.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self.leases: Leases | None = None  # the app's (set by fetch); None: own everything
        self.pump = MeterPump(self.code, self.owner)
        self.pump.connections = self._owned
        self.pump.renew = self._renew
        self.pump.report = lambda snap, location_id: self.reports_for(snap, location_id)

    def configure(self, **changes: Any) -> ShureSettings:
        """Change settings; connections opened from now on use them (shutdown() to apply
        them to every connection)."""
        self.settings = replace(self.settings, **changes)
        return self.settings

    def _configure_from_app(self) -> None:
        from flask import current_app, has_app_context

        if not has_app_context():
            return
        from services.kv import kv

        app = current_app._get_current_object()
        if self.pump.app is not app or self.leases is None:
            self.pump.attach(app)
            self.leases = Leases(kv())
        self.address_problem = netpolicy.device_checker(current_app.config)
        changes = {
            attr: type(getattr(self.settings, attr))(current_app.config[key])
            for key, attr in CONFIG_KEYS.items()
            if current_app.config.get(key) is not None
        }
        if changes and any(getattr(self.settings, k) != v for k, v in changes.items()):
            self.configure(**changes)

    def connection(self, host: str, port: int) -> ReceiverConnection:
        """The connection to (host, port), started if there is none (or it ended)."""
        key = (host, int(port))
        with self._lock:
            conn = self._connections.get(key)
            if conn is None or not conn.alive:
                conn = ReceiverConnection(
                    host, int(port), self.settings, self.address_problem, hub=self._hub
                )
                conn.listener = self.pump
                self._connections[key] = conn
                conn.start()
                if self.pump.app is not None:
                    self.pump.start()
            conn.address_problem = self.address_problem  # the policy as configured now
            return conn

    def connection_problem(self, host: str, port: int) -> str | None:
        """Why the connection to (host, port) is down (its last error), if this process has
        one that is not connected."""
        with self._lock:
            conn = self._connections.get((host, int(port)))
        if conn is None:
            return None
        status = conn.status()
        return None if status.state == "connected" else (status.last_error or None)

    def fetch(self, endpoints, timeout: float) -> list[DeviceReport]:
        self._configure_from_app()
        targets = [
            (
                ep.host,
                int(ep.port or proto.DEFAULT_PORT),
                getattr(ep, "tenant_id", None),
                getattr(ep, "location_id", None),
            )
            for ep in endpoints
        ]
        started = time.monotonic()
        deadline = started + max(0.0, float(timeout))
        waiting = []
        elsewhere = []  # receivers another process owns: read from its shared snapshot
        owned = self._own_many([(host, port) for host, port, _, _ in targets])
        for (host, port, tenant_id, location_id), mine in zip(targets, owned, strict=True):
            if tenant_id is not None:
                self.pump.serve(host, port, tenant_id, location_id)
            if mine:
                conn = self.connection(host, port)
                conn.request_probe()
                waiting.append((conn, location_id))
            else:
                elsewhere.append((host, port, location_id))
        # The hub talks to every receiver at once; one shared deadline bounds the whole
        # wait, so a hung receiver costs at most `timeout`, once.
        fresh = [conn.wait_fresh(started, deadline) for conn, _ in waiting]
        reports: list[DeviceReport] = []
        used: set[str] = set()
        for (conn, location_id), ok in zip(waiting, fresh, strict=True):
            reports.extend(self.reports_for(conn.snapshot(ok), location_id, used))
        for host, port, location_id in elsewhere:
            snap = self._shared_snapshot(host, port, deadline)
            reports.extend(self.reports_for(snap, location_id, used))
        return reports

    # -- one connection per receiver for the whole deployment

    @staticmethod
    def _lease_key(host: str, port: int) -> str:
        return f"{SERVICE_CODE}:{host}:{port}"

    def _own_many(self, receivers: list[tuple[str, int]]) -> list[bool]:
        """Whether this process holds (or now takes) each receiver's lease, asked for all of
        them in one round trip."""
        if self.leases is None or not receivers:
            return [True] * len(receivers)
        keys = [self._lease_key(host, port) for host, port in receivers]
        try:
            held = self.leases.hold_many(keys, self.owner, self.settings.lease_seconds)
        except Exception as exc:  # noqa: BLE001 - Redis away: watch the receivers regardless
            # A second connection to a receiver for a while beats polls that see nothing.
            log.warning("shure: leases not checked (%s); connecting", exc)
            return [True] * len(receivers)
        for (host, port), mine in zip(receivers, held, strict=True):
            if not mine:
                self._let_go(host, port)
        return held

    def _let_go(self, host: str, port: int) -> None:
        """Another process owns the receiver: close ours, and ask the owner to keep its own."""
        key = self._lease_key(host, port)
        with self._lock:
            lost = self._connections.pop((host, int(port)), None)
        if lost is not None:  # taken over while this process was stalled: let it go
            log.info("shure %s: owned by another process now; closing", lost.label)
            lost.stop(wait=0)
            self.pump.forget(host, int(port))
        # The owner keeps its connection open while polls anywhere ask about it.
        self.leases.put("want:" + key, "1", self.settings.idle_timeout)

    def _shared_snapshot(self, host: str, port: int, deadline: float) -> ReceiverSnapshot:
        """The owner's view of a receiver, once it is recent enough to count as an answer."""
        key = "snap:" + self._lease_key(host, port)
        # The owner shares every SHARE_SECONDS what it heard; a live receiver speaks at
        # least every silence_timeout / 2 (meters, else the keepalive).
        window = self.settings.silence_timeout + 2 * SHARE_SECONDS
        last = ReceiverSnapshot(host=host, port=port)
        while True:
            raw = self.leases.get(key) if self.leases is not None else None
            if raw:
                data = json.loads(raw)
                snap = data["snap"]
                channels = {int(n): state for n, state in snap.pop("channels").items()}
                names = {int(n): v for n, v in snap.pop("channel_names").items()}
                tx_types = {int(n): v for n, v in snap.pop("tx_types").items()}
                fresh = snap["connected"] and time.time() - data["seen_at"] <= window
                snap.pop("fresh", None)
                last = ReceiverSnapshot(
                    **snap,
                    fresh=fresh,
                    channels=channels,
                    channel_names=names,
                    tx_types=tx_types,
                )
                if fresh:
                    return last
            if time.monotonic() >= deadline:
                return last
            time.sleep(0.05)

    def _owned(self) -> dict[tuple[str, int], ReceiverConnection]:
        with self._lock:
            return dict(self._connections)

    def _renew(self) -> None:
        """The pump's every-second round: renew leases, share snapshots (app context)."""
        leases = self.leases
        alive: list[tuple[tuple[str, int], ReceiverConnection, str]] = []
        for (host, port), conn in self._owned().items():
            key = self._lease_key(host, port)
            if not conn.alive:
                with self._lock:
                    if self._connections.get((host, port)) is conn:
                        del self._connections[(host, port)]
                self.pump.forget(host, port)
                if leases is not None:
                    leases.release(key, self.owner)
                continue
            if leases is None:
                continue
            snap = conn.snapshot(conn.state == "connected", close=False)
            seen_at = time.time() - (time.monotonic() - conn.last_frame_at)
            alive.append(((host, port), conn, snapshot_json(snap, seen_at)))
        if not alive:
            return
        outcomes = leases.renew_and_share(
            [(self._lease_key(*address), shared) for address, _, shared in alive],
            self.owner,
            self.settings.lease_seconds,
            2 * self.settings.lease_seconds,
        )
        for (address, conn, _), (held, wanted) in zip(alive, outcomes, strict=True):
            if not held:
                self._own_many([address])  # closes it (unless the lease came back)
            elif wanted:
                conn.last_used = time.monotonic()

    @staticmethod
    def reports_for(
        snap: ReceiverSnapshot, location_id: int | None = None, used: set[str] | None = None
    ) -> list[DeviceReport]:
        """One receiver report, plus one per channel with a transmitter switched on."""
        address = f"{snap.host}:{snap.port}"
        receiver_id = snap.device_id or address
        if used is not None:
            # Kept as it is: the poll tells receivers apart by address (services.devices),
            # so two receivers sharing a DEVICE_ID stay two devices.
            if receiver_id in used:
                log.warning("shure %s: DEVICE_ID %r is not unique", address, receiver_id)
            used.add(receiver_id)
        online = snap.connected and snap.fresh
        reports = [
            DeviceReport(
                api_device_id=receiver_id,
                kind="receiver",
                name=snap.device_id or f"{snap.model or 'Shure receiver'} {address}",
                model=snap.model,
                firmware=snap.firmware,
                ip_address=snap.host,
                port=snap.port,
                online=online,
                state={"family": snap.family} if snap.family else {},
                location_id=location_id,
            )
        ]
        if not online:
            # Its transmitters are not reported: unseen, they count as missed polls too.
            return reports
        for number, state in snap.channels.items():
            if not state["tx_on"]:
                continue
            name = snap.channel_names.get(number) or f"{receiver_id} ch{number}"
            reports.append(
                DeviceReport(
                    api_device_id=f"{receiver_id}/ch{number}",
                    kind="transmitter",
                    name=name,
                    model=snap.tx_types.get(number, ""),
                    ip_address=snap.host,
                    port=snap.port,
                    online=True,
                    state=dict(state),
                    location_id=location_id,
                    channel=number,
                )
            )
        return reports

    def status(self) -> list[ConnectionStatus]:
        with self._lock:
            conns = list(self._connections.values())
        return [conn.status() for conn in conns]

    def shutdown(self, release: bool = True) -> None:
        """Close every connection and wait for their sockets to close and the I/O thread
        to end (tests, CLI exit). With `release`, other processes may take the receivers
        over at once; without, only when the leases expire (as when a process dies)."""
        self.pump.stop()
        with self._lock:
            conns = list(self._connections.values())
            self._connections.clear()
        if release and self.leases is not None:
            for conn in conns:
                try:
                    self.leases.release(self._lease_key(conn.host, conn.port), self.owner)
                except Exception:  # noqa: BLE001 - Redis away: the lease expires on its own
                    log.warning("shure: lease of %s not released", conn.label)
        for conn in conns:
            conn.stop(wait=0)
        for conn in conns:
            conn.stop()
        # With its last connection gone the hub thread ends (a connect under way finishes
        # within connect_timeout).
        self._hub.wait_ended(self.settings.connect_timeout + 1.0)


service = register(ShureService())
