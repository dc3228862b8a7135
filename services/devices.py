"""Devices: manufacturer services, polling, and the lifecycle those polls produce.

A `ManufacturerService` turns the receivers it can reach into `DeviceReport`s. `poll_service`
compares those reports with the tenant's devices and emits lifecycle events onto the spine:

    device.discovered  a device the tenant does not have yet
    device.online      a device that answers again
    device.offline     a device that missed DEVICES_OFFLINE_AFTER_MISSES polls in a row
    device.updated     changed fields, with old and new values
    device.synced      the run's counts, status, duration and error

The poll applies what it observed to the device rows in the transaction that writes these
events (fields, readings, online flag, and a new device when DEVICES_AUTO_PROVISION is on), and
numbers each device's state (`Device.state_version`, carried by the events as `version`). It
compares the next reports with that applied state, so a change is reported once however long
the handlers take; and a handler (tasks/devices.py: activity log, readings, alerts, live
cards) can tell an event older than the row, delivered late or again, and leave the row alone.
"""

from __future__ import annotations

import abc
import logging
import re
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace
from typing import Any

from flask import current_app
from sqlalchemy import bindparam, select, text, update

from events import emit
from events.outbox import deferred_emits
from extensions import db
from models.base import utcnow
from models.devices import (
    Device,
    DeviceEndpoint,
    DiscoveredDevice,
    Manufacturer,
    ServiceSyncLog,
)

log = logging.getLogger(__name__)

# The activity feed's live rows: the main feed's topic, and one per activity type (a page
# filtered by type takes only its own). Routine rows (a poll's bookkeeping) are left out of
# the main feed, on the page and live.
ACTIVITY_TOPIC = "activity"
ROUTINE_ACTIVITY_TYPES = ("sync",)
ACTIVITY_TYPE_NAME = re.compile(r"[a-z_]{1,48}")


ACTIVITY_PAGE_SIZE = 50  # rows a page of the activity feed shows


def activity_type_topic(activity_type: str) -> str:
    return f"activity-type-{activity_type}"


def activity_topics(activity_type: str) -> list[str]:
    """The live topics a new activity row of this type goes to."""
    topics = [] if activity_type in ROUTINE_ACTIVITY_TYPES else [ACTIVITY_TOPIC]
    if ACTIVITY_TYPE_NAME.fullmatch(activity_type):
        topics.append(activity_type_topic(activity_type))
    return topics


def activity_pushed_out(tenant_id: int, topic: str, row_id: int) -> int | None:
    """The row a page showing this topic's latest rows drops when row `row_id` arrives (the
    page keeps its size): the one a page's length below it, among the rows the topic shows."""
    from models.devices import ActivityLog

    stmt = select(ActivityLog.id).where(
        ActivityLog.tenant_id == tenant_id, ActivityLog.id <= row_id
    )
    if topic == ACTIVITY_TOPIC:
        stmt = stmt.where(ActivityLog.activity_type.not_in(ROUTINE_ACTIVITY_TYPES))
    else:
        stmt = stmt.where(ActivityLog.activity_type == topic.removeprefix(activity_type_topic("")))
    return db.session.scalar(
        stmt.order_by(ActivityLog.id.desc()).offset(ACTIVITY_PAGE_SIZE).limit(1)
    )


def activity_drops(tenant_id: int, topic: str, row_ids: list[int]) -> dict[int, int | None]:
    """activity_pushed_out() for many new rows of one tenant and topic (a batch's), in one
    query: the newest rows of the topic up to the last new one, a page's length beyond the
    new ones, give each new row the one a page's length below it. A row that other rows
    interleave so far that its answer lies beyond them is asked about on its own."""
    from models.devices import ActivityLog

    if not row_ids:
        return {}
    ids = sorted(set(row_ids))
    stmt = select(ActivityLog.id).where(
        ActivityLog.tenant_id == tenant_id, ActivityLog.id <= ids[-1]
    )
    if topic == ACTIVITY_TOPIC:
        stmt = stmt.where(ActivityLog.activity_type.not_in(ROUTINE_ACTIVITY_TYPES))
    else:
        stmt = stmt.where(ActivityLog.activity_type == topic.removeprefix(activity_type_topic("")))
    newest = list(
        db.session.scalars(
            stmt.order_by(ActivityLog.id.desc()).limit(ACTIVITY_PAGE_SIZE + len(ids))
        )
    )
    position = {row_id: index for index, row_id in enumerate(newest)}
    drops: dict[int, int | None] = {}
    for row_id in ids:
        index = position.get(row_id)
        if index is None:  # not the topic's (or not visible): ask as the single-row form does
            drops[row_id] = activity_pushed_out(tenant_id, topic, row_id)
        elif index + ACTIVITY_PAGE_SIZE < len(newest):
            drops[row_id] = newest[index + ACTIVITY_PAGE_SIZE]
        elif len(newest) < ACTIVITY_PAGE_SIZE + len(ids):
            drops[row_id] = None  # the topic has no row that far below it
        else:
            drops[row_id] = activity_pushed_out(tenant_id, topic, row_id)
    return drops


def in_maintenance_window(device: Device, at) -> bool:
    """A scheduled maintenance window covers the device at `at`: one for the device, its
    location, or the whole tenant."""
    from sqlalchemy import and_, or_

    from models.devices import MaintenanceWindow

    scope = [and_(MaintenanceWindow.location_id.is_(None), MaintenanceWindow.device_id.is_(None))]
    scope.append(MaintenanceWindow.device_id == device.id)
    if device.location_id is not None:
        scope.append(MaintenanceWindow.location_id == device.location_id)
    return (
        db.session.scalar(
            select(MaintenanceWindow.id)
            .where(
                MaintenanceWindow.tenant_id == device.tenant_id,
                MaintenanceWindow.ends_at > at,
                MaintenanceWindow.starts_at <= at,
                or_(*scope),
            )
            .limit(1)
        )
        is not None
    )


@dataclass
class Outage:
    start: Any
    end: Any | None  # None: still down

    def seconds(self, now) -> float:
        return ((self.end or now) - self.start).total_seconds()


def downtime(device: Device, since, now) -> tuple[float | None, list[Outage]]:
    """Uptime percentage since `since` and the outages in that time, newest first, read
    from the device's status rows in the activity log (what the poll saw; a pending spell
    of missed polls counts as up, as in Uptime Kuma). None when nothing is known."""
    from models.devices import ActivityLog

    rows = db.session.execute(
        select(ActivityLog.created_at, ActivityLog.details)
        .where(
            ActivityLog.device_id == device.id,
            ActivityLog.activity_type == "status",
            ActivityLog.created_at >= since,
        )
        .order_by(ActivityLog.id)
        .limit(10_000)
    ).all()
    before = db.session.execute(
        select(ActivityLog.details)
        .where(
            ActivityLog.device_id == device.id,
            ActivityLog.activity_type == "status",
            ActivityLog.created_at < since,
        )
        .order_by(ActivityLog.id.desc())
        .limit(1)
    ).scalar()
    known_from = since if before is not None else (rows[0][0] if rows else None)
    if known_from is None:
        return None, []
    outages: list[Outage] = []
    down_at = since if before is not None and _went_down(before) else None
    for at, details in rows:
        if _went_down(details):
            down_at = down_at or at
        elif down_at is not None:
            outages.append(Outage(down_at, at))
            down_at = None
    if down_at is not None:
        outages.append(Outage(down_at, None))
    period = (now - known_from).total_seconds()
    down = sum(o.seconds(now) for o in outages)
    percent = round(100.0 * max(0.0, period - down) / period, 2) if period > 0 else None
    return percent, list(reversed(outages))


def _went_down(details: Any) -> bool:
    new = (details or {}).get("new") if isinstance(details, dict) else None
    return isinstance(new, dict) and new.get("status") in ("offline", "unreachable")


# The device fields a report can change (state holds the live readings).
REPORTED_FIELDS = ("name", "model", "firmware", "ip_address", "port", "kind")
STATE_FIELDS = (
    "channel_name",
    "battery_bars",
    "battery_minutes",
    "tx_on",
    "frequency_mhz",
    # Not rf_level / audio_level: levels move with every word and every step the performer
    # takes; they are live meter frames and per-minute history (services/meters.py), never
    # a device.updated event or an activity row.
    # What operators watch besides battery and levels (families without one leave it out).
    "group_channel",
    "audio_gain_db",
    "audio_muted",
    "interference",
    "encryption_warning",
    "tx_offset_db",
    "tx_lock",
    # Not quality / antenna either: Axient's channel quality and the diversity antenna follow
    # every RF fade (a moving performer changes them several times a minute); they are live
    # in the meter frames, like the levels, and the card keeps what the last event stored.
    "family",
)

# Shure receivers report RF in dBm and audio in dBFS. Meters and charts show them as a share
# of a useful range: RF from the noise floor (-100 dBm) to a strong signal (-20 dBm), audio
# from -60 dBFS (silence, for a meter) to full scale.
RF_RANGE_DBM = (-100.0, -20.0)
AUDIO_RANGE_DBFS = (-60.0, 0.0)


def level_percent(value: float | None, low: float, high: float) -> float | None:
    if value is None:
        return None
    return round(max(0.0, min(100.0, (float(value) - low) / (high - low) * 100.0)), 1)


def rf_percent(dbm: float | None) -> float | None:
    return level_percent(dbm, *RF_RANGE_DBM)


def audio_percent(dbfs: float | None) -> float | None:
    return level_percent(dbfs, *AUDIO_RANGE_DBFS)


# What a device card reads of a device's state (templates/devices/_card.html).
CARD_STATE_KEYS = (
    "channel_name",
    "battery_bars",
    "battery_minutes",
    "rf_level",
    "audio_level",
    "interference",
    "encryption_warning",
    "audio_muted",
    "tx_lock",
    "group_channel",
    "quality",
    "antenna",
)
_NO_CARD_STATE = dict.fromkeys(CARD_STATE_KEYS)


def card_state(state: dict[str, Any] | None) -> dict[str, Any]:
    """A device's state with every key its card reads (None when not reported), so the card
    subscripts it: Jinja runs each `s.get(...)` through Context.call, whose bookkeeping made
    a dozen of them about a third of a card's render, and workers render a card per event."""
    return {**_NO_CARD_STATE, **state} if state else _NO_CARD_STATE


@dataclass
class DeviceReport:
    api_device_id: str
    kind: str
    name: str
    model: str = ""
    firmware: str = ""
    ip_address: str | None = None
    port: int | None = None
    online: bool = True
    state: dict[str, Any] = field(default_factory=dict)
    location_id: int | None = None
    channel: int | None = None  # a transmitter's receiver channel

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SyncResult:
    service_code: str
    device_count: int = 0
    online_count: int = 0
    error_count: int = 0
    status: str = "success"
    duration_seconds: float = 0.0
    error_message: str | None = None
    events: int = 0


class ManufacturerService(abc.ABC):
    """What every manufacturer integration provides."""

    code: str
    name: str

    @abc.abstractmethod
    def fetch(self, endpoints: list[DeviceEndpoint], timeout: float) -> list[DeviceReport]:
        """Reports for every device behind these endpoints; unreachable ones are offline."""

    def discover(self, tenant_id: int, timeout: float) -> list[DeviceReport]:
        return self.fetch(endpoints_for(tenant_id, self.code), timeout)


REGISTRY: dict[str, ManufacturerService] = {}


def register(service: ManufacturerService) -> ManufacturerService:
    REGISTRY[service.code] = service
    return service


def service_for(code: str) -> ManufacturerService:
    try:
        return REGISTRY[code]
    except KeyError:
        raise LookupError(
            f"No manufacturer service {code!r} (have: {', '.join(REGISTRY)})."
        ) from None


def endpoints_for(tenant_id: int, code: str) -> list[DeviceEndpoint]:
    return list(
        db.session.scalars(
            select(DeviceEndpoint)
            .join(Manufacturer, Manufacturer.id == DeviceEndpoint.manufacturer_id)
            .where(
                DeviceEndpoint.tenant_id == tenant_id,
                DeviceEndpoint.enabled.is_(True),
                Manufacturer.code == code,
            )
            .order_by(DeviceEndpoint.id)
        )
    )


def find_device(tenant_id: int, service_code: str, api_device_id: str) -> Device | None:
    """Devices are found by manufacturer code + api_device_id, never by name.

    Without autoflush: neither key changes after a device is created (and creating one
    flushes it), so the pending changes of a batch's earlier events need not be written
    first; the batch's one flush writes them all."""
    return find_devices(tenant_id, service_code, [api_device_id]).get(api_device_id)


def find_devices(tenant_id: int, service_code: str, api_device_ids) -> dict[str, Device]:
    """Many devices of one tenant and service by api_device_id, in one query."""
    ids = sorted(set(api_device_ids))
    if not ids:
        return {}
    with db.session.no_autoflush:
        rows = db.session.scalars(
            select(Device).where(
                Device.tenant_id == tenant_id,
                Device.manufacturer_id == _manufacturer_id(service_code),
                Device.api_device_id.in_(ids),
            )
        )
        return {device.api_device_id: device for device in rows}


def _manufacturer_id(service_code: str):
    # A subquery rather than a join: the device lookup then matches the
    # (tenant_id, manufacturer_id, api_device_id) unique index on all three columns; joined,
    # PostgreSQL may scan the tenant's devices and filter them, as it did right after a
    # discovery, before the new rows had statistics (0.6 ms for 500 devices, per event).
    return select(Manufacturer.id).where(Manufacturer.code == service_code).scalar_subquery()


def _event(topic: str, tenant_id: int, service_code: str, api_device_id: str | None, **data):
    payload = {"service_code": service_code, "device_id": api_device_id, **data}
    label = data.get("label") or f"{api_device_id} {topic.split('.')[-1]}"
    payload["label"] = label
    if topic in LOGGED_TOPICS:  # what an operator tails the process log for
        log.info("%s (tenant %s, %s)", label, tenant_id, service_code)
    emit(topic, tenant_id=tenant_id, entity="device", entity_id=data.get("pk"), payload=payload)


LOGGED_TOPICS = frozenset({"device.discovered", "device.online", "device.offline"})


def _diff(device: Any, report: DeviceReport) -> tuple[dict, dict]:
    old, new = {}, {}
    for name in REPORTED_FIELDS:
        value = getattr(report, name)
        if value not in (None, "") and getattr(device, name) != value:
            old[name], new[name] = getattr(device, name), value
    state = device.state or {}
    for name in STATE_FIELDS:
        if name in report.state and state.get(name) != report.state[name]:
            old[name], new[name] = state.get(name), report.state[name]
    return old, new


_local_polls: set[tuple[int, str]] = set()
_local_polls_lock = threading.Lock()


@contextmanager
def poll_lock(tenant_id: int, service_code: str) -> Iterator[bool]:
    """Whether this process may poll (tenant, service) now; held until the poll ends.

    Two overlapping polls of the same devices would both diff against the same state and
    emit every change twice (a long poll outlives the scheduler's per-tick claim, and a
    `flask devices poll` can start while workers poll). PostgreSQL: a session advisory lock
    on a connection of its own (freed if the process dies). SQLite, i.e. one process: a set.
    """
    if db.engine.dialect.name == "postgresql":
        key = zlib.crc32(f"devices.poll:{tenant_id}:{service_code}".encode())
        with db.engine.connect() as conn:
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
            conn.commit()  # the lock is the session's; no transaction stays open meanwhile
            try:
                yield bool(got)
            finally:
                if got:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
        return
    with _local_polls_lock:
        got = (tenant_id, service_code) not in _local_polls
        if got:
            _local_polls.add((tenant_id, service_code))
    try:
        yield got
    finally:
        if got:
            with _local_polls_lock:
                _local_polls.discard((tenant_id, service_code))


PUSH_LOCK_WAIT = 0.25


@contextmanager
def poll_lock_waiting(tenant_id: int, service_code: str, wait: float) -> Iterator[bool]:
    """poll_lock, tried again for up to `wait` seconds: applying a receiver's pushed change
    (apply_pushed_reports) holds it for milliseconds and must not make a poll skip its turn."""
    deadline = time.monotonic() + wait
    while True:
        with poll_lock(tenant_id, service_code) as mine:
            if mine or time.monotonic() >= deadline:
                yield mine
                return
        time.sleep(0.02)


def poll_service(tenant_id: int, service_code: str, *, progress=None) -> SyncResult:
    """Poll every endpoint of one service for one tenant and emit what changed.

    Writes a ServiceSyncLog from start to finish; commits as it goes. If another poll of the
    same tenant and service is running (any process), returns within PUSH_LOCK_WAIT seconds
    with status "skipped".
    """
    with poll_lock_waiting(tenant_id, service_code, PUSH_LOCK_WAIT) as mine:
        if not mine:
            log.info("poll of %s for tenant %s skipped: one is running", service_code, tenant_id)
            return SyncResult(service_code=service_code, status="skipped")
        # A poll emits an event per change, fifty or so per commit, and reads none back
        # before committing: written with one INSERT per commit rather than ORM objects.
        with deferred_emits():
            return _poll_service(tenant_id, service_code, progress=progress)


def _poll_service(tenant_id: int, service_code: str, *, progress=None) -> SyncResult:
    cfg = current_app.config
    started = time.monotonic()
    sync_log = ServiceSyncLog(tenant_id=tenant_id, service_code=service_code, status="running")
    db.session.add(sync_log)
    db.session.commit()
    result = SyncResult(service_code=service_code)
    try:
        service = service_for(service_code)
        endpoints = endpoints_for(tenant_id, service_code)
        reports = service.fetch(endpoints, timeout=cfg["DEVICES_POLL_TIMEOUT"])
        result.events = _apply_reports(tenant_id, service_code, reports, progress=progress)
        result.device_count = len(reports)
        result.online_count = sum(1 for r in reports if r.online)
        result.error_count = sum(1 for r in reports if not r.online and r.kind == "receiver")
        result.status = "partial" if result.error_count else "success"
    except Exception as exc:  # noqa: BLE001 - the run is recorded as failed, not lost
        db.session.rollback()
        log.exception("sync of %s for tenant %s failed", service_code, tenant_id)
        result.status, result.error_message = "failed", f"{type(exc).__name__}: {exc}"[:1000]
    result.duration_seconds = round(time.monotonic() - started, 3)
    sync_log = db.session.get(ServiceSyncLog, sync_log.id)
    sync_log.status = result.status
    sync_log.finished_at = utcnow()
    sync_log.device_count = result.device_count
    sync_log.online_count = result.online_count
    sync_log.error_count = result.error_count
    sync_log.duration_seconds = result.duration_seconds
    sync_log.error_message = result.error_message
    _event(
        "device.synced",
        tenant_id,
        service_code,
        None,
        label=f"{service_code} sync {result.status}: {result.online_count}/"
        f"{result.device_count} online",
        device_count=result.device_count,
        online_count=result.online_count,
        error_count=result.error_count,
        status=result.status,
        duration_seconds=result.duration_seconds,
        error_message=result.error_message,
        sync_log_id=sync_log.id,
    )
    db.session.commit()
    return result


def _apply_reports(tenant_id: int, service_code: str, reports: list[DeviceReport], progress) -> int:
    """Turn one poll's reports into device changes and the events that describe them.

    Commits every DEVICES_POLL_COMMIT_EVERY reports rather than after each: a fleet's poll is
    hundreds of reports, and a commit (with its outbox dispatch) per report made a poll of
    700 devices take over half a minute. "Seen" timestamps of a batch are one UPDATE."""
    cfg = current_app.config
    misses_for_offline = cfg["DEVICES_OFFLINE_AFTER_MISSES"]
    provision = bool(cfg["DEVICES_AUTO_PROVISION"])
    batch_size = max(1, cfg["DEVICES_POLL_COMMIT_EVERY"])
    manufacturer = db.session.scalar(select(Manufacturer).where(Manufacturer.code == service_code))
    known = {
        d.api_device_id: d
        for d in _device_rows(
            Device.tenant_id == tenant_id, Device.manufacturer_id == manufacturer.id
        )
    }
    # Devices found earlier and not added (auto-provisioning off): told once, when first
    # found, not at every poll.
    discovered = set(
        db.session.scalars(
            select(DiscoveredDevice.api_device_id).where(
                DiscoveredDevice.tenant_id == tenant_id,
                DiscoveredDevice.manufacturer_id == manufacturer.id,
            )
        )
    )
    found_again: list[str] = []
    now = utcnow()
    events = 0
    seen: set[str] = set()
    answered: list[int] = []
    pending: list[DeviceReport] = []
    provisioned: list[tuple[Device, DeviceReport]] = []
    applied: list[dict[str, Any]] = []

    def commit_batch() -> None:
        nonlocal events
        _write_applied(applied, answered, now)
        if found_again:
            db.session.execute(
                update(DiscoveredDevice)
                .where(
                    DiscoveredDevice.tenant_id == tenant_id,
                    DiscoveredDevice.manufacturer_id == manufacturer.id,
                    DiscoveredDevice.api_device_id.in_(found_again),
                )
                .values(last_seen=now),
                execution_options={"synchronize_session": False},
            )
            found_again.clear()
        if provisioned:
            db.session.flush()  # their ids, for the events (one INSERT for the batch)
            for device, report in provisioned:
                events += _discovered(tenant_id, service_code, report, device)
            provisioned.clear()
        db.session.commit()
        if progress:
            for done in pending:
                progress(done)
        pending.clear()

    reports = resolve_identities(reports, known)
    # Receivers that answered this poll, by address: a transmitter of one of them that the
    # poll does not mention is switched off (the receiver says so), not unreachable.
    answering = {(r.ip_address, r.port) for r in reports if r.kind == "receiver" and r.online}
    for report in reports:
        seen.add(report.api_device_id)
        device = known.get(report.api_device_id)
        if device is None:
            if report.online and provision:
                provisioned.append((_provision(tenant_id, manufacturer.id, report, now), report))
            elif report.online and report.api_device_id in discovered:
                found_again.append(report.api_device_id)
            elif report.online:
                discovered.add(report.api_device_id)
                db.session.add(_found(tenant_id, manufacturer.id, report, now))
                events += _discovered(tenant_id, service_code, report, None)
        elif report.online:
            answered.append(device.id)
            events += _apply_report(tenant_id, service_code, device, report, applied)
        else:
            events += _missed(tenant_id, service_code, device, misses_for_offline)
        pending.append(report)
        if len(pending) >= batch_size:
            commit_batch()
    # Known devices no report mentions any more count as missed too.
    for api_id, device in known.items():
        if api_id in seen:
            continue
        if device.kind == "transmitter" and (device.ip_address, device.port) in answering:
            answered.append(device.id)
            events += _apply_report(tenant_id, service_code, device, _switched_off(device), applied)
        else:
            events += _missed(tenant_id, service_code, device, misses_for_offline)
    commit_batch()
    return events


def _device_rows(*where) -> list[SimpleNamespace]:
    """Plain copies of device rows, for a poll to compare reports with: they outlive its
    batch commits, which expire ORM objects (a SELECT per device to reload them), and a
    Core row costs a fraction of an ORM instance to build (a poll reads every device of
    the tenant's service each time)."""
    return [
        SimpleNamespace(**row._mapping)
        for row in db.session.connection().execute(select(Device.__table__).where(*where))
    ]


READING_FIELDS = ("battery_bars", "battery_minutes", "rf_level", "audio_level")


def _switched_off(device: Any) -> DeviceReport:
    """What an answering receiver tells of a channel without a transmitter: it is off, and
    its last battery and levels are no longer readings (micboard shows such a slot as TX off,
    apart from a receiver that cannot be reached)."""
    return DeviceReport(
        api_device_id=device.api_device_id,
        kind=device.kind,
        name=device.name,
        ip_address=device.ip_address,
        port=device.port,
        state={"tx_on": False, **dict.fromkeys(READING_FIELDS)},
    )


# A changed device's row, marked seen in the same UPDATE: the "seen" UPDATE of the batch
# covers only the devices that answered without a change (two UPDATEs of a row are two new
# versions of it, with their index entries; a device event's share was about 40 µs).
_APPLY_REPORT = (
    Device.__table__.update()
    .where(Device.__table__.c.id == bindparam("device_pk"))
    .values({name: bindparam(name) for name in (*REPORTED_FIELDS, "state", "is_online")})
    .values(
        state_version=bindparam("state_version"),
        missed_polls=0,
        last_seen=bindparam("seen_at"),
    )
)


def _write_applied(applied: list[dict[str, Any]], answered: list[int], now) -> None:
    """The changed devices' rows (marked seen), then the seen mark of the devices that
    answered unchanged. Both lists are emptied."""
    if applied:
        # One executemany of plain table UPDATEs: no record-change events (the device.*
        # events describe these changes), and a device deleted meanwhile is no error. In
        # id order, the order a handler batch's flush locks rows in.
        applied.sort(key=lambda row: row["device_pk"])
        for row in applied:
            row["seen_at"] = now
        db.session.execute(_APPLY_REPORT, applied)
        written = {row["device_pk"] for row in applied}
        answered[:] = [pk for pk in answered if pk not in written]
        applied.clear()
    if answered:
        db.session.execute(
            update(Device).where(Device.id.in_(answered)).values(missed_polls=0, last_seen=now),
            execution_options={"synchronize_session": False},
        )
        answered.clear()


def _provision(tenant_id: int, manufacturer_id: int, report: DeviceReport, now) -> Device:
    """A device for a report no known device matches, added to the poll's session (it is
    created here, not by the discovery handler, so the next poll knows it however long the
    handlers take)."""
    device = Device(
        tenant_id=tenant_id,
        manufacturer_id=manufacturer_id,
        api_device_id=report.api_device_id,
        kind=report.kind or "receiver",
        name=report.name or report.api_device_id,
        model=report.model or "",
        firmware=report.firmware or "",
        ip_address=report.ip_address,
        port=report.port,
        location_id=report.location_id,
        is_online=True,
        last_seen=now,
        state=dict(report.state),
        state_version=1,
    )
    db.session.add(device)
    return device


def _found(tenant_id: int, manufacturer_id: int, report: DeviceReport, now) -> DiscoveredDevice:
    return DiscoveredDevice(
        tenant_id=tenant_id,
        manufacturer_id=manufacturer_id,
        api_device_id=report.api_device_id,
        kind=report.kind or "receiver",
        name=(report.name or report.api_device_id)[:120],
        model=report.model or "",
        ip_address=report.ip_address,
        port=report.port,
        report=report.to_payload(),
        first_seen=now,
        last_seen=now,
    )


def add_discovered(found: DiscoveredDevice) -> Device:
    """The device an admin adds from a discovery (in the session, not committed); the
    discovery is done with. The next poll applies what the device reports."""
    data = found.report or {}
    device = Device(
        tenant_id=found.tenant_id,
        manufacturer_id=found.manufacturer_id,
        api_device_id=found.api_device_id,
        kind=found.kind if found.kind in ("receiver", "transmitter") else "receiver",
        name=found.name or found.api_device_id,
        model=found.model or "",
        firmware=str(data.get("firmware") or "")[:64],
        ip_address=found.ip_address,
        port=found.port,
        location_id=data.get("location_id") if isinstance(data.get("location_id"), int) else None,
        is_online=False,
        state={},
    )
    db.session.add(device)
    db.session.delete(found)
    return device


def _discovered(
    tenant_id: int, service_code: str, report: DeviceReport, device: Device | None
) -> int:
    """A discovery: of a device the poll has just provisioned, or (provisioning off) of one
    the tenant does not have, which the handler logs as a warning."""
    extra = {"pk": device.id, "version": device.state_version} if device is not None else {}
    _event(
        "device.discovered",
        tenant_id,
        service_code,
        report.api_device_id,
        label=f"Discovered {report.kind} {report.name or report.api_device_id}",
        device=report.to_payload(),
        provisioned=device is not None,
        **extra,
    )
    return 1


def _apply_report(
    tenant_id: int,
    service_code: str,
    device: Any,
    report: DeviceReport,
    applied: list[dict[str, Any]],
) -> int:
    """Emit what an answering device's report changed (online, field diffs) under a new state
    version, and add the row's new values to `applied` (written with the events)."""
    went_online = not device.is_online
    old, new = _diff(device, report)
    if not went_online and not new:
        return 0
    version = (device.state_version or 0) + 1
    state = dict(device.state or {})
    state.update((name, value) for name, value in new.items() if name not in REPORTED_FIELDS)
    # Every applied device's row gets the same columns, so a batch's are one executemany.
    values: dict[str, Any] = {
        **{name: new.get(name, getattr(device, name)) for name in REPORTED_FIELDS},
        "state": state,
        "is_online": True,
        "state_version": version,
    }
    applied.append({"device_pk": device.id, **values})
    events = 0
    if went_online:
        _event(
            "device.online",
            tenant_id,
            service_code,
            device.api_device_id,
            pk=device.id,
            kind=device.kind,
            version=version,
            label=f"{device.name} is online",
        )
        events += 1
    if new:
        data: dict[str, Any] = {"old": old, "new": new}
        if any(name in new for name in READING_FIELDS):
            # The readings as observed, for the charts: by the time the handler runs the
            # row may hold a later observation.
            data["reading"] = {name: state.get(name) for name in READING_FIELDS}
        _event(
            "device.updated",
            tenant_id,
            service_code,
            device.api_device_id,
            pk=device.id,
            kind=device.kind,
            version=version,
            label=f"{device.name}: {', '.join(sorted(new))} changed",
            **data,
        )
        events += 1
    # The copy now holds what the row holds (should the poll look at the device again).
    for name, value in values.items():
        setattr(device, name, value)
    return events


_CHANNEL_SUFFIX = re.compile(r"/ch(\d+)$")


def _channel_of(api_device_id: str) -> int | None:
    match = _CHANNEL_SUFFIX.search(api_device_id or "")
    return int(match.group(1)) if match else None


def resolve_identities(reports: list[DeviceReport], known: dict[str, Any]) -> list[DeviceReport]:
    """Which known device each report is about: the one at the same address (and channel)
    first, the same api_device_id only where no address decides.

    A receiver's DEVICE_ID is a name its operator sets: two receivers may share one (they stay
    two devices: the second one's id is qualified with its address) and a receiver may be
    renamed (it stays the device at its address: no new device, no offline alert for the
    old name). Returns new reports; the given ones are left as they are."""
    by_address: dict[tuple, Any] = {}
    for device in known.values():
        if device.ip_address and device.port:
            key = (device.ip_address, device.port, device.kind, _channel_of(device.api_device_id))
            by_address.setdefault(key, device)
    resolved: list[DeviceReport] = []
    taken: set[str] = set()
    for report in reports:
        api_id = report.api_device_id
        channel = report.channel if report.channel is not None else _channel_of(api_id)
        at_address = None
        if report.ip_address and report.port:
            at_address = by_address.get((report.ip_address, report.port, report.kind, channel))
        if at_address is not None:
            api_id = at_address.api_device_id
        else:
            same_id = known.get(api_id)
            elsewhere = (
                same_id is not None
                and same_id.ip_address
                and (same_id.ip_address, same_id.port) != (report.ip_address, report.port)
            )
            if elsewhere or api_id in taken:
                api_id = _qualified(api_id, report)
        taken.add(api_id)
        resolved.append(replace(report, api_device_id=api_id))
    return resolved


def _qualified(api_id: str, report: DeviceReport) -> str:
    """`RACK/ch2` reported from 10.0.0.7:2202 -> `RACK@10.0.0.7:2202/ch2`."""
    match = _CHANNEL_SUFFIX.search(api_id)
    base, suffix = (api_id[: match.start()], match.group(0)) if match else (api_id, "")
    if "@" in base:
        return api_id
    return f"{base}@{report.ip_address}:{report.port}{suffix}"[:120]


def _missed(tenant_id: int, service_code: str, device: Any, limit: int) -> int:
    misses = (device.missed_polls or 0) + 1
    values: dict[str, Any] = {"missed_polls": Device.missed_polls + 1}
    goes_offline = device.is_online and misses >= limit
    if goes_offline:
        version = (device.state_version or 0) + 1
        values.update(is_online=False, state_version=version)
        device.is_online, device.state_version = False, version
    db.session.execute(
        update(Device).where(Device.id == device.id).values(**values),
        execution_options={"synchronize_session": False},
    )
    device.missed_polls = misses
    if not goes_offline:
        return 0
    _event(
        "device.offline",
        tenant_id,
        service_code,
        device.api_device_id,
        pk=device.id,
        kind=device.kind,
        version=device.state_version,
        missed_polls=misses,
        # A transmitter is only ever reached through its receiver.
        reason="receiver_unreachable" if device.kind == "transmitter" else "unreachable",
        label=f"{device.name} is offline ({misses} missed polls)",
    )
    return 1


def tenants_with_endpoints() -> list[tuple[int, str]]:
    rows = db.session.execute(
        select(DeviceEndpoint.tenant_id, Manufacturer.code)
        .join(Manufacturer, Manufacturer.id == DeviceEndpoint.manufacturer_id)
        .where(DeviceEndpoint.enabled.is_(True))
        .distinct()
    )
    return [(tenant_id, code) for tenant_id, code in rows]


def apply_pushed_reports(
    tenant_id: int, service_code: str, reports: list[DeviceReport]
) -> int | None:
    """Apply what receivers pushed between polls (their REP lines), as a poll would: the
    same diffs, state versions and device.updated / device.online events, now rather than
    at the next poll. `reports` may be of several receivers (each receiver's report with its
    channels'): they are applied in one transaction, so a burst of pushes across a fleet is
    one commit and one batch of events rather than one per receiver. Only for devices the
    tenant has at those receivers' addresses: finding new ones and counting missed answers
    stay the poll's. Commits.

    Returns the events emitted, or None when a poll of the service is running (it may be
    applying an older view of the same receivers): the caller tries again shortly."""
    receivers = {
        (r.ip_address, r.port)
        for r in reports
        if r.kind == "receiver" and r.online and r.ip_address
    }
    if not receivers:
        return 0
    reports = [r for r in reports if (r.ip_address, r.port) in receivers]
    with poll_lock(tenant_id, service_code) as mine:
        if not mine:
            return None
        known = {
            d.api_device_id: d
            for d in _device_rows(
                Device.tenant_id == tenant_id,
                Device.manufacturer_id == _manufacturer_id(service_code),
                Device.ip_address.in_(sorted({host for host, _ in receivers})),
            )
            if (d.ip_address, d.port) in receivers
        }
        applied: list[dict[str, Any]] = []
        answered: list[int] = []
        seen: set[str] = set()
        events = 0
        for report in resolve_identities(reports, known):
            device = known.get(report.api_device_id)
            if device is None or not report.online:
                continue
            seen.add(report.api_device_id)
            answered.append(device.id)
            events += _apply_report(tenant_id, service_code, device, report, applied)
        # A transmitter its receiver's report no longer mentions was switched off.
        for api_id, device in known.items():
            if api_id not in seen and device.kind == "transmitter":
                answered.append(device.id)
                events += _apply_report(
                    tenant_id, service_code, device, _switched_off(device), applied
                )
        _write_applied(applied, answered, utcnow())
        db.session.commit()
        return events
