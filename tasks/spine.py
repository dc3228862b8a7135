"""Spine housekeeping: the periodic relay of pending and stale outbox rows."""

from __future__ import annotations

from flask import current_app

from events.dispatch import relay
from events.registry import periodic


# A queue of its own, so that a backlog of other periodic jobs never delays it.
@periodic("EVENTS_RELAY_INTERVAL", name="relay_events", queue="spine", time_limit_ms=30_000)
def relay_events() -> None:
    relay(current_app._get_current_object())
