"""Handlers and tasks for outgoing webhooks.

`webhooks.fanout` runs once per event and writes, in its own transaction, one pending
delivery row per active endpoint of the tenant whose topics match; after the commit it sends
one `webhooks.deliver` message per row. Each message makes one attempt (services/webhooks.py:
claimed in the database before the POST, so a duplicate message sends nothing) and, on a
network error, 429 or 5xx, makes the row due again after a backoff until WEBHOOK_MAX_ATTEMPTS.
The periodic `webhooks.relay` sends due rows (retries, and rows whose message was lost with
Redis or a dying worker) and hands back claims whose worker died. An endpoint that gave up on
WEBHOOK_DISABLE_AFTER_FAILURES events in a row is disabled and its admins are notified.
"""

from __future__ import annotations

from events.registry import Event, handler, periodic, task
from services import webhooks as svc
from services.notifications import notification_rule

notification_rule(
    "webhook_endpoint.disabled",
    type="webhook_disabled",
    recipients="tenant_admins",
    title=lambda e: f"Webhook to {e.payload.get('host') or 'an endpoint'} was disabled",
    body=lambda e: e.payload.get("reason", ""),
    link=lambda e: f"/webhooks/{e.entity_id}",
    subject=lambda e: f"webhook_endpoint:{e.entity_id}",
)


# In the "events" group with live_feed, not on the webhooks queue: finding the endpoints is one
# indexed SELECT (none at all for most tenants), not worth a Dramatiq message of its own for
# every event; the deliveries, which wait on other people's servers, run on "webhooks".
@handler("*", name="webhooks.fanout")
def fanout(event: Event) -> None:
    targets = svc.matching_endpoint_ids(event.tenant_id, event.topic)
    if targets:
        # The rows are the delivery's durable state; the after-commit send only saves the
        # relay's delay, and losing it loses nothing.
        svc.send_after_commit(svc.create_messages(event, targets))


# Retries of the message itself are for a database error before the POST; the delivery's own
# retries are rows made due again. The time limit stays below WEBHOOK_SEND_LEASE_SECONDS.
@task(
    name="webhooks.deliver",
    queue="webhooks",
    max_retries=3,
    time_limit_ms=120_000,
    min_backoff_ms=1_000,
    max_backoff_ms=30_000,
)
def deliver(message_id: int, event_pk: int | None = None, **_legacy: object) -> None:
    """One attempt at one delivery row. A message queued before deliveries had rows
    carried (endpoint id, event pk): its row is found or written first."""
    if event_pk is not None:
        adopted = svc.adopt_legacy_delivery(message_id, event_pk)
        if adopted is None:
            return
        message_id = adopted
    svc.deliver(message_id)
    _publish_attempt(message_id)


def _publish_attempt(message_id: int) -> None:
    """The endpoint's open detail pages show the attempt just recorded (best effort: a
    page that misses it gets the list again with its next snapshot)."""
    import logging

    from blueprints.webhooks.routes import publish_deliveries
    from extensions import db
    from models.webhooks import WebhookMessage

    try:
        message = db.session.get(WebhookMessage, message_id)
        if message is not None:
            publish_deliveries(message.tenant_id, message.endpoint_id)
    except Exception:  # noqa: BLE001 - the attempt is recorded; a live frame is not worth a retry
        db.session.rollback()
        logging.getLogger(__name__).exception("could not publish webhook delivery %s", message_id)


@periodic("WEBHOOK_RELAY_INTERVAL", name="webhooks.relay")
def relay() -> None:
    svc.relay()
