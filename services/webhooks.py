"""Outgoing webhooks: matching endpoints, signing, and the durable delivery of one event to
one endpoint (a `WebhookMessage` row: claimed before it is POSTed, retried from the row).

Every request carries the Standard Webhooks headers:
    webhook-id         msg_<hex>, the same for every attempt and re-send of one event to one
                       endpoint: receivers dedupe on it (delivery is at least once)
    webhook-timestamp  unix seconds
    webhook-signature  v1,<base64 HMAC-SHA256(key, f"{webhook-id}.{webhook-timestamp}.{body}")>
                       where key is the base64-decoded secret after `whsec_`
and, as before, `X-Switchboard-Event`, `X-Switchboard-Timestamp` and
`X-Switchboard-Signature: sha256=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>`. Receivers
should reject timestamps far from their clock, so a captured request cannot be replayed later.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import http.client
import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from flask import current_app
from sqlalchemy import bindparam, select, update

from extensions import db
from models.base import utcnow
from models.events import OutboxEvent
from models.webhooks import (
    WebhookDelivery,
    WebhookEndpoint,
    WebhookMessage,
    new_webhook_secret,
    webhook_message_id,
)
from services import netpolicy

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Switchboard-Signature"
TIMESTAMP_HEADER = "X-Switchboard-Timestamp"
EVENT_HEADER = "X-Switchboard-Event"
STANDARD_ID_HEADER = "webhook-id"
STANDARD_TIMESTAMP_HEADER = "webhook-timestamp"
STANDARD_SIGNATURE_HEADER = "webhook-signature"
USER_AGENT = "Switchboard-Webhooks/1.0"

# Topics never sent to endpoints (deliveries are not events; kept in case that changes).
EXCLUDED_TOPICS = ("webhook_delivery.*",)

MAX_TOPICS = 50
# Topics are `<entity>.<action>` in lower case (chat.created, device_record.updated). A pattern
# is such a name with shell wildcards (*, ?, [abc], [!abc]) in its parts, or one part that has
# a * (`*`, `chat*`); anything else could never match and is refused when it is entered.
_TOPIC_PART = r"(?:[a-z0-9_*?-]|\[!?[a-z0-9_-]+\])+"
_TOPIC_RE = re.compile(rf"^(?:{_TOPIC_PART}(?:\.{_TOPIC_PART})+|[a-z0-9_?-]*\*[a-z0-9_*?-]*)$")
MAX_TOPIC_LENGTH = 80


# ---------------------------------------------------------------- validation


def validate_url(raw: str) -> str:
    """A trimmed http(s) URL whose host resolves only to addresses webhooks may go to;
    raises ValueError with a message for the form."""
    url = (raw or "").strip()
    if not url:
        raise ValueError("Enter a URL.")
    if len(url) > 2000:
        raise ValueError("The URL is too long.")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("The URL must start with http:// or https://.")
    if not parts.hostname:
        raise ValueError("The URL needs a host.")
    if any(ch.isspace() for ch in url):
        raise ValueError("The URL must not contain spaces.")
    try:
        port = parts.port or default_port(parts.scheme)
    except ValueError:
        raise ValueError("The URL's port must be a number from 1 to 65535.") from None
    if not 0 < port < 65536:
        raise ValueError("The URL's port must be a number from 1 to 65535.")
    # Resolved now so the admin learns at once; delivery resolves and checks again, since
    # what a name points to can change after it was saved.
    netpolicy.checked_addresses(parts.hostname, port, netpolicy.webhook_checker(current_app.config))
    return url


def default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def parse_topics(raw: str) -> list[str]:
    """Comma or space separated shell-style patterns; empty means every topic ("*")."""
    topics: list[str] = []
    for part in re.split(r"[,\s]+", raw or ""):
        if not part:
            continue
        if len(part) > MAX_TOPIC_LENGTH or not _TOPIC_RE.match(part):
            raise ValueError(
                f"“{part[:MAX_TOPIC_LENGTH]}” is not a topic pattern: use entity.action in lower "
                "case, such as chat.created or device.*, or * for every event."
            )
        if part not in topics:
            topics.append(part)
    if len(topics) > MAX_TOPICS:
        raise ValueError(f"At most {MAX_TOPICS} topic patterns.")
    return topics or ["*"]


def topic_matches(patterns: list[str] | None, topic: str) -> bool:
    if any(fnmatch.fnmatchcase(topic, p) for p in EXCLUDED_TOPICS):
        return False
    return any(fnmatch.fnmatchcase(topic, p) for p in (patterns or ()))


_ACTIVE_ENDPOINTS = (
    select(WebhookEndpoint.id, WebhookEndpoint.topics)
    .where(
        WebhookEndpoint.tenant_id == bindparam("tenant_id"),
        WebhookEndpoint.is_active.is_(True),
    )
    .order_by(WebhookEndpoint.id)
)


def matching_endpoint_ids(tenant_id: int | None, topic: str) -> list[int]:
    """Ids of the tenant's active endpoints subscribed to `topic`. Runs for every event (most
    tenants have none), so it reads two columns with a statement built once, not entities."""
    if tenant_id is None:
        return []
    # Read once per tenant and transaction: a batch of a poll's events asks fifty times.
    session = db.session()
    transaction = session.get_transaction()
    cached = session.info.get(_ENDPOINTS_CACHE)
    if cached is None or cached[0] is not transaction:
        cached = session.info[_ENDPOINTS_CACHE] = (transaction, {})
    rows = cached[1].get(tenant_id)
    if rows is None:
        rows = cached[1][tenant_id] = db.session.execute(
            _ACTIVE_ENDPOINTS, {"tenant_id": tenant_id}
        ).all()
    return [endpoint_id for endpoint_id, topics in rows if topic_matches(topics, topic)]


_ENDPOINTS_CACHE = "sb_webhook_endpoints"


def rotate_secret(endpoint: WebhookEndpoint) -> str:
    endpoint.secret = new_webhook_secret()
    endpoint.secret_rotated_at = utcnow()
    return endpoint.secret


# ---------------------------------------------------------------- signing and sending


def event_body(event: Any) -> bytes:
    """The JSON body for an event (an Event or an OutboxEvent row)."""
    created = event.created_at
    document = {
        "id": str(event.event_id),
        "topic": event.topic,
        "tenant_id": event.tenant_id,
        "entity": event.entity,
        "entity_id": event.entity_id,
        "payload": event.payload or {},
        "created_at": created.isoformat() if created is not None else None,
    }
    return json.dumps(document, separators=(",", ":"), default=str).encode()


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    message = f"{timestamp}.".encode() + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, timestamp, body), signature or "")


def standard_signing_key(secret: str) -> bytes:
    """Standard Webhooks' key: the base64 after `whsec_`. Secrets issued before that form was
    adopted are not valid base64; their bytes are the key (rotate to use a library)."""
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        return secret.encode()


def standard_signature(secret: str, webhook_id: str, timestamp: int | str, body: bytes) -> str:
    message = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(standard_signing_key(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@dataclass
class Attempt:
    status_code: int | None
    latency_ms: int
    error: str | None
    refused: bool = False  # never sent: another try would be refused too

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def retryable(self) -> bool:
        """Network errors, timeouts and 5xx (and 429) are worth another try; 3xx/4xx are not."""
        if self.refused:
            return False
        if self.status_code is None:
            return True
        return self.status_code >= 500 or self.status_code == 429


def post(url: str, secret: str, topic: str, body: bytes, webhook_id: str) -> Attempt:
    """POST a signed body once; never raises for HTTP or network failures.

    The host is resolved once here and the request goes to an address that passed the
    policy (a pinned connection); redirects are never followed, since a redirect would turn
    the POST into a GET without the body and could point anywhere."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port or default_port(parts.scheme)
        addresses = netpolicy.checked_addresses(
            host, port, netpolicy.webhook_checker(current_app.config)
        )
    except netpolicy.LookupFailed as exc:
        # Fail closed: nothing is sent, and a later attempt looks the name up again.
        return Attempt(status_code=None, latency_ms=0, error=f"{exc} Not sent."[:500])
    except ValueError as exc:  # refused by the policy, or a URL that no longer parses
        return Attempt(status_code=None, latency_ms=0, error=str(exc)[:500], refused=True)
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: topic,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        STANDARD_ID_HEADER: webhook_id,
        STANDARD_TIMESTAMP_HEADER: str(timestamp),
        STANDARD_SIGNATURE_HEADER: standard_signature(secret, webhook_id, timestamp, body),
    }
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    timeout = float(current_app.config["WEBHOOK_TIMEOUT_SECONDS"])
    if parts.scheme == "https":
        connection: http.client.HTTPConnection = netpolicy.PinnedHTTPSConnection(
            host, port, addresses, timeout
        )
    else:
        connection = netpolicy.PinnedHTTPConnection(host, port, addresses, timeout)
    started = time.monotonic()
    status: int | None = None
    error: str | None = None
    try:
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        status = response.status
        response.read(65536)
        if not 200 <= status < 300:
            error = f"HTTP {status} {response.reason}"[:500]
    except (OSError, http.client.HTTPException) as exc:
        error = f"network error: {type(exc).__name__}: {exc}"[:500]
    except ValueError as exc:  # e.g. control characters in the path
        error = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        connection.close()
    latency = int((time.monotonic() - started) * 1000)
    return Attempt(status_code=status, latency_ms=latency, error=error)


def backoff_ms(attempt: int) -> int:
    """Wait before attempt `attempt + 1`: WEBHOOK_RETRY_MIN_MS * 2**(attempt-1), capped."""
    config = current_app.config
    base = int(config["WEBHOOK_RETRY_MIN_MS"])
    cap = int(config["WEBHOOK_RETRY_MAX_MS"])
    return max(0, min(cap, base * 2 ** max(0, attempt - 1)))


# ---------------------------------------------------------------- durable deliveries

# Rows the relay takes per tick, for each of its two scans.
RELAY_BATCH = 500

_INSERT_STMTS: dict[str, Any] = {}


def _insert_messages_stmt(dialect: str):
    """INSERT … ON CONFLICT (endpoint, event) DO NOTHING RETURNING id, built once per dialect:
    a fan-out run twice for one event adds nothing the second time."""
    stmt = _INSERT_STMTS.get(dialect)
    if stmt is None:
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        table = WebhookMessage.__table__
        stmt = (
            insert(table)
            .on_conflict_do_nothing(index_elements=["endpoint_id", "event_pk"])
            .returning(table.c.id)
        )
        _INSERT_STMTS[dialect] = stmt
    return stmt


def _can_send_now() -> bool:
    from tasks.broker import tasks_state

    return tasks_state().can_dispatch_now()


def create_messages(event: Any, endpoint_ids: Iterable[int]) -> list[int]:
    """Write one pending delivery per endpoint for the event, in the caller's transaction;
    the ids of the rows written (none for endpoints that already have this event)."""
    now = utcnow()
    # Marked as sent when the after-commit send will follow at once, so the relay does not
    # send a second message for them in the meantime.
    enqueued_at = now if _can_send_now() else None
    rows = [
        {
            "tenant_id": event.tenant_id,
            "endpoint_id": endpoint_id,
            "event_pk": event.id,
            "event_id": event.event_id,
            "topic": event.topic,
            "webhook_id": webhook_message_id(endpoint_id, event.event_id),
            "status": "pending",
            "attempts": 0,
            "is_resend": False,
            "next_attempt_at": now,
            "enqueued_at": enqueued_at,
            "created_at": now,
        }
        for endpoint_id in endpoint_ids
    ]
    if not rows:
        return []
    conn = db.session.connection()
    return [row.id for row in conn.execute(_insert_messages_stmt(conn.dialect.name), rows)]


def send_messages(message_ids: Iterable[int]) -> int:
    """Send a delivery message for each row; returns how many were sent. A failed send only
    delays the delivery: the row stays pending and the relay sends it again later."""
    from tasks.broker import tasks_state

    state = tasks_state()
    if not state.can_dispatch_now():
        return 0
    actor = state.actors["webhooks.deliver"]
    sent = 0
    for message_id in message_ids:
        try:
            actor.send(message_id)
        except Exception as exc:  # noqa: BLE001 - broker unreachable: the relay resends
            log.warning("could not send webhook delivery %s to the broker: %s", message_id, exc)
            break
        sent += 1
    return sent


def send_after_commit(message_ids: list[int]) -> None:
    from events.outbox import on_commit

    if message_ids:
        on_commit(lambda: send_messages(message_ids))


def request_resend(endpoint: WebhookEndpoint, delivery: WebhookDelivery) -> str | None:
    """Make the event of an earlier attempt due again as a re-send, with the same webhook-id;
    returns why not, for the admin, or None. The caller commits."""
    message = db.session.scalar(
        select(WebhookMessage)
        .where(
            WebhookMessage.endpoint_id == endpoint.id,
            WebhookMessage.event_pk == delivery.event_pk,
        )
        .with_for_update()
    )
    if message is None:  # an attempt recorded before deliveries had rows of their own
        message = WebhookMessage(
            tenant_id=endpoint.tenant_id,
            endpoint_id=endpoint.id,
            event_pk=delivery.event_pk,
            event_id=delivery.event_id,
            topic=delivery.topic,
            webhook_id=webhook_message_id(endpoint.id, delivery.event_id),
        )
        db.session.add(message)
    elif message.status == "sending":
        return "This delivery is being sent right now; re-send it once that attempt is listed."
    now = utcnow()
    message.status = "pending"
    message.attempts = 0
    message.is_resend = True
    message.next_attempt_at = now
    message.claimed_until = None
    message.enqueued_at = now if _can_send_now() else None
    db.session.flush()
    send_after_commit([message.id])
    return None


@dataclass
class Claim:
    """A delivery this worker has claimed, as primitives."""

    id: int
    tenant_id: int
    endpoint_id: int
    event_pk: int
    event_id: Any
    topic: str
    webhook_id: str
    attempt: int
    is_resend: bool


def lease_seconds() -> float:
    return float(current_app.config["WEBHOOK_SEND_LEASE_SECONDS"])


def claim(message_id: int) -> Claim | None:
    """Take a due pending delivery for this worker (pending → sending), counting the attempt;
    None when another worker has it, it is finished, or its next attempt is not yet due.

    One UPDATE with the state in its WHERE: on PostgreSQL a concurrent claim waits for the
    row lock and then no longer matches, on SQLite writers take turns; either way exactly
    one claimer wins, and the claim is committed before anything is POSTed."""
    now = utcnow()
    table = WebhookMessage.__table__
    row = db.session.execute(
        update(table)
        .where(
            table.c.id == message_id,
            table.c.status == "pending",
            table.c.next_attempt_at <= now,
        )
        .values(
            status="sending",
            attempts=table.c.attempts + 1,
            claimed_until=now + timedelta(seconds=lease_seconds()),
        )
        .returning(
            table.c.id,
            table.c.tenant_id,
            table.c.endpoint_id,
            table.c.event_pk,
            table.c.event_id,
            table.c.topic,
            table.c.webhook_id,
            table.c.attempts,
            table.c.is_resend,
        )
    ).first()
    if row is None:
        return None
    return Claim(
        id=row.id,
        tenant_id=row.tenant_id,
        endpoint_id=row.endpoint_id,
        event_pk=row.event_pk,
        event_id=row.event_id,
        topic=row.topic,
        webhook_id=row.webhook_id,
        attempt=row.attempts,
        is_resend=row.is_resend,
    )


def _finish(claimed: Claim, status: str, next_attempt_at=None) -> bool:
    """Move our claimed row on; False when the claim was no longer ours (its lease ran out
    and the relay handed it on), in which case the row is left to its new owner."""
    table = WebhookMessage.__table__
    values: dict[str, Any] = {"status": status, "claimed_until": None, "enqueued_at": None}
    if next_attempt_at is not None:
        values["next_attempt_at"] = next_attempt_at
    result = db.session.execute(
        update(table)
        .where(
            table.c.id == claimed.id,
            table.c.status == "sending",
            table.c.attempts == claimed.attempt,
        )
        .values(**values)
    )
    return result.rowcount == 1


def _attempt_row(claimed: Claim, **fields: Any) -> WebhookDelivery:
    return WebhookDelivery(
        tenant_id=claimed.tenant_id,
        endpoint_id=claimed.endpoint_id,
        event_pk=claimed.event_pk,
        event_id=claimed.event_id,
        topic=claimed.topic,
        webhook_id=claimed.webhook_id,
        attempt=claimed.attempt,
        is_resend=claimed.is_resend,
        **fields,
    )


def deliver(message_id: int) -> None:
    """Make one attempt at one delivery: claim it (committed), POST it with no transaction
    open, record the outcome and, on a network error, 429 or 5xx, make the row due again
    after the backoff. Commits; raises on database errors (the message is then retried,
    and finds the row pending again or still claimed)."""
    session = db.session
    claimed = claim(message_id)
    if claimed is None:
        session.commit()
        return  # a copy of this message, or the relay's, got there first
    endpoint = session.get(WebhookEndpoint, claimed.endpoint_id)
    if endpoint is None or (not endpoint.is_active and not claimed.is_resend):
        _finish(claimed, "skipped")  # disabled meanwhile: an admin can re-send
        session.commit()
        return
    event = session.get(OutboxEvent, claimed.event_pk)
    if event is None:
        _finish(claimed, "failed")
        session.add(
            _attempt_row(
                claimed, error="The event is no longer stored; it cannot be sent.", final=True
            )
        )
        session.commit()
        return
    body = event_body(event)
    url, secret = endpoint.url, endpoint.secret
    session.commit()  # the claim is durable before the POST; no transaction during it

    result = post(url, secret, claimed.topic, body, claimed.webhook_id)

    max_attempts = int(current_app.config["WEBHOOK_MAX_ATTEMPTS"])
    final = result.succeeded or not result.retryable or claimed.attempt >= max_attempts
    error = result.error
    if final and not result.succeeded and result.retryable:
        error = f"{error or 'failed'}; gave up after {claimed.attempt} attempts"
    session.add(
        _attempt_row(
            claimed,
            status_code=result.status_code,
            latency_ms=result.latency_ms,
            error=error,
            succeeded=result.succeeded,
            final=final,
        )
    )
    if result.succeeded:
        still_ours = _finish(claimed, "delivered")
    elif final:
        still_ours = _finish(claimed, "failed")
    else:
        due = utcnow() + timedelta(milliseconds=backoff_ms(claimed.attempt))
        still_ours = _finish(claimed, "pending", next_attempt_at=due)
    if still_ours:
        _count_outcome(claimed.endpoint_id, result.succeeded, final)
    session.commit()


def _count_outcome(endpoint_id: int, succeeded: bool, final: bool) -> None:
    if succeeded:
        record_success(endpoint_id)
    elif final:
        failures = record_give_up(endpoint_id)
        endpoint = db.session.get(WebhookEndpoint, endpoint_id)
        if endpoint is not None:
            disable_if_failing(endpoint, failures)


def adopt_legacy_delivery(endpoint_id: int, event_pk: int) -> int | None:
    """The row for a delivery message queued before deliveries had rows (its arguments were
    the endpoint and the event); None when there is nothing left to send. Commits."""
    message_id = db.session.scalar(
        select(WebhookMessage.id).where(
            WebhookMessage.endpoint_id == endpoint_id, WebhookMessage.event_pk == event_pk
        )
    )
    if message_id is None:
        event = db.session.get(OutboxEvent, event_pk)
        if event is None or db.session.get(WebhookEndpoint, endpoint_id) is None:
            db.session.commit()
            return None
        created = create_messages(event, [endpoint_id])
        message_id = created[0] if created else None
    db.session.commit()
    return message_id


@dataclass
class RelayReport:
    sent: int = 0
    reclaimed: int = 0


UNKNOWN_OUTCOME = (
    "No outcome was recorded (the worker stopped, or the database was unreachable after "
    "the request); sent again with the same webhook-id."
)


def relay() -> RelayReport:
    """Hand claims whose lease ran out back to the queue, and send a message for every due
    pending delivery that has none in flight. Safe to run in many processes at once."""
    report = RelayReport()
    report.reclaimed = _reclaim_expired()
    due = _take_due()
    if due:
        report.sent = send_messages(due)
        unsent = due[report.sent :]
        if unsent:  # the broker is away: due again at the next tick
            db.session.execute(
                update(WebhookMessage)
                .where(WebhookMessage.id.in_(unsent))
                .values(enqueued_at=None)
                .execution_options(synchronize_session=False)
            )
            db.session.commit()
    return report


def _reclaim_expired() -> int:
    session = db.session
    now = utcnow()
    stmt = (
        select(WebhookMessage)
        .where(WebhookMessage.status == "sending", WebhookMessage.claimed_until <= now)
        .order_by(WebhookMessage.id)
        .limit(RELAY_BATCH)
    )
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    expired = list(session.scalars(stmt))
    max_attempts = int(current_app.config["WEBHOOK_MAX_ATTEMPTS"])
    for message in expired:
        claimed = Claim(
            id=message.id,
            tenant_id=message.tenant_id,
            endpoint_id=message.endpoint_id,
            event_pk=message.event_pk,
            event_id=message.event_id,
            topic=message.topic,
            webhook_id=message.webhook_id,
            attempt=message.attempts,
            is_resend=message.is_resend,
        )
        final = message.attempts >= max_attempts
        error = UNKNOWN_OUTCOME
        if final:
            error = f"No outcome was recorded; gave up after {message.attempts} attempts."
        session.add(_attempt_row(claimed, error=error, final=final))
        message.status = "failed" if final else "pending"
        message.claimed_until = None
        message.enqueued_at = None
        message.next_attempt_at = now
        if final:
            session.flush()
            _count_outcome(message.endpoint_id, False, True)
    session.commit()
    return len(expired)


def _take_due() -> list[int]:
    """Mark up to RELAY_BATCH due deliveries as sent now and return them, oldest due first.
    A row sent less than WEBHOOK_REQUEUE_AFTER_SECONDS ago is left alone (its message is
    probably still queued); after that its message is taken to be lost and sent again."""
    now = utcnow()
    requeue_after = timedelta(seconds=float(current_app.config["WEBHOOK_REQUEUE_AFTER_SECONDS"]))
    table = WebhookMessage.__table__
    due = (
        select(table.c.id)
        .where(
            table.c.status == "pending",
            table.c.next_attempt_at <= now,
            (table.c.enqueued_at.is_(None)) | (table.c.enqueued_at <= now - requeue_after),
        )
        .order_by(table.c.next_attempt_at)
        .limit(RELAY_BATCH)
    )
    session = db.session
    if session.get_bind().dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)
    # Read first: most ticks find nothing, and on SQLite an UPDATE takes the one write lock
    # even when it matches no row.
    ids = list(session.scalars(due))
    if ids:
        session.execute(
            update(table)
            .where(table.c.id.in_(ids))
            .values(enqueued_at=now)
            .execution_options(synchronize_session=False)
        )
    session.commit()
    return ids


# ---------------------------------------------------------------- endpoint health


def record_success(endpoint_id: int) -> None:
    db.session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.consecutive_failures != 0)
        .values(consecutive_failures=0)
        .execution_options(synchronize_session=False)
    )


def record_give_up(endpoint_id: int) -> int:
    """Count one more event given up on; returns the new count."""
    db.session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id)
        .values(consecutive_failures=WebhookEndpoint.consecutive_failures + 1)
        .execution_options(synchronize_session=False)
    )
    return int(
        db.session.scalar(
            select(WebhookEndpoint.consecutive_failures).where(WebhookEndpoint.id == endpoint_id)
        )
        or 0
    )


def disable_if_failing(endpoint: WebhookEndpoint, failures: int) -> bool:
    """Disable the endpoint once it reached the limit; emits webhook_endpoint.disabled once."""
    from events.outbox import emit

    limit = int(current_app.config["WEBHOOK_DISABLE_AFTER_FAILURES"])
    if limit <= 0 or failures < limit:
        return False
    reason = f"Disabled after {failures} events in a row could not be delivered."
    result = db.session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint.id, WebhookEndpoint.is_active.is_(True))
        .values(is_active=False, disabled_reason=reason)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False  # already disabled (by another delivery or an admin)
    emit(
        "webhook_endpoint.disabled",
        tenant_id=endpoint.tenant_id,
        entity="webhook_endpoint",
        entity_id=endpoint.id,
        payload={"host": endpoint.host, "consecutive_failures": failures, "reason": reason},
    )
    return True
