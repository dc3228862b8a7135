"""Outgoing webhooks: the endpoints a tenant's events are POSTed to, and every attempt made."""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime
from typing import Optional
from urllib.parse import urlsplit

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from extensions import db
from models.base import Timestamps, Tracked, UTCDateTime, tenant_fk, utcnow
from models.events import BigId


def new_webhook_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


class WebhookEndpoint(Tracked, Timestamps, db.Model):
    """A URL that receives the tenant's events whose topic matches one of `topics`.

    The secret signs every request; it never enters event payloads (audit, feed, webhooks).
    Rotating it changes `secret_rotated_at`, so the rotation itself is audited.
    """

    __tablename__ = "webhook_endpoints"
    __entity__ = "webhook_endpoint"
    __event_exclude__ = frozenset({"secret"})

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk()
    url: Mapped[str] = mapped_column(String(2000))
    secret: Mapped[str] = mapped_column(String(128), default=new_webhook_secret)
    secret_rotated_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    # Shell-style patterns such as "device.*" or "chat.created".
    topics: Mapped[list[str]] = mapped_column(JSON, default=list)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Events given up on in a row (a success resets it); reaching the limit disables the
    # endpoint. Changed with atomic UPDATEs by the delivery task, so concurrent deliveries
    # count right and routine counting is not an audited change.
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    disabled_reason: Mapped[Optional[str]] = mapped_column(String(500))

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or self.url[:60]

    def feed_label(self) -> str:
        # The host only: paths and queries of webhook URLs often carry tokens.
        return f"Webhook to {self.host}"[:120]

    def __repr__(self) -> str:
        return f"<WebhookEndpoint {self.id} {self.host!r}>"


class WebhookDelivery(db.Model):
    """One attempt to POST one event to one endpoint (not Tracked: no events about it)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # The endpoint page lists its deliveries newest first (keyset on id).
        Index("ix_webhook_deliveries_endpoint_id_id", "endpoint_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = tenant_fk(index=False)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    # The outbox row (no foreign key: the record of what was sent outlives pruned events).
    event_pk: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    topic: Mapped[str] = mapped_column(String(80))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    # Set when an admin asked for this delivery again from the endpoint page.
    is_resend: Mapped[bool] = mapped_column(Boolean, default=False)
    status_code: Mapped[Optional[int]] = mapped_column(Integer)
    latency_ms: Mapped[Optional[int]] = mapped_column(Integer)
    error: Mapped[Optional[str]] = mapped_column(Text)
    succeeded: Mapped[bool] = mapped_column(Boolean, default=False)
    # The last attempt for this event: no retry follows (success, 4xx, or attempts used up).
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    @property
    def outcome(self) -> str:
        if self.succeeded:
            return "delivered"
        return "gave up" if self.final else "will retry"
