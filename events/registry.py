"""One registry of what runs on the spine: event handlers, plain tasks and periodic jobs.

Modules declare handlers next to the domain they serve with `@handler("topic", ...)`. Nothing
here touches a broker: tasks/broker.py turns every registration into a Dramatiq actor bound to
the app's broker, so tests can build several apps (embedded and Redis) in one process.
"""

from __future__ import annotations

import fnmatch
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any


@dataclass(frozen=True)
class Event:
    """An outbox row as handlers see it: primitives only, never ORM objects."""

    id: int
    event_id: uuid.UUID
    topic: str
    entity: str | None
    entity_id: int | None
    tenant_id: int | None
    actor_user_id: int | None
    actor_ip: str | None
    payload: dict[str, Any]
    created_at: datetime

    @property
    def action(self) -> str:
        return self.topic.rsplit(".", 1)[-1]

    @classmethod
    def from_row(cls, row: Any) -> Event:
        return cls(
            id=row.id,
            event_id=row.event_id,
            topic=row.topic,
            entity=row.entity,
            entity_id=row.entity_id,
            tenant_id=row.tenant_id,
            actor_user_id=row.actor_user_id,
            actor_ip=row.actor_ip,
            payload=dict(row.payload or {}),
            created_at=row.created_at,
        )


@dataclass
class HandlerSpec:
    """A handler of events. Handlers sharing a `queue` run in one message per event, one after
    the other, each in its own transaction with its own idempotency record."""

    name: str
    fn: Callable[[Event], None]
    topics: tuple[str, ...]
    queue: str = "events"
    max_retries: int = 5
    time_limit_ms: int = 60_000
    min_backoff_ms: int = 200
    max_backoff_ms: int = 60_000
    # Called once for a batch of events (one commit's, run in one transaction) with those
    # this handler is about to run, before any of them: it reads in one query what the
    # handler would otherwise read event by event, and keeps it in `batch_cache()`.
    preload: Callable[[list[Event]], None] | None = None
    # Topics the patterns match that the handler has nothing to do with: no message, no
    # record, no transaction for them (e.g. `*.updated` minus the device.* lifecycle events).
    exclude: tuple[str, ...] = ()
    # Runs after the group's other handlers of the event, just before the commit: for a
    # handler that writes rows every transaction of the tenant also writes (shared counters),
    # whose locks would otherwise be held while the other handlers work.
    last: bool = False

    def matches(self, topic: str) -> bool:
        return any(fnmatch.fnmatchcase(topic, pattern) for pattern in self.topics) and not any(
            fnmatch.fnmatchcase(topic, pattern) for pattern in self.exclude
        )


@dataclass
class TaskSpec:
    name: str
    fn: Callable[..., Any]
    queue: str = "default"
    max_retries: int = 3
    time_limit_ms: int = 60_000
    min_backoff_ms: int = 500
    max_backoff_ms: int = 60_000


@dataclass
class PeriodicSpec:
    """A job the scheduler enqueues every `every` seconds; it runs as its own actor, one run
    at a time (a tick that finds the previous run still going is skipped)."""

    name: str
    fn: Callable[[], Any]
    # A number of seconds, or the name of a config key holding one; 0 (or a missing key)
    # turns the job off.
    every: float | str = 60.0
    queue: str = "periodic"
    max_retries: int = 0  # the next tick is the usual retry
    time_limit_ms: int = 60_000
    min_backoff_ms: int = 1_000
    max_backoff_ms: int = 30_000


@dataclass
class Registry:
    handlers: dict[str, HandlerSpec] = field(default_factory=dict)
    tasks: dict[str, TaskSpec] = field(default_factory=dict)
    periodic: dict[str, PeriodicSpec] = field(default_factory=dict)
    # (topic pattern, queue): every handler of a matching topic runs in that queue's group,
    # whatever its own queue (see `route`).
    routes: list[tuple[str, str]] = field(default_factory=list)

    def add_handler(self, spec: HandlerSpec) -> None:
        if spec.name in self.handlers and self.handlers[spec.name].fn is not spec.fn:
            raise ValueError(f"two handlers are named {spec.name!r}")
        self.handlers[spec.name] = spec
        self.handler_names_for.cache_clear()
        self.queue_of.cache_clear()

    def add_route(self, pattern: str, queue: str) -> None:
        if (pattern, queue) not in self.routes:
            self.routes.append((pattern, queue))
        self.queue_of.cache_clear()

    @lru_cache(maxsize=4096)  # noqa: B019 - the registry lives as long as the process
    def handler_names_for(self, topic: str) -> tuple[str, ...]:
        """In the order they run: as registered, those marked `last` after the others."""
        names = [name for name, spec in self.handlers.items() if spec.matches(topic)]
        return tuple(sorted(names, key=lambda name: self.handlers[name].last))

    @lru_cache(maxsize=8192)  # noqa: B019 - the registry lives as long as the process
    def queue_of(self, name: str, topic: str) -> str:
        """The group that runs handler `name` for events of `topic`."""
        for pattern, queue in self.routes:
            if fnmatch.fnmatchcase(topic, pattern):
                return queue
        return self.handlers[name].queue

    def groups_for(self, names: tuple[str, ...] | set[str], topic: str) -> list[str]:
        """The queues (one actor each) that run these handlers of `topic`, in a stable order."""
        return sorted({self.queue_of(name, topic) for name in names})

    def group_names(self) -> list[str]:
        return sorted({spec.queue for spec in self.handlers.values()} | {q for _, q in self.routes})

    def group_members(self, group: str) -> list[HandlerSpec]:
        """The handlers that may run in `group` (its own, and any a route may bring there):
        what its actor's retries and time limit are sized for."""
        routed = [pattern for pattern, queue in self.routes if queue == group]
        return [
            spec
            for spec in self.handlers.values()
            if spec.queue == group
            or any(_may_overlap(topic, pattern) for topic in spec.topics for pattern in routed)
        ]

    def __hash__(self) -> int:
        return id(self)


def _may_overlap(a: str, b: str) -> bool:
    """Whether two topic patterns may match a topic in common: one matches the other, or
    both have wildcards and what comes before their first wildcard agrees (`*.updated` and
    `device.*` do; `chat.*` and `device.*` do not). When in doubt, yes."""
    if fnmatch.fnmatchcase(a, b) or fnmatch.fnmatchcase(b, a):
        return True
    wild = "*?["
    if not any(c in a for c in wild) or not any(c in b for c in wild):
        return False  # a plain topic: fnmatch has answered
    head_a = a[: min(a.find(c) for c in wild if c in a)]
    head_b = b[: min(b.find(c) for c in wild if c in b)]
    return head_a.startswith(head_b) or head_b.startswith(head_a)


registry = Registry()


BATCH_CACHE = "spine.batch"


def batch_cache(session: Any) -> dict[str, Any] | None:
    """Where handlers keep what they share across the batch of events being run in
    `session`'s transaction (what a preload read, sums to write once); None outside a batch.
    The batch runner drops it when the batch ends, committed or not."""
    return session.info.get(BATCH_CACHE)


def handler(*topics: str, name: str | None = None, **options: Any):
    """Register `fn(event)` for topics (exact names or shell-style patterns like `device.*`)."""

    def decorate(fn: Callable[[Event], None]) -> Callable[[Event], None]:
        spec = HandlerSpec(name=name or fn.__name__, fn=fn, topics=tuple(topics), **options)
        registry.add_handler(spec)
        return fn

    return decorate


def task(name: str | None = None, **options: Any):
    """Register a plain background task. Ask for it with `events.enqueue(name, *args)` in
    the transaction that needs it (durable, at-least-once: the task must tolerate running
    twice); `tasks.broker.send` is only for work that may be lost with Redis."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = TaskSpec(name=name or fn.__name__, fn=fn, **options)
        registry.tasks[spec.name] = spec
        return fn

    return decorate


def route(pattern: str, queue: str) -> None:
    """Run every handler of the topics matching `pattern` in `queue`'s group, with the
    group's own handlers: a commit's events of those topics are then one message, one
    transaction and one idempotency write for all their handlers, instead of one per queue
    (the device events of a poll: the device handlers, the live feed, webhooks and metrics).
    For handlers that do quick database work; one that waits on the network keeps its queue
    by being a task it enqueues."""
    registry.add_route(pattern, queue)


def periodic(every: float | str, name: str | None = None, **options: Any):
    """Register a job the scheduler enqueues every `every` seconds (or config key); options
    are PeriodicSpec's (queue, max_retries, time_limit_ms, backoffs)."""

    def decorate(fn: Callable[[], Any]) -> Callable[[], Any]:
        spec = PeriodicSpec(name=name or fn.__name__, fn=fn, every=every, **options)
        registry.periodic[spec.name] = spec
        return fn

    return decorate
