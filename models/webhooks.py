"""Outgoing webhooks: the endpoints a tenant's events are POSTed to, the durable state of each
(endpoint, event) delivery, and every attempt made."""

from __future__ import annotations

import base64
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
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from extensions import db
from models.base import Timestamps, Tracked, UTCDateTime, tenant_fk, utcnow
from models.events import BigId


def new_webhook_secret() -> str:
    # Standard Webhooks' form: the key is the base64 (standard alphabet) after the prefix.
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def webhook_message_id(endpoint_id: int, event_id: uuid.UUID) -> str:
    """The `webhook-id` of one event sent to one endpoint: the same on every retry and
    re-send, different for another endpoint (one receiver may serve several endpoints)."""
    return "msg_" + uuid.uuid5(event_id, f"endpoint:{endpoint_id}").hex


# What a message is doing: waiting for its next attempt, being POSTed by a worker that
# claimed it, or finished.
MESSAGE_STATUSES = ("pending", "sending", "delivered", "failed", "skipped")


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


class WebhookMessage(db.Model):
    """One event to be sent to one endpoint: the durable state of its delivery.

    Written by the fan-out handler in its own transaction, so a delivery exists once the
    event is handled, whatever happens to Redis or to the after-commit send. A worker
    claims a due row (pending → sending, with a lease) and commits that before it POSTs:
    a second copy of the delivery message finds it claimed and sends nothing. A retry is a
    later `next_attempt_at` on the row, found by the periodic relay, never a delayed broker
    message. A claim whose lease ran out (worker killed, database unreachable after the
    POST) is retried with the same webhook-id: at least once, and receivers dedupe.
    """

    __tablename__ = "webhook_messages"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "event_pk"),
        # The relay's scan of due rows.
        Index("ix_webhook_messages_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = tenant_fk(index=False)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_pk: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    topic: Mapped[str] = mapped_column(String(80))
    webhook_id: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    # Attempts made in this round (the first send, or an admin's re-send).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    is_resend: Mapped[bool] = mapped_column(Boolean, default=False)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # A claim (status sending) older than this is taken to have died.
    claimed_until: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    # When a delivery message was last sent for it; the relay sends another only after
    # WEBHOOK_REQUEUE_AFTER_SECONDS, so a busy queue does not fill with copies.
    enqueued_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


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
    # The webhook-id header sent (none on attempts recorded before it existed).
    webhook_id: Mapped[Optional[str]] = mapped_column(String(64))
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
