"""Tasks and periodic jobs used only by tests/test_durable_jobs.py (also loaded into separate
`dramatiq` worker processes through EXTRA_ACTOR_MODULES)."""

from __future__ import annotations

import os
import threading
import time

from flask import current_app

from events.outbox import on_commit
from events.registry import Event, handler, periodic, task
from extensions import db
from models.devices import ActivityLog
from services.live import publish_after_commit, tenant_topic


@task(name="test.record_job", max_retries=2, min_backoff_ms=100, max_backoff_ms=200)
def record_job(tenant_id: int, label: str) -> None:
    """One ActivityLog row per run: the tests count runs by it."""
    db.session.add(ActivityLog(tenant_id=tenant_id, activity_type="job", summary=label))
    db.session.commit()


@task(name="test.failing_job", max_retries=1, min_backoff_ms=10, max_backoff_ms=20)
def failing_job(label: str) -> None:
    raise RuntimeError(f"{label} cannot be done")


slow_started = threading.Event()


# Off (interval 0) unless a test's config sets the interval: the registry is shared by every
# app the test session builds.
@periodic("TEST_SLOW_PERIODIC_INTERVAL", name="test_slow_periodic", time_limit_ms=30_000)
def slow_periodic() -> None:
    slow_started.set()
    time.sleep(float(current_app.config.get("TEST_SLOW_PERIODIC_SECONDS", 0)))


@periodic("TEST_TICK_PERIODIC_INTERVAL", name="test_tick_periodic")
def tick_periodic() -> None:
    pass


def die_now() -> None:
    """Ends the worker process at once, as a kill -9 would (no cleanup, no ack)."""
    os._exit(9)


@handler("test.live_then_die", name="test_live_then_die", max_retries=0)
def live_then_die(event: Event) -> None:
    """Publishes a live frame and, asked to, ends the worker right after the commit (before
    any after-commit callback could publish it)."""
    publish_after_commit(
        tenant_topic(event.tenant_id, "test-live"),
        f"test-live-{event.id}",
        html=f"<p id='test-live-{event.id}'>{event.payload.get('n')}</p>",
    )
    if event.payload.get("die"):
        on_commit(die_now)
