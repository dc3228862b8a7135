"""Live meters and pushed changes of receivers, and who owns each receiver's connection.

A receiver pushes a REP line when a property changes and a SAMPLE per channel at the meter
rate. The process that owns a receiver's one connection (a lease: `Leases`) runs a
`MeterPump` that

- applies pushed changes through the poll's apply path within DEVICES_PUSH_DEBOUNCE_MS
  (services.devices.apply_pushed_reports: the usual device.updated events, one per burst of
  changes, never one per sample);
- sends each tenant's meters to its "meters" live topic every DEVICES_METER_FRAME_MS (as
  micboard does, ~50 ms), a frame of out-of-band <meter> swaps per receiver whose levels
  changed, keyed by the receiver, so a page that falls behind only ever gets the newest
  levels;
- folds the samples of each minute into a DeviceMeterMinute row (min/max of battery, RF
  and audio), written in one batch a minute;
- renews its leases, and shares each receiver's snapshot so that a poll in any other process
  reports what the owner sees without a second connection.

A process that dies stops renewing; after DEVICES_SHURE_LEASE_SECONDS the next poll anywhere
takes the receiver over. Embedded mode is one process: the lease is in memory and always its.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

log = logging.getLogger(__name__)

FRAME_MS = 50
PUSH_DEBOUNCE_MS = 150
HISTORY_DAYS = 14
DEVICE_MAP_SECONDS = 10.0  # how long the (receiver, channel) -> device id map is trusted
SHARE_SECONDS = 1.0  # how often the owner renews its leases and shares its snapshots


_NONE: dict[int, int] = {}

# ---------------------------------------------------------------- leases


_memory_lock = threading.Lock()
_memory: dict[str, tuple[str, float]] = {}  # key -> (value, expires at), this process's


class Leases:
    """Leases and shared snapshots in the app's kv: Redis in production, memory embedded."""

    RENEW = (
        "local v = redis.call('GET', KEYS[1]) "
        "if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end "
        "if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end "
        "return 0"
    )
    RELEASE = (
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
        "return 0"
    )

    # The owner's every-second round for one receiver: renew the lease and, only while it
    # is still the owner's, share the snapshot and say whether another process asked for it.
    RENEW_AND_SHARE = (
        "local v = redis.call('GET', KEYS[1]) "
        "if v and v ~= ARGV[1] then return {0, 0} end "
        "if v then redis.call('PEXPIRE', KEYS[1], ARGV[2]) "
        "else redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end "
        "redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4]) "
        "return {1, redis.call('EXISTS', KEYS[2])}"
    )

    def __init__(self, kv: Any) -> None:
        self.redis = getattr(kv, "redis", None)
        self.prefix = getattr(kv, "prefix", "") + "devices:"
        self._renew_and_share = self._renew = None
        if self.redis is not None:
            from events.live import PipelinedScript

            self._renew_and_share = PipelinedScript(self.redis, self.RENEW_AND_SHARE)
            self._renew = PipelinedScript(self.redis, self.RENEW)

    def renew_and_share(
        self, items: list[tuple[str, str]], owner: str, ttl: float, snapshot_ttl: float
    ) -> list[tuple[bool, bool]]:
        """For each (key, snapshot): (still held by `owner`, wanted by another process). A
        held lease is renewed and its snapshot shared; a lost one shares nothing. One round
        trip for every receiver the process owns (three each, before)."""
        if self._renew_and_share is not None:
            ms, snapshot_ms = max(1, int(ttl * 1000)), max(1, int(snapshot_ttl * 1000))
            p = self.prefix
            out = self._renew_and_share.run_many(
                (
                    [p + "lease:" + key, p + "want:" + key, p + "snap:" + key],
                    [owner, ms, snapshot, snapshot_ms],
                )
                for key, snapshot in items
            )
            return [(bool(held), bool(wanted)) for held, wanted in out]
        results = []
        for key, snapshot in items:
            held = self.hold(key, owner, ttl)
            if held:
                self.put("snap:" + key, snapshot, snapshot_ttl)
            results.append((held, held and self.get("want:" + key) is not None))
        return results

    def hold(self, key: str, owner: str, ttl: float) -> bool:
        """Take the lease, or renew it if it is `owner`'s; False if another holds it."""
        return self.hold_many([key], owner, ttl)[0]

    def hold_many(self, keys: list[str], owner: str, ttl: float) -> list[bool]:
        """hold() for each key, in one round trip (a poll asks for every receiver it reads:
        one round trip each was a hundred and more per poll)."""
        if self._renew is not None:
            ms = max(1, int(ttl * 1000))
            out = self._renew.run_many(
                ([self.prefix + "lease:" + key], [owner, ms]) for key in keys
            )
            return [bool(held) for held in out]
        return [self._hold_here(key, owner, ttl) for key in keys]

    def _hold_here(self, key: str, owner: str, ttl: float) -> bool:
        now = time.monotonic()
        with _memory_lock:
            held = _memory.get("lease:" + key)
            if held is not None and held[1] > now and held[0] != owner:
                return False
            _memory["lease:" + key] = (owner, now + ttl)
            return True

    def release(self, key: str, owner: str) -> None:
        if self.redis is not None:
            self.redis.eval(self.RELEASE, 1, self.prefix + "lease:" + key, owner)
            return
        with _memory_lock:
            held = _memory.get("lease:" + key)
            if held is not None and held[0] == owner:
                del _memory["lease:" + key]

    def put(self, key: str, value: str, ttl: float) -> None:
        if self.redis is not None:
            self.redis.set(self.prefix + key, value, px=max(1, int(ttl * 1000)))
            return
        with _memory_lock:
            _memory[key] = (value, time.monotonic() + ttl)

    def get(self, key: str) -> str | None:
        if self.redis is not None:
            raw = self.redis.get(self.prefix + key)
            return raw.decode() if isinstance(raw, bytes) else raw
        with _memory_lock:
            held = _memory.get(key)
        return held[0] if held is not None and held[1] > time.monotonic() else None


# ---------------------------------------------------------------- a minute of samples


@dataclass
class MinuteRange:
    samples: int = 0
    rf: list[float] = field(default_factory=list)  # [min, max]
    audio: list[float] = field(default_factory=list)
    battery: list[int] = field(default_factory=list)

    def add(self, rf: float | None, audio: float | None, bars: int | None) -> None:
        self.samples += 1
        for span, value in ((self.rf, rf), (self.audio, audio), (self.battery, bars)):
            if value is None:
                continue
            if span:
                span[0], span[1] = min(span[0], value), max(span[1], value)
            else:
                span[:] = [value, value]


def minute_of(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _battery_bars(bars: int | None) -> int | None:
    return bars if isinstance(bars, int) and 0 <= bars <= 5 else None  # 255: unknown


# ---------------------------------------------------------------- the pump


Address = tuple[str, int]


class MeterPump:
    """One per manufacturer service and process; runs its thread while it owns receivers."""

    def __init__(self, service_code: str, owner: str) -> None:
        self.service_code = service_code
        self.owner = owner
        self.app: Any = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Guarded by _lock:
        self.tenants: dict[Address, dict[int, int | None]] = {}  # -> {tenant: location}
        self.levels: dict[tuple[str, int, int], tuple[float | None, float | None]] = {}
        # Receivers with new levels since the last frames: only they get one.
        self.changed: set[tuple[str, int]] = set()
        self.dirty: dict[Address, float] = {}  # receiver -> when its first unapplied change came
        self.minutes: dict[tuple[str, int, int, datetime], MinuteRange] = {}
        # tenant id -> (when read, (host, port) -> channel -> transmitter device id)
        self.device_map: dict[int, tuple[float, dict[tuple[str, int], dict[int, int]]]] = {}
        self.device_map_at = 0.0
        # Set by the service: the owned connections, the snapshot maker, and the renewal.
        self.connections: Callable[[], dict[Address, Any]] = dict
        self.renew: Callable[[], None] = lambda: None
        self.report: Callable[[Any, int | None], list] = lambda snap, location_id: []
        self.frames_sent = 0
        self.pushes_applied = 0

    # -- configuration (any thread)

    def attach(self, app: Any) -> None:
        self.app = app

    def serve(self, host: str, port: int, tenant_id: int, location_id: int | None) -> None:
        with self._lock:
            self.tenants.setdefault((host, port), {})[tenant_id] = location_id

    def config(self, key: str, default: float) -> float:
        app = self.app
        value = app.config.get(key) if app is not None else None
        return float(default if value is None else value)

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="meter pump", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and forget what it gathered (its receivers are closed)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread = None
        with self._lock:
            self.tenants.clear()
            self.levels.clear()
            self.changed.clear()
            self.dirty.clear()
            self.minutes.clear()
            self.device_map.clear()

    def forget(self, host: str, port: int) -> None:
        """A receiver this process no longer owns: no more meters or pushes from it."""
        with self._lock:
            self.dirty.pop((host, port), None)
            for key in [k for k in self.levels if k[:2] == (host, port)]:
                del self.levels[key]
            self.changed.discard((host, port))

    # -- from connection threads

    def pushed(self, conn: Any, changed: bool, samples: list[tuple]) -> None:
        address = (conn.host, conn.port)
        now = time.monotonic()
        minute = minute_of(datetime.now(UTC))
        with self._lock:
            if changed:
                self.dirty.setdefault(address, now)
            for number, rf, audio, quality, antenna, bars, tx_on in samples:
                key = (conn.host, conn.port, number)
                if not tx_on:
                    self.levels.pop(key, None)
                    continue
                if rf is None and audio is None:
                    continue
                self.levels[key] = (rf, audio, quality, antenna)
                self.changed.add(address)
                bucket = self.minutes.get((*key, minute))
                if bucket is None:
                    bucket = self.minutes[(*key, minute)] = MinuteRange()
                bucket.add(rf, audio, _battery_bars(bars))
        if changed:
            self._wake.set()

    # -- the pump's thread

    def _run(self) -> None:
        next_share = 0.0
        history_minute = minute_of(datetime.now(UTC))
        while not self._stop.is_set():
            frame_s = self.config("DEVICES_METER_FRAME_MS", FRAME_MS) / 1000
            self._wake.wait(max(0.01, frame_s))
            self._wake.clear()
            if self._stop.is_set() or self.app is None:
                continue
            now = time.monotonic()
            current = minute_of(datetime.now(UTC))
            with self._lock:
                idle = not (self.changed or self.dirty)
            if idle and now < next_share and current <= history_minute:
                continue  # nothing to do: no app context, no session, 20 times a second
            try:
                with self.app.app_context():
                    try:
                        self.apply_pushed()
                        self.send_meters()
                        if now >= next_share:
                            next_share = now + SHARE_SECONDS
                            self.renew()
                        if current > history_minute:
                            history_minute = current
                            self.write_history(before=current)
                    finally:
                        from extensions import db

                        db.session.remove()
            except Exception:  # noqa: BLE001 - the pump must outlive a bad tick (DB, Redis down)
                log.exception("meter pump tick failed")
                self._stop.wait(1.0)

    def apply_pushed(self, force: bool = False) -> int:
        """Apply the receivers' pushed changes that have settled (app context)."""
        from services.devices import apply_pushed_reports

        debounce = self.config("DEVICES_PUSH_DEBOUNCE_MS", PUSH_DEBOUNCE_MS) / 1000
        now = time.monotonic()
        with self._lock:
            due = [a for a, at in self.dirty.items() if force or now - at >= debounce]
            for address in due:
                del self.dirty[address]
            tenants = {address: dict(self.tenants.get(address, {})) for address in due}
        if not due:
            return 0
        connections = self.connections()
        # Every settled receiver of a tenant in one transaction: one commit, one batch of
        # events for the handlers, however many receivers pushed in the same moment.
        by_tenant: dict[int, list] = {}
        addresses: dict[int, list] = {}
        for address in due:
            conn = connections.get(address)
            if conn is None:
                continue
            snap = conn.snapshot(True, close=False)
            if not snap.connected:
                continue  # going down is the poll's to count
            for tenant_id, location_id in tenants[address].items():
                by_tenant.setdefault(tenant_id, []).extend(self.report(snap, location_id))
                addresses.setdefault(tenant_id, []).append(address)
        applied = 0
        for tenant_id, reports in by_tenant.items():
            result = apply_pushed_reports(tenant_id, self.service_code, reports)
            if result is None:  # a poll is applying these receivers: try again shortly
                with self._lock:
                    for address in addresses[tenant_id]:
                        self.dirty.setdefault(address, now)
            else:
                applied += result
        self.pushes_applied += applied
        return applied

    def _devices(self, tenant_id: int, host: str, port: int) -> dict[int, int]:
        """The tenant's transmitter device ids at this receiver, by channel (app context).
        Read for all the tenant's receivers at once, and again after DEVICE_MAP_SECONDS."""
        from sqlalchemy import select

        from extensions import db
        from models.devices import Device
        from services.devices import _channel_of

        now = time.monotonic()
        if now - self.device_map_at > DEVICE_MAP_SECONDS:
            self.device_map = {}
            self.device_map_at = now
        loaded = self.device_map.get(tenant_id)
        # A receiver the map does not know yet (its devices were just provisioned) is
        # looked for again, at most once a second.
        if loaded is None or ((host, port) not in loaded[1] and now - loaded[0] > 1.0):
            tenant_map: dict[tuple[str, int], dict[int, int]] = {}
            rows = db.session.execute(
                select(Device.id, Device.api_device_id, Device.ip_address, Device.port).where(
                    Device.tenant_id == tenant_id, Device.kind == "transmitter"
                )
            )
            for device_id, api_id, ip_address, device_port in rows:
                channel = _channel_of(api_id)
                if channel is not None and ip_address:
                    tenant_map.setdefault((ip_address, device_port), {})[channel] = device_id
            loaded = self.device_map[tenant_id] = (now, tenant_map)
        tenant_map = loaded[1]
        return tenant_map.get((host, port), _NONE)

    def send_meters(self) -> int:
        """A frame per tenant and receiver whose levels changed since the last frames, with
        the newest levels of its metered channels; keyed by the receiver, so that where
        frames queue up for a slow page only each receiver's newest one goes out. (One frame
        of a whole tenant's channels, 20 times a second, carried ~300 KB a frame for 200
        receivers, of which a meter period's ~5 % had changed.)"""
        from flask import get_template_attribute

        from events.live import encode
        from services.live import bus, tenant_topic

        with self._lock:
            if not self.changed:
                return 0
            changed, self.changed = self.changed, set()
            levels = {key: value for key, value in self.levels.items() if key[:2] in changed}
            tenants = {address: dict(self.tenants.get(address, {})) for address in changed}
        by_receiver: dict[tuple[int, str, int], list[dict[str, Any]]] = {}
        for (host, port, number), (rf, audio, quality, antenna) in sorted(levels.items()):
            for tenant_id in tenants.get((host, port), {}):
                device_id = self._devices(tenant_id, host, port).get(number)
                if device_id is not None:
                    by_receiver.setdefault((tenant_id, host, port), []).append(
                        {
                            "id": device_id,
                            "rf": rf,
                            "audio": audio,
                            "quality": quality,
                            "antenna": antenna,
                        }
                    )
        meter_row = get_template_attribute("devices/_meters_push.html", "meter_row")
        frames = [
            (
                tenant_topic(tenant_id, "meters"),
                encode(f"meters-{host}-{port}", html="".join(str(meter_row(row)) for row in rows)),
            )
            for (tenant_id, host, port), rows in by_receiver.items()
        ]
        if frames:
            bus().publish_many(frames)
            self.frames_sent += len(frames)
        return len(frames)

    def write_history(self, before: datetime | None = None) -> int:
        """Write the minutes before `before` (all of them with None) in one batch."""
        from extensions import db

        with self._lock:
            done = [k for k in self.minutes if before is None or k[3] < before]
            ranges = {k: self.minutes.pop(k) for k in done}
            tenants = {address: dict(t) for address, t in self.tenants.items()}
        rows = []
        for (host, port, number, minute), span in ranges.items():
            for tenant_id in tenants.get((host, port), {}):
                device_id = self._devices(tenant_id, host, port).get(number)
                if device_id is None:
                    continue
                rows.append(
                    {
                        "tenant_id": tenant_id,
                        "device_id": device_id,
                        "minute": minute,
                        "samples": span.samples,
                        "rf_min": span.rf[0] if span.rf else None,
                        "rf_max": span.rf[1] if span.rf else None,
                        "audio_min": span.audio[0] if span.audio else None,
                        "audio_max": span.audio[1] if span.audio else None,
                        "battery_min": span.battery[0] if span.battery else None,
                        "battery_max": span.battery[1] if span.battery else None,
                    }
                )
        if rows:
            db.session.execute(_upsert_minutes(db.engine.dialect.name), rows)
            db.session.commit()
        return len(rows)


def _upsert_minutes(dialect: str):
    """INSERT … ON CONFLICT that merges a minute two owners both wrote (a hand-over)."""
    from sqlalchemy import func

    from models.device_meters import DeviceMeterMinute

    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert

        low, high = func.least, func.greatest
    else:
        from sqlalchemy.dialects.sqlite import insert

        low, high = func.min, func.max  # SQLite's scalar min()/max() of two values
    stmt = insert(DeviceMeterMinute.__table__)
    table, new = DeviceMeterMinute.__table__.c, stmt.excluded

    def merged(name: str, pick):
        return pick(func.coalesce(table[name], new[name]), func.coalesce(new[name], table[name]))

    return stmt.on_conflict_do_update(
        index_elements=["device_id", "minute"],
        set_={
            "samples": table.samples + new.samples,
            **{f"{n}_min": merged(f"{n}_min", low) for n in ("rf", "audio", "battery")},
            **{f"{n}_max": merged(f"{n}_max", high) for n in ("rf", "audio", "battery")},
        },
    )


def prune_history(now: datetime | None = None) -> int:
    """Delete meter minutes older than DEVICES_METER_HISTORY_DAYS (app context; commits)."""
    from flask import current_app
    from sqlalchemy import delete

    from extensions import db
    from models.device_meters import DeviceMeterMinute

    days = float(current_app.config.get("DEVICES_METER_HISTORY_DAYS") or HISTORY_DAYS)
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    result = db.session.execute(
        delete(DeviceMeterMinute).where(DeviceMeterMinute.minute < cutoff),
        execution_options={"synchronize_session": False},
    )
    db.session.commit()
    return result.rowcount or 0


def snapshot_json(snap: Any, seen_at: float) -> str:
    # A snapshot's fields are plain values and dicts of them, which json writes as they
    # are: dataclasses.asdict's deep copy cost more than the encoding, for every owned
    # receiver every SHARE_SECONDS.
    return json.dumps({"snap": vars(snap), "seen_at": seen_at}, separators=(",", ":"))
