"""The spine: outbox writer, handler registry, dispatcher, relay and live bus.

A change committed to the database becomes an outbox row in the same transaction; after
commit the row is sent to Dramatiq; handlers run idempotently and publish live fragments.
Background jobs take the same path: `enqueue(task_name, *args)` writes one in the current
transaction, and it runs (at least once) after the commit.
"""

from events.outbox import delay_events, emit, enqueue, on_commit
from events.registry import Event, handler, periodic, registry, task

__all__ = [
    "Event",
    "delay_events",
    "emit",
    "enqueue",
    "handler",
    "on_commit",
    "periodic",
    "registry",
    "task",
]
