"""What bench_spine needs on the broker, imported by the benchmark app and its workers
(EXTRA_ACTOR_MODULES=bench.spine_handlers), like tests/spine_handlers.py for the tests.

- `bench.spine` events get one trivial handler. Its only effect is the ProcessedEvent row
  tasks/broker.py writes for every handler (the idempotency record).
- `bench_noop` is a plain Dramatiq actor that does nothing: the baseline of what the same
  RedisBroker (same middleware) and the same worker processes can move.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.errors import ActorNotFound

from events.registry import Event, handler

SPINE_TOPIC = "bench.spine"
NOOP_ACTOR = "bench_noop"
NOOP_QUEUE = "bench_noop"


@handler(SPINE_TOPIC, name="bench_noop_handler", max_retries=0)
def bench_noop_handler(event: Event) -> None:
    """Nothing: tasks/broker.py records (event, handler) in this handler's transaction."""


def noop() -> None:
    """The no-op actor's body."""


def declare_noop(broker: dramatiq.Broker) -> dramatiq.Actor:
    """The no-op actor on this broker (declared once per broker)."""
    try:
        return broker.get_actor(NOOP_ACTOR)
    except ActorNotFound:
        return dramatiq.Actor(
            noop,
            broker=broker,
            actor_name=NOOP_ACTOR,
            queue_name=NOOP_QUEUE,
            priority=0,
            options={"max_retries": 0},
        )


if os.environ.get("SWITCHBOARD_BENCH_WORKER") == "1":
    # In a worker, importing this module happens right after dramatiq.set_broker, and the
    # worker consumes every queue declared before it starts.
    declare_noop(dramatiq.get_broker())
