import re
from datetime import datetime
from functools import wraps

from flask import g, jsonify, request, url_for
from flask_login import current_user
from sqlalchemy import select

from blueprints import DB_INT_MAX
from blueprints.api import bp
from blueprints.api.openapi import MAX_PAGE_SIZE, openapi_document
from extensions import csrf, db
from models.devices import ACTIVITY_STATUSES, ActivityLog, Device, Manufacturer
from services.api_tokens import api_hit_by_address, api_hit_by_user, user_for_token

PAGE_SIZE = 50
# RFC 3339, as the document's `date-time` says: a date alone or a time without its offset
# would be read in some zone the caller did not choose.
RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)

csrf.exempt(bp)  # read-only, and token requests carry no cookie


class BadParameter(ValueError):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


@bp.errorhandler(BadParameter)
def bad_parameter(error: BadParameter):
    return jsonify(error="invalid_parameter", parameter=error.name, message=error.message), 400


def api_auth(view):
    """A per-user API token (Authorization: Bearer …) or the logged-in session."""

    @wraps(view)
    def wrapped(*args, **kwargs):
        by_address = api_hit_by_address(request.remote_addr)
        if not by_address.allowed:
            return _rate_limited(by_address)
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            user = user_for_token(token.strip()) if scheme.lower() == "bearer" else None
            if user is None:
                return _unauthorized("The API token is not valid.")
        elif current_user.is_authenticated:
            user = current_user._get_current_object()
        else:
            return _unauthorized("Send an API token: Authorization: Bearer <token>.")
        by_user = api_hit_by_user(user)
        if not by_user.allowed:
            return _rate_limited(by_user)
        g.api_user = user
        return view(*args, **kwargs)

    return wrapped


def _rate_limited(decision):
    response = jsonify(
        error="rate_limited",
        message=f"Too many requests. Try again in {decision.retry_after} s.",
        retry_after=decision.retry_after,
    )
    response.status_code = 429
    response.headers["Retry-After"] = str(decision.retry_after)
    return response


def _unauthorized(message: str):
    response = jsonify(error="unauthorized", message=message)
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Bearer realm="switchboard"'
    return response


def _int(name: str, *, minimum: int = 1, maximum: int = DB_INT_MAX) -> int | None:
    """An id, cursor or size: absent is None; present, it must be a whole number in range
    (ids are INTEGER columns, so a larger number can match nothing and is refused)."""
    raw = request.args.get(name)
    if raw is None:
        return None
    message = f"{name} must be a whole number from {minimum} to {maximum}."
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise BadParameter(name, message)
    value = int(raw)
    if value < minimum or value > maximum:
        raise BadParameter(name, message)
    return value


def _datetime(name: str) -> datetime | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    message = f"{name} must be a date and time with its offset, e.g. 2026-01-31T08:00:00Z."
    if not RFC3339.fullmatch(raw):
        raise BadParameter(name, message)
    try:
        return datetime.fromisoformat(raw.upper().replace("Z", "+00:00"))
    except ValueError:  # well-formed but no such moment (a 13th month, a leap second)
        raise BadParameter(name, message) from None


def _cursor() -> int | None:
    # The id of the last item of the previous page: items older than it come next.
    return _int("cursor")


def _choice(name: str, choices) -> str | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    if raw not in choices:
        raise BadParameter(name, f"{name} must be one of: {', '.join(choices)}.")
    return raw


def _page(stmt, id_column, serialise, endpoint: str):
    limit = _int("limit", minimum=1, maximum=MAX_PAGE_SIZE) or PAGE_SIZE
    cursor = _cursor()
    if cursor is not None:
        stmt = stmt.where(id_column < cursor)
    rows = list(db.session.scalars(stmt.order_by(id_column.desc()).limit(limit + 1)))
    next_url = None
    if len(rows) > limit:
        rows = rows[:limit]
        args = {k: v for k, v in request.args.items() if k != "cursor"}
        next_url = url_for(endpoint, _external=True, cursor=rows[-1].id, **args)
    return jsonify(results=[serialise(r) for r in rows], next=next_url)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def device_json(device: Device) -> dict:
    return {
        "id": device.id,
        "api_device_id": device.api_device_id,
        "manufacturer": device.manufacturer.code,
        "kind": device.kind,
        "name": device.name,
        "model": device.model,
        "firmware": device.firmware,
        "ip_address": device.ip_address,
        "location_id": device.location_id,
        "is_online": device.is_online,
        "last_seen": _iso(device.last_seen),
        "maintenance_mode": device.maintenance_mode,
        "state": device.state or {},
    }


def activity_json(row: ActivityLog) -> dict:
    return {
        "id": row.id,
        "activity_type": row.activity_type,
        "operation": row.operation,
        "status": row.status,
        "summary": row.summary,
        "details": row.details or {},
        "device_id": row.device_id,
        "service_code": row.service_code,
        "created_at": _iso(row.created_at),
    }


@bp.get("/devices/")
@api_auth
def devices():
    stmt = select(Device).where(Device.tenant_id == g.api_user.tenant_id)
    location = _int("location")
    if location is not None:
        stmt = stmt.where(Device.location_id == location)
    online = _choice("online", ("true", "false"))
    if online is not None:
        stmt = stmt.where(Device.is_online.is_(online == "true"))
    manufacturer = request.args.get("manufacturer")
    if manufacturer:
        stmt = stmt.join(Manufacturer, Manufacturer.id == Device.manufacturer_id).where(
            Manufacturer.code == manufacturer[:32]
        )
    return _page(stmt, Device.id, device_json, "api.devices")


@bp.get("/activity-logs/")
@api_auth
def activity_logs():
    stmt = select(ActivityLog).where(ActivityLog.tenant_id == g.api_user.tenant_id)
    # `type` is the activity page's name for the same filter.
    activity_type = request.args.get("activity_type") or request.args.get("type")
    if activity_type:
        stmt = stmt.where(ActivityLog.activity_type == activity_type[:48])
    status = _choice("status", ACTIVITY_STATUSES)
    if status:
        stmt = stmt.where(ActivityLog.status == status)
    device = _int("device")
    if device is not None:
        stmt = stmt.where(ActivityLog.device_id == device)
    service = request.args.get("service")
    if service:
        stmt = stmt.where(ActivityLog.service_code == service[:32])
    since, until = _datetime("since"), _datetime("until")
    if since:
        stmt = stmt.where(ActivityLog.created_at >= since)
    if until:
        stmt = stmt.where(ActivityLog.created_at < until)
    return _activity_page(stmt)


def _activity_page(stmt):
    """Newest first, pages linked both ways: `next` (older rows, `cursor`) and `previous`
    (newer rows, `after`), each a URL or null."""
    limit = _int("limit", minimum=1, maximum=MAX_PAGE_SIZE) or PAGE_SIZE
    after = _int("after")
    cursor = None if after is not None else _cursor()
    column = ActivityLog.id
    if after is not None:
        newer = list(
            db.session.scalars(stmt.where(column > after).order_by(column.asc()).limit(limit + 1))
        )
        more_newer = len(newer) > limit
        rows = list(reversed(newer[:limit]))
        has_previous, has_next = more_newer, bool(rows)
    else:
        if cursor is not None:
            stmt = stmt.where(column < cursor)
        rows = list(db.session.scalars(stmt.order_by(column.desc()).limit(limit + 1)))
        has_next = len(rows) > limit
        rows = rows[:limit]
        has_previous = cursor is not None and bool(rows)
    args = {k: v for k, v in request.args.items() if k not in ("cursor", "after")}
    next_url = previous_url = None
    if has_next and rows:
        next_url = url_for("api.activity_logs", _external=True, cursor=rows[-1].id, **args)
    if has_previous and rows:
        previous_url = url_for("api.activity_logs", _external=True, after=rows[0].id, **args)
    return jsonify(results=[activity_json(r) for r in rows], next=next_url, previous=previous_url)


@bp.get("/openapi.json")
def openapi():
    return jsonify(openapi_document(request.host_url.rstrip("/")))
