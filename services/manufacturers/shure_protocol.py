"""Shure command strings: the ASCII protocol of ULX-D, QLX-D and Axient Digital receivers.

Every message is one frame between `<` and `>`, tokens separated by spaces:

    < GET 1 CHAN_NAME >                       ask channel 1 for a property
    < GET 0 ALL >                             every property of the device and all channels
    < GET MODEL >                             a property of the device itself (no channel)
    < SET 1 METER_RATE 01000 >                change a property (meter every 1000 ms; 0 = off)
    < REP 1 CHAN_NAME {Lead Vocal   } >       a report: the answer to GET/SET, or a change
    < REP 1 BATT_BARS 004 >                   numbers are zero-padded ASCII
    < SAMPLE 1 ALL XB 045 032 >               a meter sample: antenna, RF level, audio level
    < REP ERR >                               the command was malformed or out of range

Strings are braced and space-padded to a fixed width. TCP is a byte stream: one read may hold
half a frame or several frames, and a line may carry noise, so `FrameParser` buffers, resyncs
on the next `<` and drops what is not a frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PORT = 2202
KINDS = ("REP", "GET", "SET", "SAMPLE")
NAME_WIDTH = 31  # CHAN_NAME and DEVICE_ID are padded to this many characters

# Longest frame and longest braced string we accept; longer means we are reading noise.
MAX_FRAME = 512
MAX_BRACED = 64

# Sentinels the receivers use for "no reading".
BATT_BARS_UNKNOWN = 255
BATT_MINUTES_MAX = 65532  # 65533 comm warning, 65534 calculating, 65535 unknown
NO_TRANSMITTER = frozenset({"", "UNKN", "UNKNOWN", "NONE", "NO_TX"})

# ULX-D metering offsets: the RF level is sent as dBm + 128, the audio level as dBFS + 50.
RF_OFFSET = 128
AUDIO_OFFSET = 50

_TOKEN = re.compile(r"\{([^{}]*)\}|([^\s{}]+)")
_CHANNEL = re.compile(r"\d{1,2}")


@dataclass(frozen=True)
class Frame:
    """One parsed message. `channel` is None for device properties, 0 for "all channels"."""

    kind: str  # REP, GET, SET, SAMPLE, or ERR for `< REP ERR >`
    key: str = ""
    channel: int | None = None
    values: tuple[str, ...] = ()

    @property
    def value(self) -> str | None:
        return self.values[0] if self.values else None

    def encode(self) -> bytes:
        if self.kind == "ERR":
            return b"< REP ERR >"
        return format_frame(self.kind, self.key, self.channel, *self.values)


# ---------------------------------------------------------------- formatting


def braced(text: str, width: int | None = NAME_WIDTH) -> str:
    """A string value: braces can't be escaped, so they are dropped; padded to `width`."""
    clean = re.sub(r"[{}\r\n<>]", "", text)
    if width is not None:
        clean = clean[:width].ljust(width)
    return "{" + clean + "}"


def number(value: int, digits: int) -> str:
    return f"{max(0, int(value)):0{digits}d}"


def format_frame(kind: str, key: str, channel: int | None = None, *values: str) -> bytes:
    """`format_frame("GET", "CHAN_NAME", 1)` -> b"< GET 1 CHAN_NAME >"."""
    if kind not in KINDS:
        raise ValueError(f"unknown frame kind {kind!r}")
    if not re.fullmatch(r"[A-Z0-9_]+", key):
        raise ValueError(f"bad property name {key!r}")
    parts = [kind]
    if channel is not None:
        parts.append(str(int(channel)))
    parts.append(key)
    parts.extend(values)
    return ("< " + " ".join(parts) + " >").encode("ascii", errors="replace")


def format_get(key: str, channel: int | None = None) -> bytes:
    return format_frame("GET", key, channel)


def format_set(key: str, value: str, channel: int | None = None) -> bytes:
    return format_frame("SET", key, channel, value)


def format_rep(key: str, value: str, channel: int | None = None) -> bytes:
    return format_frame("REP", key, channel, value)


def format_sample(channel: int, antenna: str, rf_raw: int, audio_raw: int) -> bytes:
    return format_frame("SAMPLE", "ALL", channel, antenna, number(rf_raw, 3), number(audio_raw, 3))


def format_meter_rate(milliseconds: int, channel: int = 0) -> bytes:
    return format_set("METER_RATE", number(milliseconds, 5), channel)


# ---------------------------------------------------------------- parsing


def parse_frame(body: str) -> Frame | None:
    """The text between `<` and `>`; None when it is not a frame we understand."""
    tokens = []
    for match in _TOKEN.finditer(body):
        braced_text, word = match.groups()
        # Padding belongs to the transport, not to the value.
        tokens.append(braced_text.strip() if braced_text is not None else word)
    if not tokens or tokens[0] not in KINDS:
        return None
    kind, rest = tokens[0], tokens[1:]
    if kind == "REP" and rest[:1] == ["ERR"]:
        return Frame(kind="ERR")
    channel = None
    if rest and _CHANNEL.fullmatch(rest[0]):
        channel = int(rest[0])
        rest = rest[1:]
    if not rest or not re.fullmatch(r"[A-Z][A-Z0-9_]*", rest[0]):
        return None
    return Frame(kind=kind, key=rest[0], channel=channel, values=tuple(rest[1:]))


def parse(text: str | bytes) -> list[Frame]:
    """Every complete frame in one piece of text (for tests and one-off replies)."""
    parser = FrameParser()
    return parser.feed(text.encode() if isinstance(text, str) else text)


class FrameParser:
    """Turns a TCP byte stream into frames, across reads; noise is skipped, never raised."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.garbage_bytes = 0

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buffer
        buf.extend(data)
        frames: list[Frame] = []
        pos = 0
        while True:
            start = buf.find(b"<", pos)
            if start < 0:
                self.garbage_bytes += len(buf) - pos
                buf.clear()
                return frames
            self.garbage_bytes += start - pos
            end, resume = self._scan(buf, start)
            if end is not None:
                frame = parse_frame(bytes(buf[start + 1 : end]).decode("utf-8", "replace"))
                if frame is None:
                    self.garbage_bytes += end + 1 - start
                else:
                    frames.append(frame)
                pos = end + 1
            elif resume is not None:
                # A broken frame: skip it and look for the next `<`.
                self.garbage_bytes += resume - start
                pos = resume
            else:
                # An unfinished frame: keep it for the next read.
                del buf[:start]
                return frames

    @staticmethod
    def _scan(buf: bytearray, start: int) -> tuple[int | None, int | None]:
        """(end, None) for a frame ending at `end`; (None, resume) for a broken one;
        (None, None) when the frame is not complete yet."""
        brace = None
        i = start + 1
        limit = min(len(buf), start + MAX_FRAME)
        while i < limit:
            c = buf[i]
            if c in (0x0D, 0x0A):  # line ends never occur inside a frame
                return None, i + 1
            if brace is not None:
                if c == 0x7D:  # }
                    brace = None
                elif i - brace > MAX_BRACED:
                    return None, start + 1
            elif c == 0x7B:  # {
                brace = i
            elif c == 0x3E:  # >
                return i, None
            elif c == 0x3C:  # <: the frame before it was cut off
                return None, i
            i += 1
        if limit - start >= MAX_FRAME:
            return None, start + 1
        return None, None


# ---------------------------------------------------------------- values


def parse_int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def battery_bars(text: str | None) -> int | None:
    """0-5 bars; None for 255 (no transmitter or unknown) or anything else out of range."""
    bars = parse_int(text)
    return bars if bars is not None and 0 <= bars <= 5 else None


def battery_minutes(text: str | None) -> int | None:
    """Run time left in minutes; None for the 65533-65535 sentinels."""
    minutes = parse_int(text)
    return minutes if minutes is not None and 0 <= minutes <= BATT_MINUTES_MAX else None


def frequency_mhz(text: str | None) -> float | None:
    """Frequencies are sent in kHz (`0578000` -> 578.0 MHz); 0 means not set."""
    khz = parse_int(text)
    return round(khz / 1000, 3) if khz else None


def transmitter_present(tx_type: str | None) -> bool:
    return (tx_type or "").strip().upper() not in NO_TRANSMITTER


def rf_dbm(raw: str | int | None) -> int | None:
    value = parse_int(raw) if isinstance(raw, str) else raw
    return None if value is None else value - RF_OFFSET


def audio_dbfs(raw: str | int | None) -> int | None:
    value = parse_int(raw) if isinstance(raw, str) else raw
    return None if value is None else value - AUDIO_OFFSET
