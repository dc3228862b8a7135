"""A handler used only by the tests: its effect is one ActivityLog row per event."""

from __future__ import annotations

from events.registry import Event, handler
from extensions import db
from models.devices import ActivityLog


@handler("test.counted", name="test_counter", max_retries=0)
def count_event(event: Event) -> None:
    db.session.add(
        ActivityLog(
            tenant_id=event.tenant_id,
            activity_type="test",
            summary=f"counted {event.payload.get('n')}",
            event_id=event.id,
        )
    )


@handler("test.slow", name="test_slow", max_retries=3)
def slow_event(event: Event) -> None:
    """Takes a while, so a fault drill can kill the worker with this work in flight."""
    import time

    time.sleep(float(event.payload.get("sleep", 0)))
    db.session.add(
        ActivityLog(
            tenant_id=event.tenant_id,
            activity_type="slow",
            summary=f"slow {event.payload.get('n')}",
            event_id=event.id,
        )
    )
