"""Simulated Shure receivers: TCP servers that speak the command-string protocol.

`SimulatedReceiver` is one receiver (ULXD4D/ULXD4Q, QLXD4, SLXD4D, AD4D/AD4Q) on 127.0.0.1.
Like the real device it answers GET/SET with REP (and REP ERR for what its family does not
have: a ULX-D or QLX-D has no MODEL), sends an unsolicited REP when a property changes and a
SAMPLE per channel at each client's METER_RATE, each in its family's names and layout
(shure_protocol.FAMILIES); it serves several clients at once. Tests break it on purpose:
`drop()` (receiver down), `restore()`, `mute()` (accepts connections and never answers: hung),
`set_battery`, `tx_off`/`tx_on`, `rename`, `set_interference`.

`Fleet` runs N receivers and, every `tick` seconds, animates them with a seeded RNG: batteries
drain slowly, a transmitter rarely switches off (and soon comes back), a receiver more rarely
still drops and comes back. Meters move like a show's: speech-like audio, RF with fades.
`attach_endpoints` / `start_demo_fleet` register a fleet's addresses as
DeviceEndpoint rows so the Shure service polls them.

All socket work of a receiver happens in its one thread (a selector loop); the control methods
change the state under a lock and hand frames and socket operations to that thread.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.manufacturers import shure_protocol as proto

log = logging.getLogger(__name__)

MODELS: dict[str, dict[str, Any]] = {
    "ULXD4D": {"channels": 2, "firmware": "2.7.6", "tx": "ULXD2", "band": (470_000, 534_000)},
    "ULXD4Q": {"channels": 4, "firmware": "2.7.6", "tx": "ULXD1", "band": (534_000, 598_000)},
    "QLXD4": {"channels": 1, "firmware": "2.4.13", "tx": "QLXD2", "band": (606_000, 670_000)},
    "SLXD4D": {"channels": 2, "firmware": "2.0.15.2", "tx": "SLXD2", "band": (470_000, 514_000)},
    "AD4D": {"channels": 2, "firmware": "1.2.12", "tx": "AD2", "band": (470_000, 636_000)},
    "AD4Q": {"channels": 4, "firmware": "1.2.12", "tx": "AD1", "band": (470_000, 636_000)},
}
# Models the fleet picks from when none are named (the demo's mix).
FLEET_MODELS = ("ULXD4D", "ULXD4Q", "QLXD4", "AD4D", "AD4Q")
# How each family says "no transmitter".
NO_TX = {"ulxd": "UNKN", "qlxd": "UNKN", "slxd": "UNKNOWN", "axient": "UNKNOWN"}


def family_of(model: str) -> proto.Family:
    if model.startswith("QLXD"):
        return proto.QLXD
    return proto.family_for_model(model) or proto.ULXD


CHANNEL_NAMES = (
    "Lead Vocal",
    "Backing Vocal",
    "Guitar",
    "Bass",
    "Keys",
    "Presenter",
    "Pastor",
    "Choir L",
    "Choir R",
    "Lectern",
    "Handheld 1",
    "Handheld 2",
    "Lavalier 1",
    "Lavalier 2",
    "Host",
    "Guest",
)
FULL_MINUTES = 600  # a fresh battery pack: about ten hours


def bars_for(minutes: int) -> int:
    """Bars shown for a run time: 5 bars above 8 h, 1 bar below 2 h, 0 when empty."""
    if minutes <= 0:
        return 0
    return min(5, 1 + minutes * 5 // FULL_MINUTES)


@dataclass
class SimChannel:
    number: int
    name: str
    tx_type: str
    frequency_khz: int
    battery_minutes: int = FULL_MINUTES
    battery_bars: int = 5
    # Centre of the levels the samples scatter around (dBm, dBFS).
    rf_dbm: int = -65
    audio_dbfs: int = -25
    group_channel: str = "01,05"
    audio_gain_raw: int = 18  # 0 dB
    muted: bool = False
    interference: bool = False
    encryption_error: bool = False
    tx_offset_raw: int = 0
    antenna: str = "AB"  # steady: both antennas carry the signal
    # What the meters do between samples (see `levels`): a talker's phrases and pauses, a
    # slow RF drift and now and then a fade as the performer walks behind something.
    talking_until: float = 0.0
    quiet_until: float = 0.0
    fade_until: float = 0.0
    fade_depth: float = 0.0
    rf_drift: float = 0.0

    @property
    def tx_on(self) -> bool:
        return proto.transmitter_present(self.tx_type)

    def levels(self, now: float, rng: random.Random) -> tuple[int, int, int, str]:
        """(RF dBm, audio dBFS, audio peak dBFS, antennas) for a sample at `now` (seconds):
        speech-like audio - syllables of a few per second inside phrases of 1-6 s, with
        pauses at the room's noise - and RF that drifts slowly around the link's level and
        fades by 15-30 dB for a second or two about once a minute."""
        if now >= self.talking_until and now >= self.quiet_until:
            if rng.random() < 0.7:  # speaking again after a pause
                self.talking_until = now + rng.uniform(1.0, 6.0)
            else:
                self.quiet_until = now + rng.uniform(0.3, 2.5)
        if now < self.talking_until:
            syllable = abs(math.sin(now * math.pi * 3.7 + self.number)) * rng.uniform(0.6, 1.0)
            audio = self.audio_dbfs - 8 + 16 * syllable + rng.uniform(-3, 3)
        else:
            audio = -52 + rng.uniform(-4, 4)  # room noise into the capsule
        audio = max(-60.0, min(-1.0, audio))
        peak = min(0.0, audio + rng.uniform(3, 9))
        self.rf_drift = max(-6.0, min(6.0, self.rf_drift + rng.uniform(-0.6, 0.6)))
        if now >= self.fade_until and rng.random() < 0.004:  # a few samples a minute at 5/s
            self.fade_until = now + rng.uniform(0.6, 2.5)
            self.fade_depth = rng.uniform(15, 30)
        fading = now < self.fade_until
        rf = self.rf_dbm + self.rf_drift + rng.uniform(-2, 2) - (self.fade_depth if fading else 0)
        antenna = self.antenna
        if fading:  # diversity hops to whichever antenna still hears it
            antenna = rng.choice(("AX", "XB")) if len(antenna) == 2 else antenna
        return round(max(-115.0, rf)), round(audio), round(peak), antenna


@dataclass
class _Client:
    sock: socket.socket
    parser: proto.FrameParser = field(default_factory=proto.FrameParser)
    outbox: bytearray = field(default_factory=bytearray)
    meter_ms: dict[int, int] = field(default_factory=dict)
    next_sample: dict[int, float] = field(default_factory=dict)


class SimulatedReceiver:
    def __init__(
        self,
        model: str = "ULXD4D",
        *,
        device_id: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        firmware: str | None = None,
        channel_names: list[str] | None = None,
        seed: int | None = None,
        start: bool = True,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r} (have: {', '.join(MODELS)})")
        spec = MODELS[model]
        self.model = model
        self.family = family_of(model)
        self.firmware = firmware or spec["firmware"]
        self.device_id = device_id or f"{model}-{random.Random(seed).getrandbits(16):04X}"
        self.host = host
        self._rng = random.Random(seed)
        low, high = spec["band"]
        names = list(channel_names or ())
        self.channels: dict[int, SimChannel] = {}
        for number in range(1, spec["channels"] + 1):
            name = names[number - 1] if number <= len(names) else f"Channel {number}"
            self.channels[number] = SimChannel(
                number=number,
                name=name,
                tx_type=spec["tx"],
                frequency_khz=self._rng.randrange(low, high, 25),
                # Levels centred in the middle of a 10 dB step, like a steady real link.
                rf_dbm=self._rng.choice((-85, -75, -65, -55)),
                audio_dbfs=self._rng.choice((-35, -25, -15)),
                group_channel=f"{number:02d},{self._rng.randrange(1, 40):02d}",
                antenna="BB" if self.family is proto.AXIENT else "AB",
            )
        self._lock = threading.RLock()
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._clients: dict[socket.socket, _Client] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self.muted = False
        self.port = port
        self._thread: threading.Thread | None = None
        self._listen()
        if start:
            self.start()

    # ------------------------------------------------------------ lifecycle

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def start(self) -> SimulatedReceiver:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name=f"sim {self.device_id}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving for good and close every socket."""
        if self._thread is None:
            self._close_all()
            self._close_wake()
            return
        self._stopping = True
        self._wake()
        self._thread.join(timeout=5)
        self._thread = None

    def __enter__(self) -> SimulatedReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def drop(self) -> None:
        """The receiver goes down: close the listener and every connection."""
        self._run_in_loop(self._close_all)

    def restore(self) -> None:
        """The receiver comes back on the same port."""

        def reopen() -> None:
            if self._listener is None:
                self._listen()

        self._run_in_loop(reopen)

    def mute(self) -> None:
        """Hang: keep accepting connections and reading, never answer or sample."""
        self.muted = True

    def unmute(self) -> None:
        self.muted = False

    # ------------------------------------------------------------ controls

    def channel(self, number: int) -> SimChannel:
        try:
            return self.channels[number]
        except KeyError:
            raise ValueError(f"{self.model} has no channel {number}") from None

    def set_battery(self, ch: int, bars: int, minutes: int) -> None:
        with self._lock:
            channel = self.channel(ch)
            channel.battery_bars, channel.battery_minutes = int(bars), int(minutes)
            frames = self._battery_frames(channel)
        self._broadcast(frames)

    def tx_off(self, ch: int) -> None:
        with self._lock:
            channel = self.channel(ch)
            channel.tx_type = NO_TX[self.family.code]
            frames = [self._rep("tx_model", channel.tx_type, ch), *self._battery_frames(channel)]
        self._broadcast(frames)

    def tx_on(self, ch: int, tx_type: str | None = None) -> None:
        with self._lock:
            channel = self.channel(ch)
            channel.tx_type = tx_type or MODELS[self.model]["tx"]
            frames = [
                self._rep("tx_model", channel.tx_type, ch),
                *self._battery_frames(channel),
            ]
        self._broadcast(frames)

    def set_interference(self, ch: int, detected: bool = True) -> None:
        """The receiver detects (or no longer detects) interference on a channel."""
        with self._lock:
            channel = self.channel(ch)
            channel.interference = detected
            frames = [self._interference_frame(channel)]
        self._broadcast([f for f in frames if f])

    def rename(self, ch: int, name: str) -> None:
        with self._lock:
            channel = self.channel(ch)
            channel.name = proto.braced(name, None)[1:-1][: proto.NAME_WIDTH]
            frames = [proto.format_rep("CHAN_NAME", proto.braced(channel.name), ch)]
        self._broadcast(frames)

    def set_frequency(self, ch: int, mhz: float) -> None:
        with self._lock:
            channel = self.channel(ch)
            channel.frequency_khz = round(mhz * 1000)
            frames = [proto.format_rep("FREQUENCY", proto.number(channel.frequency_khz, 7), ch)]
        self._broadcast(frames)

    def drain_battery(self, ch: int, minutes: int = 1) -> None:
        with self._lock:
            channel = self.channel(ch)
            if not channel.tx_on:
                return
            channel.battery_minutes = max(0, channel.battery_minutes - minutes)
            channel.battery_bars = bars_for(channel.battery_minutes)
            frames = self._battery_frames(channel)
        self._broadcast(frames)

    # ------------------------------------------------------------ protocol

    def _name_for(self, target: str) -> str | None:
        """The family's property name for a reading (the first listed), if it has one."""
        for name, field_name in self.family.properties.items():
            if field_name == target and not (self.family is proto.SLXD and name == "TX_MODEL"):
                return name
        return None

    def _rep(self, target: str, value: str, channel: int) -> bytes:
        name = self._name_for(target)
        assert name is not None, f"{self.family.label} has no {target}"
        return proto.format_rep(name, value, channel)

    def _battery_frames(self, channel: SimChannel) -> list[bytes]:
        if channel.tx_on:
            bars, minutes = channel.battery_bars, channel.battery_minutes
        else:
            bars, minutes = proto.BATT_BARS_UNKNOWN, 65535
        return [
            self._rep("battery_bars", proto.number(bars, 3), channel.number),
            self._rep("battery_minutes", proto.number(minutes, 5), channel.number),
        ]

    def _interference_frame(self, channel: SimChannel) -> bytes | None:
        name = self._name_for("interference")
        if name is None or self.family is proto.SLXD:  # plain SLX-D does not detect it
            return None
        if name == "RF_INT_DET":
            value = "CRITICAL" if channel.interference else "NONE"
        else:
            value = "DETECTED" if channel.interference else "NONE"
        return proto.format_rep(name, value, channel.number)

    def _device_frames(self) -> list[bytes]:
        frames = []
        if self.family in (proto.AXIENT, proto.SLXD):
            # ULX-D and QLX-D have no MODEL property: GET MODEL gets REP ERR.
            frames.append(proto.format_rep("MODEL", proto.braced(self.model, None)))
        frames += [
            proto.format_rep("FW_VER", proto.braced(self.firmware, None)),
            proto.format_rep("DEVICE_ID", proto.braced(self.device_id)),
        ]
        if self.family is proto.ULXD:
            frames.append(proto.format_rep("HIGH_DENSITY", "OFF"))
        return frames

    def _channel_frames(self, channel: SimChannel, client: _Client) -> list[bytes]:
        n, family = channel.number, self.family
        frames = [
            proto.format_rep("CHAN_NAME", proto.braced(channel.name), n),
            self._rep("tx_model", channel.tx_type if channel.tx_on else NO_TX[family.code], n),
            *self._battery_frames(channel),
            proto.format_rep("FREQUENCY", proto.number(channel.frequency_khz, 7), n),
            proto.format_rep(
                "GROUP_CHANNEL" if family is proto.AXIENT else "GROUP_CHAN",
                channel.group_channel,
                n,
            ),
            proto.format_rep("AUDIO_GAIN", proto.number(channel.audio_gain_raw, 3), n),
            proto.format_rep("METER_RATE", proto.number(client.meter_ms.get(n, 0), 5), n),
        ]
        if family in (proto.ULXD, proto.AXIENT):
            frames.append(proto.format_rep("AUDIO_MUTE", "ON" if channel.muted else "OFF", n))
        interference = self._interference_frame(channel)
        if interference:
            frames.append(interference)
        tx_on = channel.tx_on
        if family in (proto.ULXD, proto.QLXD):
            frames += [
                proto.format_rep(
                    "ENCRYPTION_WARNING", "ON" if channel.encryption_error else "OFF", n
                ),
                proto.format_rep(
                    "TX_OFFSET", proto.number(channel.tx_offset_raw if tx_on else 255, 3), n
                ),
                proto.format_rep("TX_PWR_LOCK", "OFF" if tx_on else "UNKN", n),
                proto.format_rep("TX_MENU_LOCK", "OFF" if tx_on else "UNKN", n),
            ]
        elif family is proto.AXIENT:
            frames += [
                proto.format_rep(
                    "ENCRYPTION_STATUS", "ERROR" if channel.encryption_error else "OK", n
                ),
                proto.format_rep(
                    "TX_OFFSET", proto.number(channel.tx_offset_raw + 12 if tx_on else 255, 3), n
                ),
                proto.format_rep("TX_LOCK", "NONE" if tx_on else "UNKNOWN", n),
                proto.format_rep("CHAN_QUALITY", proto.number(5 if tx_on else 255, 3), n),
                proto.format_rep("ANTENNA_STATUS", channel.antenna if tx_on else "XX", n),
            ]
        return frames

    def _answer(self, client: _Client, frame: proto.Frame) -> list[bytes]:
        err = [b"< REP ERR >"]
        with self._lock:
            if frame.kind == "GET" and frame.key == "ALL":
                if frame.channel not in (None, 0, *self.channels):
                    return err
                wanted = [frame.channel] if frame.channel else list(self.channels)
                out = self._device_frames()
                for number in wanted:
                    out += self._channel_frames(self.channels[number], client)
                return out
            if frame.channel is None:
                if frame.kind != "GET":
                    return err
                lines = [f for f in self._device_frames() if proto.parse(f)[0].key == frame.key]
                return lines or err
            channels = list(self.channels) if frame.channel == 0 else [frame.channel]
            if any(n not in self.channels for n in channels):
                return err
            if frame.kind == "SET":
                if frame.key == "METER_RATE":
                    rate = proto.parse_int(frame.value)
                    if rate is None or not (rate == 0 or 100 <= rate <= 99999):
                        return err
                    for n in channels:
                        client.meter_ms[n] = rate
                        client.next_sample[n] = time.monotonic() + rate / 1000
                    return [
                        proto.format_rep("METER_RATE", proto.number(rate, 5), n) for n in channels
                    ]
                if frame.key == "CHAN_NAME" and frame.channel and frame.value is not None:
                    channel = self.channels[frame.channel]
                    channel.name = frame.value[: proto.NAME_WIDTH]
                    self._broadcast(
                        [proto.format_rep("CHAN_NAME", proto.braced(channel.name), channel.number)]
                    )
                    return []
                return err
            if frame.kind != "GET":
                return err
            out = []
            for n in channels:
                lines = [
                    line
                    for line in self._channel_frames(self.channels[n], client)
                    if proto.parse(line)[0].key == frame.key
                ]
                if not lines:
                    return err
                out += lines
            return out

    def _sample(self, channel: SimChannel) -> bytes:
        rng = self._rng
        if channel.tx_on:
            rf, audio, peak, antenna = channel.levels(time.monotonic(), rng)
            sample = proto.Sample(
                antenna=antenna,
                rf_dbm=rf,
                audio_dbfs=audio,
                audio_peak_dbfs=peak,
                quality=5
                if rf > channel.rf_dbm - 10
                else max(1, 5 - int(channel.rf_dbm - rf) // 8),
            )
        else:
            sample = proto.Sample(antenna="XX", rf_dbm=-118 + rng.randint(0, 4), audio_dbfs=-120)
        return proto.format_family_sample(self.family.sample_layout, channel.number, sample)

    # ------------------------------------------------------------ the loop thread

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(16)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self.port = listener.getsockname()[1]
        self._listener = listener
        if self._selector is not None:
            self._selector.register(listener, selectors.EVENT_READ, "listen")

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"!")
        except OSError:
            pass

    def _run_in_loop(self, job: Callable[[], None], timeout: float = 5.0) -> None:
        """Run `job` in the loop thread and wait for it (directly when there is no loop)."""
        thread = self._thread
        if thread is None or not thread.is_alive() or threading.current_thread() is thread:
            job()
            return
        done = threading.Event()

        def run() -> None:
            try:
                job()
            finally:
                done.set()

        self._jobs.put(run)
        self._wake()
        if not done.wait(timeout):
            raise TimeoutError(f"simulated receiver {self.device_id} did not respond")

    def _broadcast(self, frames: list[bytes]) -> None:
        if not frames:
            return
        data = b"".join(frames)

        def send() -> None:
            if self.muted:
                return
            for client in list(self._clients.values()):
                self._send(client, data)

        self._run_in_loop(send)

    def _send(self, client: _Client, data: bytes) -> None:
        if not data:
            return
        client.outbox.extend(data)
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        try:
            while client.outbox:
                sent = client.sock.send(client.outbox)
                del client.outbox[:sent]
        except BlockingIOError:
            if len(client.outbox) > 1_000_000:  # a client that stopped reading
                self._close_client(client.sock)
                return
        except OSError:
            self._close_client(client.sock)
            return
        if client.sock in self._clients and self._selector is not None:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.outbox else 0)
            self._selector.modify(client.sock, events, "client")

    def _close_client(self, sock: socket.socket) -> None:
        if self._clients.pop(sock, None) is None:
            return
        if self._selector is not None:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
        sock.close()

    def _close_all(self) -> None:
        for sock in list(self._clients):
            self._close_client(sock)
        if self._listener is not None:
            if self._selector is not None:
                try:
                    self._selector.unregister(self._listener)
                except (KeyError, ValueError):
                    pass
            self._listener.close()
            self._listener = None

    def _close_wake(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        self._clients[sock] = _Client(sock)
        assert self._selector is not None
        self._selector.register(sock, selectors.EVENT_READ, "client")

    def _read(self, sock: socket.socket) -> None:
        client = self._clients.get(sock)
        if client is None:
            return
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_client(sock)
            return
        frames = client.parser.feed(data)
        if self.muted:
            return
        if client.parser.garbage_bytes:
            client.parser.garbage_bytes = 0
            self._send(client, b"< REP ERR >")
        out: list[bytes] = []
        for frame in frames:
            out += self._answer(client, frame)
        self._send(client, b"".join(out))

    def _send_samples(self) -> float:
        """Send due samples; return seconds until the next one is due."""
        now = time.monotonic()
        next_due = now + 0.5
        for sock, client in list(self._clients.items()):
            for number, rate in client.meter_ms.items():
                if rate <= 0:
                    continue
                due = client.next_sample.get(number, now)
                if due <= now:
                    if not self.muted:
                        with self._lock:
                            data = self._sample(self.channels[number])
                        self._send(client, data)
                        if sock not in self._clients:
                            break
                    due = max(due + rate / 1000, now)
                    client.next_sample[number] = due
                next_due = min(next_due, due)
        return max(0.0, next_due - now)

    def _loop(self) -> None:
        selector = selectors.DefaultSelector()
        self._selector = selector
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        if self._listener is not None:
            selector.register(self._listener, selectors.EVENT_READ, "listen")
        try:
            while not self._stopping:
                wait = self._send_samples()
                for key, mask in selector.select(timeout=wait):
                    if key.data == "wake":
                        try:
                            while self._wake_r.recv(256):
                                pass
                        except (BlockingIOError, InterruptedError):
                            pass
                        while True:
                            try:
                                job = self._jobs.get_nowait()
                            except queue.Empty:
                                break
                            job()
                    elif key.data == "listen":
                        if self._listener is not None:
                            self._accept()
                    elif key.fileobj in self._clients:
                        sock = key.fileobj
                        if mask & selectors.EVENT_WRITE:
                            self._flush(self._clients[sock])
                        if mask & selectors.EVENT_READ and sock in self._clients:
                            self._read(sock)
        except Exception:  # noqa: BLE001 - a simulator bug must not leave sockets open
            log.exception("simulated receiver %s failed", self.device_id)
        finally:
            self._close_all()
            while True:  # let waiting callers go
                try:
                    self._jobs.get_nowait()()
                except queue.Empty:
                    break
                except Exception:  # noqa: BLE001
                    pass
            self._selector = None
            selector.close()
            self._close_wake()


# ---------------------------------------------------------------- a fleet


@dataclass
class FleetChances:
    """What happens per tick (probabilities), for the animation. The demo ticks every 5 s:
    a battery loses a minute about every minute (a fresh pack lasts its ten hours), a
    transmitter is switched off about once in three hours and back on within half a
    minute or so (a battery swap), and a receiver drops out about once in a day."""

    drain: float = 0.08  # per transmitter: one minute of battery gone
    tx_toggle: float = 0.0005  # per channel with a transmitter on: it switches off…
    tx_back: float = 0.2  # …and per tick off, it comes back (with a fresh battery)
    drop: float = 0.00006  # per receiver: it goes down…
    down_ticks: tuple[int, int] = (2, 6)  # …for this many ticks


def _port_if_free(host: str, port: int) -> int:
    """`port` when it can be listened on now, else 0 (any free port)."""
    if not 0 < port < 65536:
        return 0
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError:
        return 0
    finally:
        probe.close()
    return port


class Fleet:
    """N simulated receivers with a seeded life of their own."""

    def __init__(
        self,
        receivers: int = 4,
        *,
        seed: int | None = None,
        tick: float | None = None,
        models: list[str] | None = None,
        host: str = "127.0.0.1",
        chances: FleetChances | None = None,
        device_ids: list[str] | None = None,
        ports: list[int] | None = None,
    ) -> None:
        """`models` and `device_ids` name the first receivers' models and ids in turn (models
        cycle); the rest get seeded models and "SIM-<tag>-NN" ids. `ports` are the first
        receivers' preferred ports: one that is taken is replaced by a free one."""
        self.seed = seed
        self.rng = random.Random(seed)
        self.chances = chances or FleetChances()
        self.tick = tick
        self.ticks = 0
        self.history: list[tuple[int, str, str]] = []  # (tick, device id, what happened)
        self._down_until: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        tag = f"{self.rng.getrandbits(16):04X}"
        names = list(CHANNEL_NAMES)
        self.rng.shuffle(names)
        pool = models or list(FLEET_MODELS)
        self.receivers: list[SimulatedReceiver] = []
        ports = ports or []
        try:
            for index in range(receivers):
                model = pool[index % len(pool)] if models else self.rng.choice(pool)
                count = MODELS[model]["channels"]
                channel_names = [names[(index * 4 + i) % len(names)] for i in range(count)]
                self.receivers.append(
                    SimulatedReceiver(
                        model,
                        device_id=(
                            device_ids[index]
                            if device_ids and index < len(device_ids)
                            else f"SIM-{tag}-{index + 1:02d}"
                        ),
                        host=host,
                        port=_port_if_free(host, ports[index] if index < len(ports) else 0),
                        channel_names=channel_names,
                        seed=self.rng.getrandbits(32),
                    )
                )
        except BaseException:
            self.stop()
            raise
        if tick:
            self._thread = threading.Thread(target=self._animate, name="sim fleet", daemon=True)
            self._thread.start()

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [r.address for r in self.receivers]

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for receiver in self.receivers:
            receiver.stop()

    def _animate(self) -> None:
        assert self.tick
        while not self._stop.wait(self.tick):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - keep the fleet alive
                log.exception("fleet tick failed")

    def step(self) -> None:
        """One tick of the fleet's life (also callable directly, e.g. from tests)."""
        self.ticks += 1
        rng, chances = self.rng, self.chances
        for index, receiver in enumerate(self.receivers):
            if index in self._down_until:
                if self.ticks >= self._down_until[index]:
                    del self._down_until[index]
                    receiver.restore()
                    self.history.append((self.ticks, receiver.device_id, "restored"))
                continue
            if rng.random() < chances.drop:
                self._down_until[index] = self.ticks + rng.randint(*chances.down_ticks)
                receiver.drop()
                self.history.append((self.ticks, receiver.device_id, "dropped"))
                continue
            for number, channel in receiver.channels.items():
                if rng.random() < (chances.tx_toggle if channel.tx_on else chances.tx_back):
                    if channel.tx_on:
                        receiver.tx_off(number)
                        self.history.append((self.ticks, receiver.device_id, f"ch{number} off"))
                    else:
                        # A fresh battery with the transmitter that comes back.
                        receiver.tx_on(number)
                        receiver.set_battery(number, 5, FULL_MINUTES - rng.randint(0, 60))
                        self.history.append((self.ticks, receiver.device_id, f"ch{number} on"))
                elif channel.tx_on and rng.random() < chances.drain:
                    receiver.drain_battery(number)


# ---------------------------------------------------------------- endpoints for a fleet


def attach_endpoints(
    tenant_id: int,
    addresses: list[tuple[str, int]],
    *,
    location_id: int | None = None,
    service_code: str = "shure",
    retire_stale: bool = True,
) -> list:
    """Upsert DeviceEndpoint rows for simulated receivers (flushes; the caller commits).

    With `retire_stale`, the tenant's other enabled endpoints on these loopback hosts are
    disabled: they are receivers of an earlier simulator run (ephemeral ports), and polling
    them would only report failures.
    """
    from sqlalchemy import select

    from extensions import db
    from models.devices import DeviceEndpoint
    from services.manufacturers.endpoints import manufacturer_for, upsert_endpoint

    rows = [
        upsert_endpoint(tenant_id, host, port, service_code=service_code, location_id=location_id)[
            0
        ]
        for host, port in addresses
    ]
    if retire_stale:
        hosts = {host for host, _ in addresses if host.startswith("127.") or host == "localhost"}
        keep = {row.id for row in rows}
        manufacturer = manufacturer_for(service_code)
        stale = db.session.scalars(
            select(DeviceEndpoint).where(
                DeviceEndpoint.tenant_id == tenant_id,
                DeviceEndpoint.manufacturer_id == manufacturer.id,
                DeviceEndpoint.host.in_(hosts),
                DeviceEndpoint.enabled.is_(True),
            )
        )
        for row in stale:
            if row.id not in keep:
                row.enabled = False
        db.session.flush()
    return rows


DEMO_SEED = 2202
DEMO_HOST = "127.0.0.1"


def start_demo_fleet(app, receivers: int) -> Fleet | None:
    """The demo's receivers (`flask serve` with DEVICES_SIMULATOR_RECEIVERS > 0): a fleet with
    a fixed seed - the same device ids every run - attached to the demo tenant's main stage.
    Commits. None when the demo tenant does not exist (run `flask demo load`)."""
    from sqlalchemy import select

    from extensions import db
    from models.accounts import Tenant
    from models.devices import Location
    from services.demo import DEMO_TENANT

    with app.app_context():
        tenant = db.session.scalar(select(Tenant).where(Tenant.name == DEMO_TENANT))
        if tenant is None:
            log.warning(
                "no %r tenant: run `flask demo load` for the simulated receivers", DEMO_TENANT
            )
            return None
        location = db.session.scalar(
            select(Location).where(Location.tenant_id == tenant.id).order_by(Location.id)
        )
        from models.devices import DeviceEndpoint
        from services.demo import DEMO_RECEIVERS

        # The last run's addresses, in the order they were made: listening on them again
        # keeps Device settings to one endpoint per receiver instead of a new set per restart.
        previous_ports = list(
            db.session.scalars(
                select(DeviceEndpoint.port)
                .where(
                    DeviceEndpoint.tenant_id == tenant.id,
                    DeviceEndpoint.host == DEMO_HOST,
                    DeviceEndpoint.enabled.is_(True),
                )
                .order_by(DeviceEndpoint.id)
            )
        )
        # Its first receivers are the demo's own devices (`flask demo load` made their rows),
        # so the dashboard shows them come online rather than sit there never seen.
        fleet = Fleet(
            receivers,
            seed=DEMO_SEED,
            tick=5.0,
            models=[model for _, model in DEMO_RECEIVERS],
            device_ids=[device_id for device_id, _ in DEMO_RECEIVERS],
            host=DEMO_HOST,
            ports=previous_ports,
        )
        try:
            attach_endpoints(
                tenant.id, fleet.endpoints, location_id=location.id if location else None
            )
            db.session.commit()
        except BaseException:
            db.session.rollback()
            fleet.stop()
            raise
        finally:
            db.session.remove()
        return fleet
