"""Shared column types and the `Tracked` mixin that puts a model on the event spine."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import ClassVar

from sqlalchemy import DateTime, ForeignKey, Integer
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC timestamps on both SQLite (which drops the zone) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        if value is not None and dialect.name == "sqlite":
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Timestamps:
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Tracked:
    """Models with this mixin emit `<entity>.created|updated|deleted` outbox events.

    `__entity__` names the topic prefix; columns in `__event_exclude__` never enter payloads
    (large or secret values). Every tracked model carries `tenant_id` so its events reach
    that tenant only. `feed_label()` is the short text the activity feed shows.

    An update that changes only columns in `__event_routine__` writes no `updated` event:
    machine bookkeeping that an explicit domain event already describes (a device's online
    flag and levels are the `device.*` events' business), which would otherwise cost every
    such event a second round of handlers saying the same thing.
    """

    __entity__: ClassVar[str]
    __event_exclude__: ClassVar[frozenset[str]] = frozenset()
    __event_routine__: ClassVar[frozenset[str]] = frozenset()

    def feed_label(self) -> str:
        for attr in ("name", "title", "path", "email"):
            value = getattr(self, attr, None)
            if value:
                return str(value)[:120]
        return f"#{getattr(self, 'id', '?')}"


def tenant_fk(index: bool = True) -> Mapped[int]:
    return mapped_column(Integer, ForeignKey("tenants.id", ondelete="CASCADE"), index=index)
