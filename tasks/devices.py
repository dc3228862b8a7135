"""Device lifecycle handlers: write the activity log, alert, update pages live.

The poll has already applied what its events report to the device rows (services/devices.py);
an event carries the state version it was applied under, and one older than the row (late, or
delivered again) is logged as history but neither changes, shows nor alerts on the device. An
event without a version (emitted by hand) is applied here. Every handler writes an ActivityLog
row. Alerts go out as events with notification rules (tenant admins) — and, like every event,
to matching webhooks.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

from flask import current_app
from sqlalchemy import select

import services.manufacturers.shure  # noqa: F401  registers the service
from events import emit
from events.outbox import before_commit
from events.registry import Event, batch_cache, handler, periodic, route
from extensions import db
from models.base import utcnow
from models.devices import ActivityLog, Device, DeviceReading, Location, Manufacturer
from services import devices as device_service
from services.live import (
    publish_fragment_after_commit,
    publish_if_watched,
    render_fragment,
    tenant_topic,
)
from services.notifications import notification_rule

for topic, kind, title in (
    ("device.offline_alert", "device_offline", "Device offline"),
    ("device.offline_reminder", "device_offline_reminder", "Still offline"),
    ("device.recovered", "device_recovered", "Device back online"),
    ("device.battery_low", "device_battery_low", "Battery low"),
    ("device.interference", "device_interference", "RF interference"),
):
    notification_rule(
        topic,
        type=kind,
        recipients="tenant_admins",
        title=lambda e, title=title: (
            f"{title}: {e.payload.get('name', e.payload.get('device_id'))}"
        ),
        body=lambda e: e.payload.get("detail", ""),
        link=lambda e: f"/devices/{e.entity_id}",
        # Reminders carry their number so each one is its own notification.
        subject=lambda e: f"device:{e.entity_id}:{e.payload.get('subject_suffix', '')}",
    )


def log_activity(
    event: Event,
    activity_type: str,
    summary: str,
    *,
    status: str = "success",
    device: Device | None = None,
    details: dict[str, Any] | None = None,
    operation: str = "",
) -> None:
    """Add the event's ActivityLog row, and push it to the pages showing its topics.

    The rows of a batch of events are written together just before it commits, with one
    Core executemany (their ids drawn from the sequence first on PostgreSQL, RETURNING
    elsewhere). Each is rendered once, whatever the number of topics it goes to, and only
    if an open page shows one of them; one query per watched topic finds the rows the pages
    drop for them. Outside a batch the same happens for the one row."""
    row = {
        "tenant_id": event.tenant_id,
        "activity_type": activity_type,
        "operation": operation or activity_type,
        "status": status,
        "summary": summary[:500],
        "details": details or {},
        "device_id": device.id if device else None,
        "service_code": event.payload.get("service_code"),
        "event_id": event.id,
        "created_at": event.created_at,
    }
    _deferred(ACTIVITY_ROWS, _write_activity).append(row)


ACTIVITY_ROWS = "activity_rows"
READINGS = "device_readings"


def _deferred(key: str, write) -> Any:
    """The collection of `key` that `write(collection)` writes just before the commit: the
    batch's (shared by its events), or, outside a batch, a new one for this call."""
    cache = batch_cache(db.session())
    collected = cache.get(key) if cache is not None else None
    if collected is None:
        collected: list[dict[str, Any]] = []
        if cache is not None:
            cache[key] = collected

        def run() -> None:
            if cache is not None and cache.get(key) is collected:
                # Taken out first: anything added after this ran starts a new collection.
                del cache[key]
            write(collected)

        before_commit(run)
    return collected


_INSERT_ACTIVITY: dict[str, Any] = {}


def _write_activity(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    conn = db.session.connection()
    table = ActivityLog.__table__
    if conn.dialect.name == "postgresql":
        # The ids first, from the table's sequence in one query, then a plain executemany
        # (one prepared INSERT, pipelined): an INSERT … RETURNING of many rows is a VALUES
        # list whose text differs with the batch's size and is parsed anew each time.
        ids = sorted(conn.execute(_next_activity_ids(), {"n": len(rows)}).scalars())
        conn.execute(table.insert(), [{"id": pk, **row} for pk, row in zip(ids, rows, strict=True)])
    else:
        stmt = _INSERT_ACTIVITY.get(conn.dialect.name)
        if stmt is None:
            stmt = _INSERT_ACTIVITY[conn.dialect.name] = table.insert().returning(
                table.c.id, sort_by_parameter_order=True
            )
        ids = conn.execute(stmt, rows).scalars().all()
    frames = []
    wanted: dict[tuple[int, str], list[int]] = {}
    # Rendered (and the rows the pages drop, found) only for topics an open page watches
    # (publish_if_watched): once per row and once per topic.
    htmls: dict[int, str] = {}
    drops: dict[tuple[int, str], dict[int, int]] = {}

    def render(shown: SimpleNamespace, name: str) -> str:
        html = htmls.get(shown.id)
        if html is None:
            html = htmls[shown.id] = render_fragment(
                "devices/_activity_push.html", a=shown, drop_id=None
            )
        key = (shown.tenant_id, name)
        if key not in drops:
            drops[key] = device_service.activity_drops(key[0], key[1], wanted[key])
        drop = drops[key].get(shown.id)
        # The fragment as it renders with drop_id: the row that leaves the page.
        return html + (f'<li id="activity-{drop}" hx-swap-oob="delete"></li>' if drop else "")

    for row, row_id in zip(rows, ids, strict=True):
        shown = SimpleNamespace(id=row_id, **row)
        for name in device_service.activity_topics(row["activity_type"]):
            wanted.setdefault((row["tenant_id"], name), []).append(row_id)
            frames.append(
                (
                    tenant_topic(row["tenant_id"], name),
                    f"activity-{row_id}",
                    functools.partial(render, shown, name),
                )
            )
    publish_if_watched(frames)


def _next_activity_ids():
    stmt = _INSERT_ACTIVITY.get("postgresql-ids")
    if stmt is None:
        from sqlalchemy import text

        stmt = _INSERT_ACTIVITY["postgresql-ids"] = text(
            "SELECT nextval(pg_get_serial_sequence('activity_logs', 'id')) "
            "FROM generate_series(1, :n)"
        )
    return stmt


def _write_readings(rows: list[dict[str, Any]]) -> None:
    if rows:
        db.session.connection().execute(DeviceReading.__table__.insert(), rows)


def publish_device(device: Device) -> None:
    """Push the device's card to the tenant's open dashboards. Keyed by device, and in a
    batch rendered once, as the batch left the device: its events may change it more than
    once, and each frame replaces the card anyway."""
    publish_fragment_after_commit(
        tenant_topic(device.tenant_id, "devices"),
        f"device-{device.id}",
        "devices/_card.html",
        macro="device_card",
        replaces=True,
        d=device,
        oob=True,
    )


def _device(event: Event) -> Device | None:
    key = _key(event)
    preloaded = _preloaded()
    if preloaded is not None and key in preloaded:
        return preloaded[key]
    return device_service.find_device(*key)


def _key(event: Event) -> tuple[int | None, str, str]:
    return event.tenant_id, event.payload.get("service_code", ""), event.payload.get("device_id")


PRELOADED = "devices"


def _preloaded() -> dict | None:
    cache = batch_cache(db.session())
    return cache.get(PRELOADED) if cache is not None else None


def preload_devices(events: list[Event]) -> None:
    """The devices a batch's events are about, one query per (tenant, service) instead of one
    per event. _device() answers from it, a device not there included (None): only a
    discovery in the same batch creates one, and it adds what it creates."""
    wanted: dict[tuple[int, str], set[str]] = {}
    for event in events:
        tenant_id, code, api_id = _key(event)
        if tenant_id is not None and api_id:
            wanted.setdefault((tenant_id, code), set()).add(api_id)
    found: dict[tuple[int | None, str, str], Device | None] = {}
    for (tenant_id, code), api_ids in wanted.items():
        devices = device_service.find_devices(tenant_id, code, api_ids)
        for api_id in api_ids:
            found[(tenant_id, code, api_id)] = devices.get(api_id)
    cache = batch_cache(db.session())
    if cache is not None:
        cache[PRELOADED] = found


def _unknown(event: Event, what: str) -> None:
    log_activity(
        event,
        what,
        f"{what.capitalize()} event for unknown device {event.payload.get('device_id')}",
        status="warning",
        details={"device_id": event.payload.get("device_id")},
    )


def event_version(event: Event) -> int | None:
    """The device state version a poll applied this event's change under; None for an event
    the poll did not apply (emitted by hand, or queued by a release before versions), whose
    change the handler applies itself."""
    version = event.payload.get("version")
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def is_stale(event: Event, device: Device) -> bool:
    """The row has moved on since this event (it arrives late, or again): what it says is
    history for the log, not what the device is now, so it must not be shown or acted on."""
    version = event_version(event)
    return version is not None and version < (device.state_version or 0)


def alerts_suppressed(device: Device, at=None) -> bool:
    """Maintenance: the device's or its location's flag, or a scheduled window now."""
    location = db.session.get(Location, device.location_id) if device.location_id else None
    if device.maintenance_mode or bool(location and location.maintenance_mode):
        return True
    return device_service.in_maintenance_window(device, at or utcnow())


def alerts_wanted(device: Device, at=None) -> bool:
    location = db.session.get(Location, device.location_id) if device.location_id else None
    return bool(location and location.alert_on_offline) and not alerts_suppressed(device, at)


def _device_alert(
    topic: str, device: Device, label: str, detail: str, *, suffix: str, **extra: Any
) -> None:
    """One alert about a device for the notification handlers: its name and id, a title
    (`label`), a line of detail, and `suffix`, which makes one outage or episode one
    notification (NOTIFY_DEDUPE_SECONDS)."""
    emit(
        topic,
        tenant_id=device.tenant_id,
        entity="device",
        entity_id=device.id,
        payload={
            "name": device.name,
            "device_id": device.api_device_id,
            "label": label,
            "detail": detail,
            **extra,
            "subject_suffix": suffix,
        },
    )


# A poll's events are one message per batch for all their handlers (the feed, webhooks and
# metrics ones too): the per-message work — reading the events, recording them, a commit,
# Dramatiq's fetch and ack — was most of what a device event cost.
route("device.*", "devices")


@handler("device.discovered", name="device_discovered", queue="devices", preload=preload_devices)
def on_discovered(event: Event) -> None:
    data = event.payload.get("device") or {}
    device = _device(event)
    if event.payload.get("provisioned"):  # the poll created it
        if device is None:
            _unknown(event, "discovery")  # removed since
        else:
            _provisioned(event, device, data)
        return
    if device is not None:
        log_activity(
            event, "discovery", f"Discovered {device.name} again (already known)", device=device
        )
        return
    if not current_app.config["DEVICES_AUTO_PROVISION"]:
        log_activity(
            event,
            "discovery",
            f"Discovered unknown {data.get('kind', 'device')} {data.get('api_device_id')} "
            f"({data.get('model') or 'unknown model'}), not added: auto-provisioning is off",
            status="warning",
            details=data,
        )
        return
    manufacturer = db.session.scalar(
        select(Manufacturer).where(Manufacturer.code == event.payload["service_code"])
    )
    device = Device(
        tenant_id=event.tenant_id,
        manufacturer_id=manufacturer.id,
        api_device_id=data["api_device_id"],
        kind=data.get("kind") or "receiver",
        name=data.get("name") or data["api_device_id"],
        model=data.get("model") or "",
        firmware=data.get("firmware") or "",
        ip_address=data.get("ip_address"),
        port=data.get("port"),
        location_id=data.get("location_id"),
        is_online=True,
        last_seen=event.created_at,
        state={k: v for k, v in (data.get("state") or {}).items()},
    )
    db.session.add(device)
    db.session.flush()
    preloaded = _preloaded()
    if preloaded is not None:
        preloaded[_key(event)] = device  # for the batch's later events about it
    _provisioned(event, device, data)


def _provisioned(event: Event, device: Device, data: dict[str, Any]) -> None:
    log_activity(
        event,
        "discovery",
        f"Provisioned {device.kind} {device.name}",
        device=device,
        operation="create",
        details=data,
    )
    # An open dashboard has no card to swap for a new device (and which page it belongs on
    # depends on the viewer's filters): say so instead, with a link that shows it.
    # One key: in a batch, one notice per tenant, naming its latest device.
    publish_fragment_after_commit(
        tenant_topic(device.tenant_id, "devices"),
        "devices-new",
        "devices/_new_notice.html",
        replaces=True,
        d=device,
    )


@handler("device.online", name="device_online", queue="devices", preload=preload_devices)
def on_online(event: Event) -> None:
    device = _device(event)
    if device is None:
        _unknown(event, "online")
        return
    if event_version(event) is None:
        old = "online" if device.is_online else "offline"
        device.is_online = True
        device.last_seen = max(device.last_seen or event.created_at, event.created_at)
    else:
        old = "offline"  # the poll emits it on the transition only
    log_activity(
        event,
        "status",
        f"{device.name} is online",
        device=device,
        operation="update",
        details={"old": {"status": old}, "new": {"status": "online"}},
    )
    if is_stale(event, device):
        return  # it went down again since: no recovery to announce, no card to show
    if device.offline_alerted_at is not None:
        if current_app.config["DEVICES_RECOVERY_CONFIRM_SECONDS"] > 0:
            # Announced once it has stayed up (offline_reminders): a flap is no recovery.
            device.back_online_at = event.created_at
        else:
            announce_recovery(device, event.created_at)
    publish_device(device)


def announce_recovery(device: Device, at) -> None:
    """The one "back online" of an alerted outage, with how often it flapped meanwhile."""
    down_for = (device.back_online_at or at) - device.offline_alerted_at
    flaps = device.flap_count or 0
    detail = f"Back after {int(down_for.total_seconds() // 60)} min."
    if flaps:
        detail += f" It flapped {flaps} times before staying up."
    _device_alert(
        "device.recovered",
        device,
        f"{device.name} recovered",
        detail,
        suffix=f"recovered:{device.offline_alerted_at.isoformat()}",
        flaps=flaps,
    )
    device.offline_alerted_at = device.offline_reminded_at = device.back_online_at = None
    device.flap_count = 0


@handler("device.offline", name="device_offline", queue="devices", preload=preload_devices)
def on_offline(event: Event) -> None:
    device = _device(event)
    if device is None:
        _unknown(event, "offline")
        return
    if event_version(event) is None:
        old = "online" if device.is_online else "offline"
        device.is_online = False
    else:
        old = "online"  # the poll emits it on the transition only
    # A transmitter is reached through its receiver: its receiver's outage is the one alert.
    unreachable = device.kind == "transmitter"
    flapping = device.offline_alerted_at is not None and not unreachable
    summary = (
        f"{device.name}: receiver unreachable"
        if unreachable
        else f"{device.name} is offline"
        + (f" again (flap {(device.flap_count or 0) + 1})" if flapping else "")
    )
    log_activity(
        event,
        "status",
        summary,
        device=device,
        status="warning",
        operation="update",
        details={
            "old": {"status": old},
            "new": {"status": "unreachable" if unreachable else "offline"},
            "missed_polls": event.payload.get("missed_polls"),
        },
    )
    if is_stale(event, device):
        return  # it answered again since: nothing to alert, no card to show
    if flapping and old == "online":
        # Down again before its recovery was confirmed: the same outage, not a new alert.
        device.flap_count = (device.flap_count or 0) + 1
        device.back_online_at = None
    elif old == "online" and not unreachable and alerts_wanted(device, event.created_at):
        device.offline_alerted_at = event.created_at
        _device_alert(
            "device.offline_alert",
            device,
            f"Alert: {device.name} is offline",
            f"Missed {event.payload.get('missed_polls')} polls.",
            suffix=f"offline:{event.created_at.isoformat()}",
        )
    publish_device(device)


@handler("device.updated", name="device_updated", queue="devices", preload=preload_devices)
def on_updated(event: Event) -> None:
    device = _device(event)
    if device is None:
        _unknown(event, "update")
        return
    old, new = event.payload.get("old") or {}, event.payload.get("new") or {}
    reading = event.payload.get("reading")
    if event_version(event) is None:
        state = dict(device.state or {})
        for name, value in new.items():
            if name in device_service.REPORTED_FIELDS:
                setattr(device, name, value)
            else:
                state[name] = value
        device.state = state
        reading = state
    log_activity(
        event,
        "update",
        # Named as the event saw it: a late one is about the device's name back then.
        f"{new.get('name') or device.name}: {', '.join(sorted(new))} changed",
        device=device,
        operation="update",
        details={"old": old, "new": new},
    )
    if any(k in new for k in device_service.READING_FIELDS):
        reading = reading or device.state or {}
        _deferred(READINGS, _write_readings).append(
            {
                "tenant_id": device.tenant_id,
                "device_id": device.id,
                "battery_bars": reading.get("battery_bars"),
                "battery_minutes": reading.get("battery_minutes"),
                "rf_level": reading.get("rf_level"),
                "audio_level": reading.get("audio_level"),
                "at": event.created_at,
            }
        )
    # Alerts on what the event reports only while the device still reports it: an event
    # that arrives after a newer one must not raise an alert the device has cleared since.
    current = device.state or {}
    threshold = current_app.config["DEVICES_LOW_BATTERY_BARS"]
    bars, before = new.get("battery_bars"), old.get("battery_bars")
    if (
        isinstance(bars, int)
        and 0 <= bars <= threshold
        and (before is None or before > threshold or before == 255)
        and _battery_low(current.get("battery_bars"), threshold)
        and not alerts_suppressed(device)
    ):
        _device_alert(
            "device.battery_low",
            device,
            f"{device.name}: battery low ({bars} bars)",
            f"{bars} of 5 bars left.",
            suffix="battery",
        )
    if (
        new.get("interference") is True
        and old.get("interference") is not True
        and current.get("interference") is True
    ):
        alert_interference(event, device, current)
    if is_stale(event, device):
        return  # the card shows the row, and a later event's handler shows it
    publish_device(device)


def _battery_low(bars: Any, threshold: int) -> bool:
    return isinstance(bars, int) and 0 <= bars <= threshold


def alert_interference(event: Event, device: Device, state: dict[str, Any]) -> None:
    """Once per episode: raised when the receiver starts reporting interference on the
    channel, not again until it has reported it clear (like the low-battery alert)."""
    if alerts_suppressed(device):
        return
    where = ", ".join(
        part
        for part in (
            f"{state['frequency_mhz']} MHz" if state.get("frequency_mhz") else "",
            f"group/channel {state['group_channel']}" if state.get("group_channel") else "",
        )
        if part
    )
    _device_alert(
        "device.interference",
        device,
        f"{device.name}: RF interference detected",
        f"The receiver detects interference{f' on {where}' if where else ''}.",
        suffix="interference",  # repeats within NOTIFY_DEDUPE_SECONDS: one
    )


@handler("device.synced", name="device_synced", queue="devices")
def on_synced(event: Event) -> None:
    p = event.payload
    log_activity(
        event,
        "sync",
        f"{p.get('service_code')} sync {p.get('status')}: {p.get('online_count')}/"
        f"{p.get('device_count')} online in {p.get('duration_seconds')} s",
        status={"success": "success", "partial": "warning"}.get(p.get("status"), "error"),
        details={
            k: p.get(k)
            for k in (
                "device_count",
                "online_count",
                "error_count",
                "status",
                "duration_seconds",
                "error_message",
            )
        },
    )


@periodic("DEVICES_POLL_INTERVAL", name="poll_devices")
def poll_devices() -> None:
    for tenant_id, code in device_service.tenants_with_endpoints():
        device_service.poll_service(tenant_id, code)


@periodic("DEVICES_ALERT_CHECK_SECONDS", name="device_offline_reminders")
def offline_reminders() -> None:
    """Remind of alerted outages still down; announce those back for long enough."""
    cfg = current_app.config
    every = timedelta(minutes=cfg["DEVICES_ALERT_REMINDER_MINUTES"])
    confirm = timedelta(seconds=cfg["DEVICES_RECOVERY_CONFIRM_SECONDS"])
    now = utcnow()
    back = db.session.scalars(
        select(Device).where(
            Device.is_online.is_(True),
            Device.offline_alerted_at.is_not(None),
            Device.back_online_at.is_not(None),
            Device.back_online_at <= now - confirm,
        )
    ).all()
    for device in back:
        announce_recovery(device, now)
        db.session.commit()
    rows = db.session.scalars(
        select(Device).where(Device.is_online.is_(False), Device.offline_alerted_at.is_not(None))
    ).all()
    for device in rows:
        last = device.offline_reminded_at or device.offline_alerted_at
        if now - last < every or alerts_suppressed(device):
            continue
        device.offline_reminded_at = now
        minutes = int((now - device.offline_alerted_at).total_seconds() // 60)
        _device_alert(
            "device.offline_reminder",
            device,
            f"Reminder: {device.name} offline for {minutes} min",
            f"Offline for {minutes} minutes.",
            suffix=f"reminder:{now.isoformat()}",
        )
        db.session.commit()
