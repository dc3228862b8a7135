"""Handlers for domain metrics (issue 3).

One handler on its own queue counts every event into `MetricCounter` rows. It runs in the
transaction that records the event as handled (tasks/broker.py `_run_one`), so a redelivered
event never counts twice, however many web and worker processes there are.
"""

from __future__ import annotations

import logging
import threading

from flask import current_app

from events.outbox import on_commit
from events.registry import Event, handler
from services import metrics

log = logging.getLogger(__name__)

GENERATION_TOPICS = {
    "project.generation_completed": "completed",
    "project.generation_failed": "failed",
}


@handler(
    "chat.created",
    "message.created",
    "device.*",
    *GENERATION_TOPICS,
    name="metrics.count",
    queue="metrics",
    last=True,  # its upsert locks the tenant's counters until the commit
)
def count_event(event: Event) -> None:
    if event.tenant_id is None:
        return
    day = metrics.event_day(event.created_at)
    fields = event.payload.get("fields") or {}
    if event.topic == "chat.created":
        metrics.record_chat(event.tenant_id, day, fields.get("agent_id"))
    elif event.topic == "message.created":
        metrics.record_message(
            event.tenant_id, day, str(fields.get("sender") or ""), fields.get("content")
        )
    elif event.topic.startswith("device."):
        metrics.record_device_event(event.tenant_id, day, event.action)
    elif event.topic in GENERATION_TOPICS:
        metrics.record_generation(event.tenant_id, day, GENERATION_TOPICS[event.topic])
    on_commit(lambda tenant_id=event.tenant_id: _schedule_live_update(tenant_id))


# Tenants whose open Metrics pages get new numbers soon. A burst of events renders the page
# once per tenant per METRICS_LIVE_DELAY_MS (not once per event), from committed counters.
_pending: set[int] = set()
_pending_lock = threading.Lock()


def _schedule_live_update(tenant_id: int) -> None:
    with _pending_lock:
        if tenant_id in _pending:
            return
        _pending.add(tenant_id)
    app = current_app._get_current_object()
    delay = int(app.config["METRICS_LIVE_DELAY_MS"]) / 1000
    timer = threading.Timer(delay, _publish_live_update, args=(app, tenant_id))
    timer.daemon = True
    timer.start()


def _publish_live_update(app, tenant_id: int) -> None:
    from blueprints.metrics.routes import publish_metrics
    from extensions import db

    with _pending_lock:
        _pending.discard(tenant_id)
    with app.app_context():
        try:
            if _first_since_commit(app, tenant_id):
                publish_metrics(tenant_id)
        except Exception:  # noqa: BLE001 - best effort: a page's next snapshot heals
            log.exception("could not publish the metrics of tenant %s", tenant_id)
        finally:
            db.session.remove()


def _first_since_commit(app, tenant_id: int) -> bool:
    """Whether no process has begun re-rendering this tenant's numbers within the last
    METRICS_LIVE_DELAY_MS. A timer fires that long after the commit it follows, so one that
    began since read that commit's counts: every worker process of a burst would otherwise
    render the same three pages. Unsure (shared state unreachable): render."""
    from services.kv import kv

    delay = int(app.config["METRICS_LIVE_DELAY_MS"]) / 1000
    try:
        return kv().claim(f"metrics-live:{tenant_id}", delay)
    except Exception:  # noqa: BLE001 - a redundant render is the safe side
        return True
