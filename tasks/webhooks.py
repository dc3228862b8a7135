"""Handlers and tasks for outgoing webhooks.

`webhooks.fanout` runs once per event and, after its transaction commits, sends one
`webhooks.deliver` task per active endpoint of the tenant whose topics match. Each delivery
task makes one attempt, records it, and schedules the next one (exponential backoff) on a
network error or a 5xx until WEBHOOK_MAX_ATTEMPTS; an endpoint that gave up on
WEBHOOK_DISABLE_AFTER_FAILURES events in a row is disabled and its admins are notified.
"""

from __future__ import annotations

import logging

from flask import current_app

from events.outbox import on_commit
from events.registry import Event, handler, task
from extensions import db
from models.events import OutboxEvent
from models.webhooks import WebhookDelivery, WebhookEndpoint
from services import webhooks as svc
from services.notifications import notification_rule

log = logging.getLogger(__name__)

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
    if not targets:
        return

    def send_all() -> None:
        for endpoint_id in targets:
            svc.schedule_delivery(endpoint_id, event.id)

    on_commit(send_all)


@task(name="webhooks.deliver", queue="webhooks", max_retries=0, time_limit_ms=120_000)
def deliver(endpoint_id: int, event_pk: int, attempt: int = 1, is_resend: bool = False) -> None:
    """One attempt to POST one event to one endpoint."""
    session = db.session
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None:
        return  # deleted meanwhile
    if not endpoint.is_active and not is_resend:
        return  # disabled meanwhile: no more attempts (an admin can re-send)
    row = session.get(OutboxEvent, event_pk)
    if row is None:
        _record_missing(endpoint, event_pk, attempt, is_resend)
        return
    body = svc.event_body(row)
    url, secret, topic = endpoint.url, endpoint.secret, row.topic
    tenant_id, event_id = endpoint.tenant_id, row.event_id
    session.commit()  # hold no transaction during the HTTP request

    result = svc.post(url, secret, topic, body)

    max_attempts = int(current_app.config["WEBHOOK_MAX_ATTEMPTS"])
    final = result.succeeded or not result.retryable or attempt >= max_attempts
    error = result.error
    if final and not result.succeeded and result.retryable:
        error = f"{error or 'failed'}; gave up after {attempt} attempts"
    session.add(
        WebhookDelivery(
            tenant_id=tenant_id,
            endpoint_id=endpoint_id,
            event_pk=event_pk,
            event_id=event_id,
            topic=topic,
            attempt=attempt,
            is_resend=is_resend,
            status_code=result.status_code,
            latency_ms=result.latency_ms,
            error=error,
            succeeded=result.succeeded,
            final=final,
        )
    )
    if result.succeeded:
        svc.record_success(endpoint_id)
    elif final:
        failures = svc.record_give_up(endpoint_id)
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        if endpoint is not None:
            svc.disable_if_failing(endpoint, failures)
    session.commit()

    if not final:
        svc.schedule_delivery(
            endpoint_id,
            event_pk,
            attempt=attempt + 1,
            is_resend=is_resend,
            delay_ms=svc.backoff_ms(attempt),
        )


def _record_missing(endpoint: WebhookEndpoint, event_pk: int, attempt: int, is_resend: bool):
    import uuid

    previous = db.session.scalar(
        db.select(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint.id, WebhookDelivery.event_pk == event_pk)
        .limit(1)
    )
    db.session.add(
        WebhookDelivery(
            tenant_id=endpoint.tenant_id,
            endpoint_id=endpoint.id,
            event_pk=event_pk,
            event_id=previous.event_id if previous else uuid.UUID(int=0),
            topic=previous.topic if previous else "",
            attempt=attempt,
            is_resend=is_resend,
            error="The event is no longer stored; it cannot be sent.",
            final=True,
        )
    )
    db.session.commit()
