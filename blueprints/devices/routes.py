from datetime import UTC, datetime, time, timedelta

from flask import abort, flash, redirect, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import literal, select, text, tuple_
from sqlalchemy.exc import IntegrityError

from blueprints import admin_required, get_owned_or_404, int_arg, keyset_page, parse_id, render
from blueprints.devices import bp
from blueprints.devices.forms import DeviceForm, EndpointForm, LocationForm, fill_choices
from extensions import db
from models.device_meters import DeviceMeterMinute
from models.devices import (
    ACTIVITY_STATUSES,
    ActivityLog,
    Device,
    DeviceEndpoint,
    DeviceReading,
    DiscoveredDevice,
    Location,
    MaintenanceWindow,
    Manufacturer,
)
from services.charts import Series, line_chart
from services.devices import (
    ACTIVITY_PAGE_SIZE,
    ACTIVITY_TOPIC,
    ACTIVITY_TYPE_NAME,
    ROUTINE_ACTIVITY_TYPES,
    _channel_of,
    activity_type_topic,
    add_discovered,
    audio_percent,
    downtime,
    rf_percent,
)
from services.live import render_fragment, snapshot
from services.manufacturers import endpoints as endpoint_service

# Cards per dashboard page; "Show more" loads the next page (keyset).
DASHBOARD_PAGE = 120
ACTIVITY_PAGE = ACTIVITY_PAGE_SIZE  # what a live row's push trims the page back to


def _locations():
    return db.session.scalars(
        select(Location).where(Location.tenant_id == current_user.tenant_id).order_by(Location.name)
    ).all()


def _manufacturers():
    return db.session.scalars(select(Manufacturer).order_by(Manufacturer.name)).all()


def dashboard_devices(
    tenant_id: int, filters: dict, after: Device | None = None, limit: int = DASHBOARD_PAGE
) -> tuple[list[Device], int | None]:
    """One page of the grid, by location then name, and the id to continue after (or None).

    Keyset pagination on (location_id, name, id), the order of ix_devices_tenant_location_name:
    devices with a location first, then those without, so every page is an index range
    scan however large the fleet."""
    stmt = select(Device).where(Device.tenant_id == tenant_id)
    if filters.get("location"):
        stmt = stmt.where(Device.location_id == int(filters["location"]))
    if filters.get("manufacturer"):
        stmt = stmt.where(Device.manufacturer_id == int(filters["manufacturer"]))
    if filters.get("state") == "online":
        stmt = stmt.where(Device.is_online.is_(True))
    elif filters.get("state") == "offline":
        stmt = stmt.where(Device.is_online.is_(False))
    located = stmt.where(Device.location_id.is_not(None))
    unlocated = stmt.where(Device.location_id.is_(None))
    if after is not None and after.location_id is not None:
        located = located.where(
            tuple_(Device.location_id, Device.name, Device.id)
            > tuple_(literal(after.location_id), literal(after.name), literal(after.id))
        )
    elif after is not None:
        located = None
        unlocated = unlocated.where(
            tuple_(Device.name, Device.id) > tuple_(literal(after.name), literal(after.id))
        )
    rows: list[Device] = []
    if located is not None:
        rows = list(
            db.session.scalars(
                located.order_by(Device.location_id, Device.name, Device.id).limit(limit + 1)
            )
        )
    if len(rows) <= limit:
        rows += db.session.scalars(
            unlocated.order_by(Device.name, Device.id).limit(limit + 1 - len(rows))
        )
    more = rows[limit - 1].id if len(rows) > limit else None
    return rows[:limit], more


def group_by_location(devices: list[Device], locations: list[Location]) -> list[dict]:
    names = {loc.id: loc for loc in locations}
    groups: dict[int | None, list[Device]] = {}
    for device in devices:
        groups.setdefault(device.location_id, []).append(device)
    ordered = sorted(groups, key=lambda k: (k is None, names[k].name if k in names else ""))
    return [
        {
            "location": names.get(k),
            "key": k or 0,
            "devices": groups[k],
            "receivers": group_by_receiver(groups[k]),
        }
        for k in ordered
    ]


def group_by_receiver(devices: list[Device]) -> list[dict]:
    """A location's cards as micboard shows them: each receiver with its channels under it,
    by channel number; a transmitter whose receiver is on another page or not added heads
    a group of its own address. Devices without an address stand alone."""
    groups: dict[object, dict] = {}
    for device in devices:
        address = (device.ip_address, device.port) if device.ip_address else ("id", device.id)
        group = groups.setdefault(address, {"receiver": None, "channels": [], "key": ""})
        if device.kind == "receiver" and group["receiver"] is None:
            group["receiver"] = device
        else:
            group["channels"].append(device)
    for group in groups.values():
        group["channels"].sort(key=lambda d: (_channel_of(d.api_device_id) or 0, d.name, d.id))
        first = group["receiver"] or group["channels"][0]
        group["key"] = first.id
        group["name"] = first.name
    return sorted(groups.values(), key=lambda g: (g["receiver"] is None, g["name"], g["key"]))


def _filters() -> dict:
    args = request.args
    filters = {}
    for key in ("location", "manufacturer"):
        if parse_id(args.get(key)) is not None:  # anything else (or out of range): no filter
            filters[key] = args[key].strip()
    if args.get("state") in ("online", "offline"):
        filters["state"] = args["state"]
    return filters


@bp.get("/")
@login_required
def index():
    filters = _filters()
    locations = _locations()
    after_id = int_arg("after")
    after = get_owned_or_404(Device, after_id) if after_id is not None else None
    devices, more = dashboard_devices(current_user.tenant_id, filters, after)
    context = dict(
        groups=group_by_location(devices, locations),
        more=more,
        filters=filters,
        continued=after.location_id if after is not None else None,
    )
    if after is not None:
        # "Show more": the next cards, in place of the button that asked for them.
        return render("devices/_more.html", **context)
    return render(
        "devices/index.html",
        "devices/_grid.html",
        locations=locations,
        manufacturers=_manufacturers(),
        discovered=_discovered() if current_user.is_admin else [],
        live_topics=["devices", "meters"],
        **context,
    )


DISCOVERED_SHOWN = 50


def _discovered() -> list[DiscoveredDevice]:
    return list(
        db.session.scalars(
            select(DiscoveredDevice)
            .where(DiscoveredDevice.tenant_id == current_user.tenant_id)
            .order_by(DiscoveredDevice.first_seen.desc(), DiscoveredDevice.id.desc())
            .limit(DISCOVERED_SHOWN)
        )
    )


@bp.post("/discovered/<int:found_id>/add")
@admin_required
def add_discovered_device(found_id: int):
    found = get_owned_or_404(DiscoveredDevice, found_id)
    location_id = (found.report or {}).get("location_id")
    if location_id is not None and not db.session.scalar(
        select(Location.id).where(Location.id == location_id, Location.tenant_id == found.tenant_id)
    ):
        found.report = {**found.report, "location_id": None}
    known = db.session.scalar(
        select(Device.id).where(
            Device.tenant_id == found.tenant_id,
            Device.manufacturer_id == found.manufacturer_id,
            Device.api_device_id == found.api_device_id,
        )
    )
    if known is not None:  # added meanwhile (another admin, or provisioning turned on)
        db.session.delete(found)
        db.session.commit()
        return redirect(url_for("devices.detail", device_id=known), code=303)
    device = add_discovered(found)
    db.session.commit()
    flash(f"{device.name} added; the next poll fills in its state.", "info")
    return redirect(url_for("devices.detail", device_id=device.id), code=303)


@snapshot("devices")
def devices_snapshot(tenant_id: int, user) -> str:
    locations = db.session.scalars(select(Location).where(Location.tenant_id == tenant_id)).all()
    devices, more = dashboard_devices(tenant_id, {})
    return render_fragment(
        "devices/_grid.html",
        groups=group_by_location(devices, list(locations)),
        oob=True,
        more=more,
        filters={},
        continued=None,
    )


@bp.get("/<int:device_id>")
@login_required
def detail(device_id: int):
    device = get_owned_or_404(Device, device_id)
    activity = db.session.scalars(
        select(ActivityLog)
        .where(ActivityLog.device_id == device.id, ActivityLog.tenant_id == device.tenant_id)
        .order_by(ActivityLog.created_at.desc(), ActivityLog.id.desc())
        .limit(ACTIVITY_PAGE)
    ).all()
    since = datetime.now().astimezone() - timedelta(days=7)
    readings = db.session.scalars(
        select(DeviceReading)
        .where(DeviceReading.device_id == device.id, DeviceReading.at >= since)
        .order_by(DeviceReading.at)
        .limit(2000)
    ).all()
    series = [
        Series(
            "Battery bars",
            [
                (r.at, r.battery_bars)
                for r in readings
                if r.battery_bars is not None and r.battery_bars <= 5
            ],
            "#1a7f46",
            5,
        )
    ]
    # Levels are per-minute meter history now (the chart above); readings of them exist only
    # from before, and an axis with nothing on it would only puzzle.
    rf = [(r.at, rf_percent(r.rf_level)) for r in readings if r.rf_level is not None]
    if rf:
        series.append(Series("RF strength, % of -100…-20 dBm", rf, "#2f5bea", 100))
    chart = line_chart(series)
    now = datetime.now().astimezone()
    uptime, outages = downtime(device, since, now)
    hours = request.args.get("hours", type=int)
    hours = hours if hours in METER_WINDOWS else METER_WINDOWS[1]
    return render(
        "devices/detail.html",
        device=device,
        activity=activity,
        chart=chart,
        meter_chart=meter_chart(device, now - timedelta(hours=hours)),
        meter_hours=hours,
        meter_windows=METER_WINDOWS,
        uptime=uptime,
        outages=outages[:OUTAGES_SHOWN],
        now=now,
        live_topics=["devices", "meters"],
    )


OUTAGES_SHOWN = 20
METER_WINDOWS = (3, 12, 24, 72)  # hours of meter history the device page offers
METER_POINTS = 720  # at most this many points per line (a minute each for 12 hours)


def meter_chart(device: Device, since: datetime):
    """The device's meter history: the weakest RF and the loudest audio of each minute (a
    fade and a silent mic both show), and the battery bars, grouped into at most
    METER_POINTS spans for longer windows."""
    rows = db.session.execute(
        select(
            DeviceMeterMinute.minute,
            DeviceMeterMinute.rf_min,
            DeviceMeterMinute.audio_max,
            DeviceMeterMinute.battery_min,
        )
        .where(
            DeviceMeterMinute.device_id == device.id,
            DeviceMeterMinute.tenant_id == device.tenant_id,
            DeviceMeterMinute.minute >= since,
        )
        .order_by(DeviceMeterMinute.minute)
    ).all()
    step = max(1, -(-len(rows) // METER_POINTS))
    rf, audio, battery = [], [], []
    for start in range(0, len(rows), step):
        span = rows[start : start + step]
        at = span[0][0]
        lows = [r[1] for r in span if r[1] is not None]
        highs = [r[2] for r in span if r[2] is not None]
        bars = [r[3] for r in span if r[3] is not None]
        if lows:
            rf.append((at, rf_percent(min(lows))))
        if highs:
            audio.append((at, audio_percent(max(highs))))
        if bars:
            battery.append((at, min(bars)))
    levels = line_chart(
        [
            Series("RF low, % of -100…-20 dBm", rf, "#2f5bea", 100),
            Series("Audio peak, % of -60…0 dBFS", audio, "#b54708", 100),
        ]
    )
    if not battery:
        return levels
    return levels + line_chart([Series("Battery bars", battery, "#1a7f46", 5)])


def _activity_query(tenant_id: int):
    """The filtered statement, the filters applied, and what is wrong with the device
    number typed by hand (said on the page, never a bare 400 swapped into the list)."""
    args = request.args
    stmt = select(ActivityLog).where(ActivityLog.tenant_id == tenant_id)
    filters: dict[str, str] = {}
    errors: list[str] = []
    if args.get("type"):
        stmt = stmt.where(ActivityLog.activity_type == args["type"][:48])
        filters["type"] = args["type"][:48]
    else:
        # A poll's bookkeeping is a row every poll interval: the main feed leaves it out,
        # the type filter shows it.
        stmt = stmt.where(ActivityLog.activity_type.not_in(ROUTINE_ACTIVITY_TYPES))
    if args.get("status") in ACTIVITY_STATUSES:
        stmt = stmt.where(ActivityLog.status == args["status"])
        filters["status"] = args["status"]
    raw_device = args.get("device", "").strip()
    if raw_device:
        device = parse_id(raw_device)
        if device is None:
            errors.append(f"“{raw_device[:40]}” is not a device number (a whole number).")
        else:
            stmt = stmt.where(ActivityLog.device_id == device)
            filters["device"] = str(device)
    for key, op in (("from", "ge"), ("to", "lt")):
        raw = args.get(key, "")
        if raw:
            try:
                day = datetime.strptime(raw, "%Y-%m-%d").date()
            except ValueError:  # a date field sends YYYY-MM-DD: this one was hand-made
                abort(400, description=f"“{key}” must be a date (YYYY-MM-DD).")
            if op == "ge":
                stmt = stmt.where(ActivityLog.created_at >= datetime.combine(day, time.min))
            elif day < datetime.max.date():  # up to the calendar's last day: no end at all
                end = datetime.combine(day + timedelta(days=1), time.min)
                stmt = stmt.where(ActivityLog.created_at < end)
            filters[key] = raw
    return stmt, filters, errors


def activity_types(tenant_id: int, limit: int = 50) -> list[str]:
    """The tenant's distinct activity types, found by hopping along the (tenant, type, id)
    index one type at a time: a plain DISTINCT would read every row (millions)."""
    step = text(
        """
        WITH RECURSIVE kinds(name) AS (
            SELECT MIN(activity_type) FROM activity_logs WHERE tenant_id = :tenant
            UNION ALL
            SELECT (SELECT MIN(activity_type) FROM activity_logs
                    WHERE tenant_id = :tenant AND activity_type > kinds.name)
            FROM kinds WHERE kinds.name IS NOT NULL
        )
        SELECT name FROM kinds WHERE name IS NOT NULL LIMIT :limit
        """
    )
    return list(db.session.scalars(step, {"tenant": tenant_id, "limit": limit}))


@bp.get("/activity")
@login_required
def activity():
    stmt, filters, errors = _activity_query(current_user.tenant_id)
    rows, next_before = keyset_page(stmt, ActivityLog.id, ACTIVITY_PAGE)
    # Only the first page follows live rows; an older or a "Newer" page stays as it is.
    before = int_arg("before")
    if before is None:
        before = int_arg("after")
    types = activity_types(current_user.tenant_id)
    return render(
        "devices/activity.html",
        "devices/_activity_rows.html",
        rows=rows,
        next_before=next_before,
        filters=filters,
        errors=errors,
        types=sorted(types),
        statuses=ACTIVITY_STATUSES,
        live_topics=activity_live_topics(filters, before),
    )


def activity_live_topics(filters: dict[str, str], before: int | None) -> list[str]:
    """The live rows this view of the feed takes: the main feed's, or one type's; none for
    an older page or a combination of filters no topic matches (reloading shows new rows)."""
    if before is not None:
        return []
    if not filters:
        return [ACTIVITY_TOPIC]
    kind = filters.get("type", "")
    if set(filters) == {"type"} and ACTIVITY_TYPE_NAME.fullmatch(kind):
        return [activity_type_topic(kind)]
    return []


@snapshot("activity")
def activity_snapshot(tenant_id: int, user) -> str:
    return ""  # the page renders the latest rows; new ones are prepended as they happen


# ------------------------------------------------------------------ settings


@bp.route("/settings", methods=["GET", "POST"])
@admin_required
def settings():
    location_form = LocationForm(prefix="loc")
    endpoint_form = EndpointForm(prefix="ep")
    device_form = DeviceForm(prefix="dev")
    # The catalog is global and read-only here: it is seeded from code (and extended only
    # with `flask devices manufacturers add`), so one tenant cannot add what all see.
    if endpoint_service.seed_catalog():
        db.session.commit()
    manufacturers = _manufacturers()
    locations = _locations()
    for form in (endpoint_form, device_form):
        fill_choices(form, manufacturers, locations)
    tenant_id = current_user.tenant_id
    action = request.form.get("action")
    if action == "manufacturer":
        abort(403)
    try:
        if action == "location" and location_form.validate_on_submit():
            db.session.add(
                Location(
                    tenant_id=tenant_id,
                    name=location_form.name.data.strip(),
                    alert_on_offline=location_form.alert_on_offline.data,
                    maintenance_mode=location_form.maintenance_mode.data,
                )
            )
            db.session.commit()
            flash("Location added.", "info")
            return redirect(url_for("devices.settings"), code=303)
        if action == "endpoint" and endpoint_form.validate_on_submit():
            db.session.add(
                DeviceEndpoint(
                    tenant_id=tenant_id,
                    manufacturer_id=endpoint_form.manufacturer_id.data,
                    host=endpoint_form.host.data.strip(),
                    port=endpoint_form.port.data,
                    location_id=_owned_location(endpoint_form.location_id.data),
                )
            )
            db.session.commit()
            flash("Receiver address added; it is polled from now on.", "info")
            return redirect(url_for("devices.settings"), code=303)
        if action == "device" and device_form.validate_on_submit():
            db.session.add(
                Device(
                    tenant_id=tenant_id,
                    manufacturer_id=device_form.manufacturer_id.data,
                    api_device_id=device_form.api_device_id.data.strip(),
                    name=device_form.name.data.strip(),
                    kind=device_form.kind.data,
                    model=(device_form.model.data or "").strip(),
                    location_id=_owned_location(device_form.location_id.data),
                    state={},
                )
            )
            db.session.commit()
            flash("Device added.", "info")
            return redirect(url_for("devices.settings"), code=303)
    except IntegrityError:
        db.session.rollback()
        flash("That already exists.", "error")
        return redirect(url_for("devices.settings"), code=303)
    invalid = request.method == "POST" and action
    if invalid:
        flash("Please correct the highlighted fields.", "error")
    endpoints = db.session.scalars(
        select(DeviceEndpoint)
        .where(DeviceEndpoint.tenant_id == tenant_id)
        .order_by(DeviceEndpoint.id)
    ).all()
    page = render(
        "devices/settings.html",
        windows=_windows(tenant_id),
        location_form=location_form,
        endpoint_form=endpoint_form,
        device_form=device_form,
        locations=locations,
        manufacturers=manufacturers,
        endpoints=endpoints,
        endpoint_problems=endpoint_service.connection_problems(endpoints),
    )
    if invalid:
        page.status_code = 422
    return page


def _owned_location(location_id: int | None) -> int | None:
    if not location_id:
        return None
    location = db.session.get(Location, location_id)
    if location is None or location.tenant_id != current_user.tenant_id:
        abort(404)
    return location.id


@bp.post("/locations/<int:location_id>")
@admin_required
def update_location(location_id: int):
    location = get_owned_or_404(Location, location_id)
    location.alert_on_offline = request.form.get("alert_on_offline") == "1"
    location.maintenance_mode = request.form.get("maintenance_mode") == "1"
    db.session.commit()
    flash(f"{location.name} saved.", "info")
    return redirect(url_for("devices.settings"), code=303)


WINDOWS_SHOWN = 50


def _windows(tenant_id: int) -> list[MaintenanceWindow]:
    """Current and coming windows, soonest first."""
    return list(
        db.session.scalars(
            select(MaintenanceWindow)
            .where(
                MaintenanceWindow.tenant_id == tenant_id,
                MaintenanceWindow.ends_at > datetime.now().astimezone(),
            )
            .order_by(MaintenanceWindow.starts_at, MaintenanceWindow.id)
            .limit(WINDOWS_SHOWN)
        )
    )


def _utc_field(name: str, label: str, errors: list[str]) -> datetime | None:
    raw = request.form.get(name, "").strip()
    try:
        if not raw:
            return None
        value = datetime.fromisoformat(raw)
        # The form's fields are UTC; a value with its own offset is taken as it says.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except ValueError:
        errors.append(f"{label} must be a date and time (YYYY-MM-DDTHH:MM, UTC).")
        return None


@bp.post("/maintenance-windows")
@admin_required
def add_maintenance_window():
    tenant_id = current_user.tenant_id
    errors: list[str] = []
    starts = _utc_field("starts_at", "Start", errors)
    ends = _utc_field("ends_at", "End", errors)
    if not errors and (starts is None or ends is None):
        errors.append("Give a start and an end.")
    elif not errors and ends <= starts:
        errors.append("The end must be after the start.")
    location_id = _owned_location(parse_id(request.form.get("location_id") or ""))
    device_id = parse_id(request.form.get("device_id") or "")
    raw_device = (request.form.get("device_id") or "").strip()
    if raw_device and (
        device_id is None
        or not db.session.scalar(
            select(Device.id).where(Device.id == device_id, Device.tenant_id == tenant_id)
        )
    ):
        errors.append(f"“{raw_device[:40]}” is not one of your device numbers.")
    if errors:
        for error in errors:
            flash(error, "error")
        return redirect(url_for("devices.settings"), code=303)
    db.session.add(
        MaintenanceWindow(
            tenant_id=tenant_id,
            starts_at=starts,
            ends_at=ends,
            location_id=location_id,
            device_id=device_id,
            note=(request.form.get("note") or "").strip()[:200],
        )
    )
    db.session.commit()
    flash("Maintenance window scheduled: no alerts for what it covers while it lasts.", "info")
    return redirect(url_for("devices.settings"), code=303)


@bp.post("/maintenance-windows/<int:window_id>/delete")
@admin_required
def delete_maintenance_window(window_id: int):
    db.session.delete(get_owned_or_404(MaintenanceWindow, window_id))
    db.session.commit()
    flash("Maintenance window removed.", "info")
    return redirect(url_for("devices.settings"), code=303)


@bp.post("/<int:device_id>/maintenance")
@login_required
def toggle_maintenance(device_id: int):
    device = get_owned_or_404(Device, device_id)
    device.maintenance_mode = request.form.get("on") == "1"
    db.session.commit()
    return redirect(url_for("devices.detail", device_id=device.id), code=303)
