"""Shure command strings: the ASCII protocol of ULX-D, QLX-D, SLX-D and Axient Digital receivers.

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

The families share the framing but not the vocabulary: each names its properties and lays out
its SAMPLE line its own way (see `FAMILIES`). A receiver says which family it is by answering
`< GET MODEL >` (Axient Digital, SLX-D) or by answering it with `< REP ERR >` (ULX-D, QLX-D,
which have no MODEL property).
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
_ASCII_NUMBER = re.compile(r"[0-9]{1,7}")
_CHANNEL = re.compile(r"[0-9]{1,2}")  # ASCII: "\d" would take other scripts' digits
_KEY = re.compile(r"[A-Z][A-Z0-9_]*")
# The bytes that end or complicate a frame: its end, a cut-off frame, a brace, a line end.
_FRAME_STOP = re.compile(rb"[<>{\r\n]")


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


def _braced_tokens(body: str) -> list[str]:
    """The frame's words, a braced string being one word."""
    tokens = []
    for match in _TOKEN.finditer(body):
        braced_text, word = match.groups()
        # Padding belongs to the transport, not to the value.
        tokens.append(braced_text.strip() if braced_text is not None else word)
    return tokens


def _tokens(body: str) -> list[str]:
    """_braced_tokens(body), with str.split for the usual frame that has no brace: the same
    words (both split at Unicode whitespace), in a third of the time."""
    if "{" in body or "}" in body:
        return _braced_tokens(body)
    return body.split()


def parse_frame(body: str) -> Frame | None:
    """The text between `<` and `>`; None when it is not a frame we understand."""
    tokens = _tokens(body)
    if not tokens or tokens[0] not in KINDS:
        return None
    kind, rest = tokens[0], tokens[1:]
    if kind == "REP" and rest[:1] == ["ERR"]:
        return Frame(kind="ERR")
    channel = None
    if rest and _CHANNEL.fullmatch(rest[0]):
        channel = int(rest[0])
        rest = rest[1:]
    if not rest or not _KEY.fullmatch(rest[0]):
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
        (None, None) when the frame is not complete yet.

        Most frames hold no brace: when the first byte that matters is their `>`, one regex
        search (in C) finds it; the byte-by-byte walk, which understands braces and broken
        frames, is for the rest. A receiver's stream is mostly meter samples and REP lines,
        and the walk cost several microseconds a frame in Python."""
        stop = _FRAME_STOP.search(buf, start + 1, min(len(buf), start + MAX_FRAME))
        if stop is not None and buf[stop.start()] == 0x3E:
            return stop.start(), None
        return FrameParser._walk(buf, start)

    @staticmethod
    def _walk(buf: bytearray, start: int) -> tuple[int | None, int | None]:
        """_scan's answer, a byte at a time."""
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
    """ASCII digits only: Python's int() also reads other scripts' digits and 4,000-digit
    numbers, neither of which a receiver sends."""
    if text is None or not _ASCII_NUMBER.fullmatch(text):
        return None
    return int(text)


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


# ---------------------------------------------------------------- families
#
# Framing, REP ERR and GET ALL from Shure's command-string documents (pubs.shure.com
# command-strings ULXD and SLXD, Axient Digital command strings); property names and SAMPLE
# layouts as micboard and the Companion Shure module configure each family:
#
#   ULX-D / QLX-D  < SAMPLE x ALL aa bbb ccc >
#                  aa antenna LEDs (A/B lit, X dark), bbb RF 000-115 = dBm + 128,
#                  ccc audio 000-050 = dBFS + 50
#   Axient Digital < SAMPLE x ALL qual audBitmap audPeak audRms rfAntStats
#                                 rfBitmapA rfRssiA rfBitmapB rfRssiB [rfBitmapC rfRssiC …] >
#                  qual 0-5 (255 unknown); audio peak/RMS and RSSI 000-120 = dBFS/dBm + 120
#   SLX-D          < SAMPLE x ALL audPeak audRms rfRssi >, all 000-120 = dBFS/dBm + 120

ULXD_RF_OFFSET, ULXD_AUDIO_OFFSET = RF_OFFSET, AUDIO_OFFSET
WIDE_OFFSET = 120  # Axient Digital and SLX-D meters
QUALITY_UNKNOWN = 255
TX_OFFSET_UNKNOWN = 255
AUDIO_GAIN_OFFSET = 18  # AUDIO_GAIN 000-060 is -18 … +42 dB on every family

_ANTENNA = re.compile(r"[A-Z]{1,4}")
_GROUP_CHANNEL = re.compile(r"([0-9]{1,3}|--),([0-9]{1,3}|--)")


@dataclass(frozen=True)
class Family:
    """One family's vocabulary: which property means what, and its SAMPLE layout."""

    code: str
    label: str
    # property name -> the channel field it sets (see ChannelReading in shure.py)
    properties: dict[str, str]
    sample_layout: str  # "ulxd", "axient" or "slxd"
    tx_offset_bias: int = 0  # dB subtracted from TX_OFFSET


_COMMON = {
    "CHAN_NAME": "name",
    "FREQUENCY": "frequency",
    "AUDIO_GAIN": "audio_gain",
    "GROUP_CHAN": "group_channel",
    "GROUP_CHANNEL": "group_channel",
}

ULXD = Family(
    code="ulxd",
    label="ULX-D",
    properties={
        **_COMMON,
        "TX_TYPE": "tx_model",
        "BATT_BARS": "battery_bars",
        "BATT_RUN_TIME": "battery_minutes",
        "AUDIO_MUTE": "audio_mute",
        "RF_INT_DET": "interference",  # NONE | CRITICAL
        "ENCRYPTION_WARNING": "encryption_warning",  # OFF | ON
        "TX_OFFSET": "tx_offset",  # 0-21 dB, 255 unknown
        "TX_PWR_LOCK": "power_lock",  # OFF | ON | UNKN
        "TX_MENU_LOCK": "menu_lock",
    },
    sample_layout="ulxd",
)
# QLX-D speaks ULX-D's dialect minus mute, interference detection and the receiver extras.
QLXD = Family(
    code="qlxd",
    label="QLX-D",
    properties={k: v for k, v in ULXD.properties.items() if k not in ("AUDIO_MUTE", "RF_INT_DET")},
    sample_layout="ulxd",
)
AXIENT = Family(
    code="axient",
    label="Axient Digital",
    properties={
        **_COMMON,
        "TX_MODEL": "tx_model",
        "TX_BATT_BARS": "battery_bars",
        "TX_BATT_MINS": "battery_minutes",
        "AUDIO_MUTE": "audio_mute",
        "INTERFERENCE_STATUS": "interference",  # NONE | DETECTED
        "ENCRYPTION_STATUS": "encryption_warning",  # OK | ERROR
        "TX_OFFSET": "tx_offset",  # 0-32 = -12 … +20 dB, 255 unknown
        "TX_LOCK": "tx_lock",  # ALL | POWER | MENU | NONE | UNKNOWN
        "CHAN_QUALITY": "quality",  # 0-5, 255 unknown
        "ANTENNA_STATUS": "antenna",
    },
    sample_layout="axient",
    tx_offset_bias=12,
)
SLXD = Family(
    code="slxd",
    label="SLX-D",
    properties={
        **_COMMON,
        "TX_TYPE": "tx_model",
        "TX_MODEL": "tx_model",
        "TX_BATT_BARS": "battery_bars",
        "TX_BATT_MINS": "battery_minutes",
        # SLX-D+ adds these; plain SLX-D never sends them.
        "INTERFERENCE_STATUS": "interference",
        "ENCRYPTION_STATUS": "encryption_warning",
        "ANTENNA_STATUS": "antenna",
    },
    sample_layout="slxd",
)
FAMILIES = {family.code: family for family in (ULXD, QLXD, AXIENT, SLXD)}

# Receiver models per family (the MODEL answer of AD and SLX-D; inferred for ULX-D/QLX-D).
_MODEL_PREFIXES = (("AD", AXIENT), ("SLXD", SLXD), ("ULXD", ULXD), ("QLXD", QLXD))


def family_for_model(model: str | None) -> Family | None:
    text = (model or "").strip().upper()
    for prefix, family in _MODEL_PREFIXES:
        if text.startswith(prefix):
            return family
    return None


def ulxd_model_name(channels: int, is_qlxd: bool) -> str:
    """ULX-D and QLX-D have no MODEL property: name them by their channel count."""
    if is_qlxd:
        return "QLXD4"
    return {2: "ULXD4D", 4: "ULXD4Q"}.get(channels, "ULXD4")


@dataclass(frozen=True)
class Sample:
    """One SAMPLE line in common units; None where the line had no usable value."""

    antenna: str | None = None
    rf_dbm: int | None = None
    audio_dbfs: int | None = None
    audio_peak_dbfs: int | None = None
    quality: int | None = None


def ascii_int(text: str | None, low: int, high: int) -> int | None:
    """A zero-padded ASCII number within [low, high]; anything else (other scripts' digits,
    signs, huge numbers, sentinels outside the range) is None."""
    if text is None or not _ASCII_NUMBER.fullmatch(text):
        return None
    value = int(text)
    return value if low <= value <= high else None


def _offset(text: str | None, offset: int, high: int) -> int | None:
    raw = ascii_int(text, 0, high)
    return None if raw is None else raw - offset


def antenna_text(text: str | None) -> str | None:
    return text if text is not None and _ANTENNA.fullmatch(text) else None


def parse_sample(layout: str, values: tuple[str, ...]) -> Sample | None:
    """The values after `SAMPLE x ALL`, read with a family's layout; None when the line does not
    have that layout's shape (truncated, or another family's) or any of its meters is out of
    range: one broken field means the line cannot be trusted."""
    sample = _read_sample(layout, values)
    if sample is None or None in (sample.rf_dbm, sample.audio_dbfs):
        return None
    return sample


def _read_sample(layout: str, values: tuple[str, ...]) -> Sample | None:
    if layout == "ulxd":
        if len(values) != 3 or antenna_text(values[0]) is None:
            return None
        return Sample(
            antenna=values[0],
            rf_dbm=_offset(values[1], ULXD_RF_OFFSET, ULXD_RF_OFFSET),
            audio_dbfs=_offset(values[2], ULXD_AUDIO_OFFSET, ULXD_AUDIO_OFFSET),
        )
    if layout == "axient":
        # Two RSSI pairs, or four with quadversity on.
        if len(values) not in (9, 13) or antenna_text(values[4]) is None:
            return None
        rssi = [_offset(values[i], WIDE_OFFSET, WIDE_OFFSET) for i in range(6, len(values), 2)]
        quality = ascii_int(values[0], 0, QUALITY_UNKNOWN)
        peak = _offset(values[2], WIDE_OFFSET, WIDE_OFFSET)
        if None in rssi or quality is None or peak is None:
            return None
        return Sample(
            antenna=values[4],
            rf_dbm=max(rssi),  # diversity: the stronger antenna carries the signal
            audio_dbfs=_offset(values[3], WIDE_OFFSET, WIDE_OFFSET),
            audio_peak_dbfs=peak,
            quality=quality if quality <= 5 else None,
        )
    if layout == "slxd":
        if len(values) != 3 or antenna_text(values[0]) is not None:
            return None
        peak = _offset(values[0], WIDE_OFFSET, WIDE_OFFSET)
        if peak is None:
            return None
        return Sample(
            rf_dbm=_offset(values[2], WIDE_OFFSET, WIDE_OFFSET),
            audio_dbfs=_offset(values[1], WIDE_OFFSET, WIDE_OFFSET),
            audio_peak_dbfs=peak,
        )
    return None


def format_family_sample(layout: str, channel: int, sample: Sample) -> bytes:
    """A SAMPLE line as `layout`'s receivers send it (for the simulator)."""

    def wide(level: int | None) -> str:
        level = -WIDE_OFFSET if level is None else level
        return number(min(WIDE_OFFSET, max(0, level + WIDE_OFFSET)), 3)

    if layout == "ulxd":
        rf_dbm = -ULXD_RF_OFFSET if sample.rf_dbm is None else sample.rf_dbm
        audio_dbfs = -ULXD_AUDIO_OFFSET if sample.audio_dbfs is None else sample.audio_dbfs
        rf = min(115, max(0, rf_dbm + ULXD_RF_OFFSET))
        audio = min(50, max(0, audio_dbfs + ULXD_AUDIO_OFFSET))
        return format_sample(channel, sample.antenna or "XX", rf, audio)
    peak = sample.audio_peak_dbfs if sample.audio_peak_dbfs is not None else sample.audio_dbfs
    if layout == "slxd":
        values = (wide(peak), wide(sample.audio_dbfs), wide(sample.rf_dbm))
    else:
        quality = QUALITY_UNKNOWN if sample.quality is None else sample.quality
        antenna = sample.antenna or "XX"
        rssi_b = None if sample.rf_dbm is None else sample.rf_dbm - 6  # the farther antenna
        values = (
            number(quality, 3),
            "031",
            wide(peak),
            wide(sample.audio_dbfs),
            antenna,
            "031" if antenna[:1] != "X" else "000",
            wide(sample.rf_dbm),
            "031" if antenna[1:2] != "X" else "000",
            wide(rssi_b),
        )
    return format_frame("SAMPLE", "ALL", channel, *values)


def text_value(text: str | None, width: int = NAME_WIDTH) -> str:
    """A string property as shown: printable ASCII only, at most `width` characters."""
    return "".join(c for c in (text or "") if " " <= c <= "~").strip()[:width]


def group_channel(text: str | None) -> str | None:
    """`GROUP_CHAN 01,12` -> "1,12"; "--,--" (no group) and malformed values -> None."""
    match = _GROUP_CHANNEL.fullmatch((text or "").strip())
    if not match or "--" in match.groups():
        return None
    return f"{int(match.group(1))},{int(match.group(2))}"


def audio_gain_db(text: str | None) -> int | None:
    raw = ascii_int(text, 0, 60)
    return None if raw is None else raw - AUDIO_GAIN_OFFSET


def tx_offset_db(text: str | None, bias: int) -> int | None:
    raw = ascii_int(text, 0, 32)
    return None if raw is None else raw - bias


def on_off(text: str | None, on: str = "ON", off: str = "OFF") -> bool | None:
    value = (text or "").strip().upper()
    return True if value == on else False if value == off else None


def interference(text: str | None) -> bool | None:
    """ULX-D RF_INT_DET NONE/CRITICAL, Axient INTERFERENCE_STATUS NONE/DETECTED."""
    value = (text or "").strip().upper()
    if value in ("CRITICAL", "DETECTED"):
        return True
    return False if value == "NONE" else None


def encryption_warning(text: str | None) -> bool | None:
    """ULX-D ENCRYPTION_WARNING ON/OFF, Axient ENCRYPTION_STATUS ERROR/OK."""
    value = (text or "").strip().upper()
    if value in ("ON", "ERROR"):
        return True
    return False if value in ("OFF", "OK") else None


TX_LOCKS = ("all", "power", "menu", "none")


def tx_lock(text: str | None) -> str | None:
    value = (text or "").strip().lower()
    return value if value in TX_LOCKS else None


def combined_lock(power: bool | None, menu: bool | None) -> str | None:
    """ULX-D reports the power and menu locks apart; say it the way Axient does."""
    if power is None or menu is None:
        return None
    return {(True, True): "all", (True, False): "power", (False, True): "menu"}.get(
        (power, menu), "none"
    )
