"""Device meter history upkeep: minutes older than DEVICES_METER_HISTORY_DAYS go."""

from __future__ import annotations

from events.registry import periodic
from services import meters


@periodic(3600.0, name="prune_device_meter_history", time_limit_ms=300_000)
def prune_device_meter_history() -> None:
    meters.prune_history()
