"""Outgoing webhooks: matching endpoints, signing and POSTing one event, scheduling retries.

Receivers verify a request by recomputing
    HMAC-SHA256(secret, f"{X-Switchboard-Timestamp}.{raw body}")
and comparing it with the hex digest in `X-Switchboard-Signature: sha256=<hex>`; they should
also reject timestamps far from their clock, so a captured request cannot be replayed later.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import http.client
import json
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from flask import current_app
from sqlalchemy import bindparam, select, update

from extensions import db
from models.base import utcnow
from models.webhooks import WebhookEndpoint, new_webhook_secret
from services import netpolicy

SIGNATURE_HEADER = "X-Switchboard-Signature"
TIMESTAMP_HEADER = "X-Switchboard-Timestamp"
EVENT_HEADER = "X-Switchboard-Event"
DELIVERY_HEADER = "X-Switchboard-Delivery"
USER_AGENT = "Switchboard-Webhooks/1.0"

# Topics never sent to endpoints (deliveries are not events; kept in case that changes).
EXCLUDED_TOPICS = ("webhook_delivery.*",)

MAX_TOPICS = 50
_TOPIC_RE = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]{1,80}$")


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
        if not _TOPIC_RE.match(part):
            raise ValueError(f"Not a topic pattern: {part[:80]!r}.")
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


def post(url: str, secret: str, topic: str, body: bytes, delivery_ref: str = "") -> Attempt:
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
    }
    if delivery_ref:
        headers[DELIVERY_HEADER] = delivery_ref
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


def schedule_delivery(
    endpoint_id: int,
    event_pk: int,
    attempt: int = 1,
    is_resend: bool = False,
    delay_ms: int | None = None,
) -> None:
    """Enqueue the delivery task (optionally delayed) on the app's broker."""
    from tasks.broker import tasks_state

    actor = tasks_state().actors["webhooks.deliver"]
    actor.send_with_options(
        args=(endpoint_id, event_pk),
        kwargs={"attempt": attempt, "is_resend": is_resend},
        delay=delay_ms or None,
    )


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
