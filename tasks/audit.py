"""The audit handler: every create/update/delete of a domain record, every login, role change
and export becomes an AuditLog row of the event's tenant, written exactly once per event."""

from __future__ import annotations

from typing import Any

from events.registry import Event, handler
from extensions import db
from models.accounts import User
from models.audit import AuditLog

# Explicit events and the action they are recorded as.
EXPLICIT_ACTIONS = {
    "user.logged_in": "login",
    "user.login_failed": "login_failed",
    "project.exported": "export",
    "project.export_completed": "export",
    "chat.exported": "export",
    "audit.exported": "export",
    "webhook_endpoint.disabled": "disabled",
}

# Columns that change as machines work (polling, counters, timestamps): an update touching
# only these is routine bookkeeping, not something a person did or needs to review.
ROUTINE_FIELDS = frozenset(
    {
        "last_seen",
        "missed_polls",
        "state",
        "battery_bars",
        "battery_minutes",
        "rf_level",
        "last_activity",
        "message_count",
        "total_files",
        "total_size",
        "total_tokens",
        "last_login_at",
        "offline_alerted_at",
        "offline_reminded_at",
        "consecutive_failures",
    }
)

MAX_TEXT = 200


def _trim(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_TEXT:
        return value[:MAX_TEXT] + "…"
    if isinstance(value, dict):
        return {k: _trim(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_trim(v) for v in value[:50]]
    return value


def _action_and_details(event: Event) -> tuple[str, dict[str, Any]] | None:
    payload = event.payload or {}
    if event.topic in EXPLICIT_ACTIONS:
        return EXPLICIT_ACTIONS[event.topic], _trim(payload)
    action = event.action
    if action == "updated":
        changes = {
            key: value
            for key, value in (payload.get("changes") or {}).items()
            if key not in ROUTINE_FIELDS
        }
        if not changes:
            return None
        if event.entity == "user" and "role" in changes:
            action = "role_changed"
        return action, _trim({"label": payload.get("label"), "changes": changes})
    if action in ("created", "deleted"):
        return action, _trim({"label": payload.get("label"), "fields": payload.get("fields")})
    return None


@handler(
    "*.created",
    "*.updated",
    "*.deleted",
    *EXPLICIT_ACTIONS,
    name="audit.record",
    queue="audit",
    max_retries=5,
    # A device's lifecycle events (device.updated among them) are what its receivers
    # reported, not a change anyone made: never an audit row (the device_record.* events are).
    exclude=("device.*",),
)
def record(event: Event) -> None:
    if event.tenant_id is None or event.entity is None:
        return
    found = _action_and_details(event)
    if found is None:
        return
    action, details = found
    label = "system"
    if event.topic == "user.login_failed":
        label = str((event.payload or {}).get("label") or "unknown")
    elif event.actor_user_id is not None:
        actor = db.session.get(User, event.actor_user_id)
        label = actor.email if actor is not None else f"user {event.actor_user_id}"
    db.session.add(
        AuditLog(
            tenant_id=event.tenant_id,
            actor_user_id=event.actor_user_id,
            actor_label=label[:254],
            action=action,
            object_type=event.entity,
            object_id=str(event.entity_id) if event.entity_id is not None else None,
            details=details,
            ip=event.actor_ip,
            created_at=event.created_at,
        )
    )
