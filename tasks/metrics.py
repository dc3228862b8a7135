"""Handlers for domain metrics (issue 3).

One handler on its own queue counts every event into `MetricCounter` rows. It runs in the
transaction that records the event as handled (tasks/broker.py `_run_one`), so a redelivered
event never counts twice, however many web and worker processes there are.
"""

from __future__ import annotations

from events.registry import Event, handler
from services import metrics

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
