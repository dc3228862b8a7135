"""The activity feed: the tenant's events, newest first, described for people."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from events.registry import Event
from extensions import db
from models.events import OutboxEvent

ACTION_WORDS = {"created": "created", "updated": "updated", "deleted": "deleted"}
MAX_CHANGES_SHOWN = 4
# What a feed item links to: the record itself, or the chat, device or project it belongs to.
LINK_TARGETS = {
    "chat": ("chats.detail", "chat_id"),
    "device": ("devices.detail", "device_id"),
    "project": ("projects.detail", "project_id"),
}


@dataclass(frozen=True)
class FeedItem:
    id: int
    topic: str
    entity: str
    action: str
    label: str
    detail: str
    created_at: datetime
    link_endpoint: str | None = None
    link_args: dict[str, int] | None = None


def _link(entity: str, action: str, entity_id: int | None, payload: dict) -> tuple:
    """(endpoint, url args) of the page the item is about, or (None, None). A deleted record
    has no page; its parent's still does."""
    target = LINK_TARGETS.get(entity)
    if target and entity_id and action != "deleted":
        return target[0], {target[1]: int(entity_id)}
    fields = payload.get("fields") if isinstance(payload.get("fields"), dict) else {}
    for endpoint, arg in LINK_TARGETS.values():
        value = fields.get(arg)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return endpoint, {arg: value}
    return None, None


def _describe_changes(changes: dict) -> str:
    parts = []
    for field_name, pair in list(changes.items())[:MAX_CHANGES_SHOWN]:
        old, new = (pair + [None, None])[:2] if isinstance(pair, list) else (None, pair)
        if isinstance(old, dict | list) or isinstance(new, dict | list):
            parts.append(f"{field_name} changed")
        else:
            parts.append(f"{field_name}: {_short(old)} → {_short(new)}")
    more = len(changes) - MAX_CHANGES_SHOWN
    if more > 0:
        parts.append(f"+{more} more")
    return "; ".join(parts)


def _short(value: object) -> str:
    text = "—" if value is None else str(value)
    return text if len(text) <= 40 else text[:39] + "…"


def describe(row: OutboxEvent | Event) -> FeedItem:
    """An outbox row, or the Event a handler got (it carries the same fields)."""
    payload = row.payload or {}
    entity, _, action = row.topic.rpartition(".")
    link_endpoint, link_args = _link(entity, action, row.entity_id, payload)
    label = str(payload.get("label") or payload.get("summary") or f"{entity} #{row.entity_id}")
    detail = ""
    if isinstance(payload.get("changes"), dict):
        detail = _describe_changes(payload["changes"])
    elif payload.get("detail"):
        detail = str(payload["detail"])
    return FeedItem(
        id=row.id,
        topic=row.topic,
        entity=(entity or row.topic).replace("_", " "),
        action=ACTION_WORDS.get(action, action.replace("_", " ")),
        label=label[:200],
        detail=detail[:300],
        created_at=row.created_at,
        link_endpoint=link_endpoint,
        link_args=link_args,
    )


def latest(
    tenant_id: int, *, before: int | None = None, after: int | None = None, limit: int = 50
) -> list[FeedItem]:
    """Newest first: the latest, those older than `before`, or the `limit` just newer
    than `after` (the page a "Newer" link goes back to)."""
    stmt = select(OutboxEvent).where(OutboxEvent.tenant_id == tenant_id)
    if after is not None:
        stmt = stmt.where(OutboxEvent.id > after).order_by(OutboxEvent.id.asc()).limit(limit)
        return [describe(row) for row in reversed(list(db.session.scalars(stmt)))]
    if before is not None:
        stmt = stmt.where(OutboxEvent.id < before)
    stmt = stmt.order_by(OutboxEvent.id.desc()).limit(limit)
    return [describe(row) for row in db.session.scalars(stmt)]
