"""Broker set-up: StubBroker + in-process worker threads (embedded) or RedisBroker (production).

The broker is created and installed with `dramatiq.set_broker` before any actor is declared;
every registered handler, task and periodic job becomes an actor bound to *this* broker.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import CurrentMessage, Middleware
from flask import Flask, current_app
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from events.dispatch import group_actor_name
from events.registry import Event, HandlerSpec, PeriodicSpec, TaskSpec, registry
from extensions import db

log = logging.getLogger(__name__)

# Modules whose import registers handlers, tasks and periodic jobs.
ACTOR_MODULES = (
    "tasks.spine",
    "tasks.live",
    "tasks.notifications",
    "tasks.webhooks",
    "tasks.metrics",
    "tasks.audit",
    "tasks.chats",
    "tasks.projects",
    "tasks.devices",
)


class AppContextMiddleware(Middleware):
    """Every message runs inside an app context; the DB session is removed after it."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self._local = threading.local()

    def before_process_message(self, broker, message):
        ctx = self.app.app_context()
        ctx.push()
        self._local.ctx = ctx

    def _pop(self):
        ctx = getattr(self._local, "ctx", None)
        if ctx is not None:
            db.session.remove()
            ctx.pop()
            self._local.ctx = None

    def after_process_message(self, broker, message, *, result=None, exception=None):
        self._pop()

    def after_skip_message(self, broker, message):
        self._pop()


class SchedulerMiddleware(Middleware):
    """Runs the periodic jobs inside `dramatiq` worker processes (production mode)."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.scheduler: Scheduler | None = None

    def after_worker_boot(self, broker, worker):
        self.scheduler = Scheduler(self.app)
        self.scheduler.start()

    def before_worker_shutdown(self, broker, worker):
        if self.scheduler:
            self.scheduler.stop()


def _run_one(spec: HandlerSpec, event: Event, retries: int) -> bool:
    """Run one handler in its own transaction. True when it has a result (ok or gave up)."""
    from models.events import ProcessedEvent

    session = db.session
    session.add(ProcessedEvent(event_id=event.id, handler=spec.name, status="ok"))
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        return True  # handled meanwhile by another delivery: a duplicate changes nothing
    try:
        spec.fn(event)
        session.commit()
        return True
    except Exception as exc:
        session.rollback()
        if retries < spec.max_retries:
            log.warning(
                "handler %s failed on event %s (try %s): %r", spec.name, event.id, retries + 1, exc
            )
            return False
        log.exception("handler %s gave up on event %s", spec.name, event.id)
        session.add(
            ProcessedEvent(
                event_id=event.id, handler=spec.name, status="failed", error=repr(exc)[:2000]
            )
        )
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
        return True


class HandlersFailed(Exception):
    """Some handlers of a group failed and will be retried with the message."""


def _run_group(group: str, event_pk: int) -> None:
    """Run every handler of `group` that wants this event and has no result yet."""
    from models.events import OutboxEvent, ProcessedEvent

    session = db.session
    row = session.get(OutboxEvent, event_pk)
    if row is None:
        return  # pruned, or from a rolled-back transaction
    event = Event.from_row(row)
    wanted = [
        registry.handlers[name]
        for name in registry.handler_names_for(event.topic)
        if registry.handlers[name].queue == group
    ]
    done = set(
        session.scalars(select(ProcessedEvent.handler).where(ProcessedEvent.event_id == event_pk))
    )
    session.commit()  # end the read transaction; each handler gets its own
    message = CurrentMessage.get_current_message()
    retries = message.options.get("retries", 0) if message else 0
    failed = [
        spec.name for spec in wanted if spec.name not in done and not _run_one(spec, event, retries)
    ]
    if failed:
        raise HandlersFailed(f"event {event_pk}: {', '.join(failed)} will be retried")


def _group_fn(group: str) -> Callable[[int], None]:
    def run(event_pk: int) -> None:
        _run_group(group, event_pk)

    run.__name__ = f"spine_{group}"
    return run


def _task_fn(spec: TaskSpec) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return spec.fn(*args, **kwargs)
        finally:
            db.session.remove()

    run.__name__ = spec.name
    return run


def _actor(broker, name: str, fn, queue: str, spec) -> dramatiq.Actor:
    options = {
        "max_retries": spec.max_retries,
        "time_limit": spec.time_limit_ms,
        "min_backoff": spec.min_backoff_ms,
        "max_backoff": spec.max_backoff_ms,
    }
    return dramatiq.Actor(
        fn, broker=broker, actor_name=name, queue_name=queue, priority=0, options=options
    )


@dataclass
class TaskState:
    app: Flask
    broker: dramatiq.Broker
    actors: dict[str, dramatiq.Actor] = field(default_factory=dict)
    worker: dramatiq.Worker | None = None
    scheduler: Scheduler | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def embedded(self) -> bool:
        return isinstance(self.broker, StubBroker)

    def can_dispatch_now(self) -> bool:
        # A StubBroker's queue lives in this process: only worth sending to if a worker
        # here consumes it. Otherwise the event stays pending for the web process's relay.
        return not self.embedded or self.worker is not None

    def start_embedded_worker(self) -> None:
        with self._lock:
            if self.worker is not None or not self.embedded:
                return
            worker = dramatiq.Worker(
                self.broker, worker_threads=self.app.config["WORKER_THREADS"], worker_timeout=100
            )
            worker.start()
            self.worker = worker
            self.scheduler = Scheduler(self.app)
            self.scheduler.start()
            log.info("embedded worker started with %s threads", self.app.config["WORKER_THREADS"])

    def stop(self) -> None:
        with self._lock:
            if self.scheduler:
                self.scheduler.stop()
                self.scheduler = None
            if self.worker:
                self.worker.stop()
                self.worker = None

    def send(self, name: str, *args: Any, **kwargs: Any):
        return self.actors[name].send(*args, **kwargs)


class Scheduler:
    """Runs periodic jobs in a daemon thread. With Redis, a lock per job and tick makes each
    tick run in one process even when many workers run a scheduler."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._redis = None
        if app.config.get("REDIS_URL"):
            import redis

            self._redis = redis.Redis.from_url(app.config["REDIS_URL"], socket_timeout=5)

    def interval(self, spec: PeriodicSpec) -> float:
        if isinstance(spec.every, str):
            return float(self.app.config[spec.every])
        return float(spec.every)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _claim(self, spec: PeriodicSpec, interval: float) -> bool:
        if self._redis is None:
            return True
        key = f"{self.app.config['REDIS_PREFIX']}sched:{spec.name}"
        try:
            return bool(self._redis.set(key, "1", nx=True, px=max(int(interval * 900), 50)))
        except Exception as exc:  # noqa: BLE001
            log.warning("scheduler lock unavailable (%s); skipping %s this tick", exc, spec.name)
            return False

    def run_once(self, spec: PeriodicSpec) -> None:
        with self.app.app_context():
            try:
                spec.fn()
            except Exception:  # noqa: BLE001 - a failing job must not kill the scheduler
                log.exception("periodic job %s failed", spec.name)
            finally:
                db.session.remove()

    def _loop(self) -> None:
        next_run = {name: time.monotonic() for name in registry.periodic}
        while not self._stop.is_set():
            now = time.monotonic()
            for name, spec in list(registry.periodic.items()):
                interval = self.interval(spec)
                if now >= next_run.get(name, now):
                    next_run[name] = now + interval
                    if self._claim(spec, interval):
                        self.run_once(spec)
            self._stop.wait(0.05)


def init_broker(app: Flask) -> TaskState:
    if app.config.get("REDIS_URL"):
        from dramatiq.brokers.redis import RedisBroker

        broker: dramatiq.Broker = RedisBroker(
            url=app.config["REDIS_URL"], namespace=app.config["DRAMATIQ_NAMESPACE"]
        )
        broker.add_middleware(SchedulerMiddleware(app))
    else:
        broker = StubBroker()
    broker.add_middleware(CurrentMessage())
    broker.add_middleware(AppContextMiddleware(app))
    if app.config.get("DRAMATIQ_PROMETHEUS"):
        from dramatiq.middleware.prometheus import Prometheus

        broker.add_middleware(Prometheus())
    dramatiq.set_broker(broker)

    for module in ACTOR_MODULES + tuple(app.config.get("EXTRA_ACTOR_MODULES", ())):
        importlib.import_module(module)

    state = TaskState(app=app, broker=broker)
    for group in sorted({spec.queue for spec in registry.handlers.values()}):
        members = registry.group_members(group)
        group_spec = TaskSpec(
            name=group_actor_name(group),
            fn=_group_fn(group),
            queue=group,
            max_retries=max(m.max_retries for m in members),
            time_limit_ms=min(sum(m.time_limit_ms for m in members), 600_000),
            min_backoff_ms=min(m.min_backoff_ms for m in members),
            max_backoff_ms=max(m.max_backoff_ms for m in members),
        )
        state.actors[group_spec.name] = _actor(
            broker, group_spec.name, group_spec.fn, group, group_spec
        )
    for spec in registry.tasks.values():
        state.actors[spec.name] = _actor(broker, f"t_{spec.name}", _task_fn(spec), spec.queue, spec)
    app.extensions["switchboard.tasks"] = state
    return state


def tasks_state(app: Flask | None = None) -> TaskState:
    return (app or current_app).extensions["switchboard.tasks"]


def send(name: str, *args: Any, **kwargs: Any):
    """Enqueue a registered task or handler by name on the current app's broker."""
    return tasks_state().send(name, *args, **kwargs)
