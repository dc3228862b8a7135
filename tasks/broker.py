"""Broker set-up: StubBroker + in-process worker threads (embedded) or RedisBroker (production).

The broker is created and installed with `dramatiq.set_broker` before any actor is declared;
every registered handler, task and periodic job becomes an actor bound to *this* broker.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import CurrentMessage, Middleware
from flask import Flask, current_app
from sqlalchemy import bindparam, func, select, update

from events.dispatch import group_actor_name
from events.outbox import handler_transaction, prepare_commit
from events.registry import BATCH_CACHE, Event, HandlerSpec, PeriodicSpec, TaskSpec, registry
from extensions import db
from models.base import utcnow

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
    "tasks.device_meters",
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
    """Runs the scheduler inside `dramatiq` worker processes (production mode), but only in
    those that consume a periodic job's queue: the `assistant` process (`--queues assistant`)
    spends its threads on replies and schedules nothing. Of the processes that do, the one
    holding the lease enqueues (Scheduler)."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.scheduler: Scheduler | None = None

    def after_worker_boot(self, broker, worker):
        consumed = worker.consumer_whitelist
        queues = {spec.queue for spec in registry.periodic.values()}
        if consumed is not None and not queues & set(consumed):
            log.info("this worker consumes no periodic queue: no scheduler here")
            return
        self.scheduler = Scheduler(self.app)
        self.scheduler.start()

    def before_worker_shutdown(self, broker, worker):
        if self.scheduler:
            self.scheduler.stop()


# What became of one handler in a message's transaction.
_DONE, _SKIPPED, _RETRY, _GAVE_UP = "done", "skipped", "retry", "gave up"


def _record_stmt(dialect: str):
    """INSERT … ON CONFLICT DO NOTHING of a ProcessedEvent row (built once per dialect).

    A conflict means the (event, handler) pair already has a result, committed by another
    delivery: the handler is skipped, and the transaction is not aborted (as an IntegrityError
    would abort it on PostgreSQL) so the other handlers of the message can go on in it."""
    stmt = _RECORD_STMTS.get(dialect)
    if stmt is None:
        from models.events import ProcessedEvent

        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        table = ProcessedEvent.__table__
        stmt = (
            insert(table)
            .on_conflict_do_nothing(index_elements=["event_id", "handler"])
            .returning(table.c.event_id, table.c.handler)
        )
        _RECORD_STMTS[dialect] = stmt
    return stmt


_RECORD_STMTS: dict[str, Any] = {}


def _record_arrays():
    stmt = _RECORD_STMTS.get("postgresql-arrays")
    if stmt is None:
        from sqlalchemy import text
        from sqlalchemy.dialects.postgresql import ARRAY, BIGINT, TEXT

        from models.events import ProcessedEvent

        stmt = text(
            "INSERT INTO processed_events (event_id, handler, status, processed_at) "
            "SELECT e, h, 'ok', :now FROM unnest(:event_ids, :handlers) AS t(e, h) "
            "ON CONFLICT (event_id, handler) DO NOTHING RETURNING event_id, handler"
        ).bindparams(
            bindparam("event_ids", type_=ARRAY(BIGINT)),
            bindparam("handlers", type_=ARRAY(TEXT)),
            bindparam("now", type_=ProcessedEvent.__table__.c.processed_at.type),
        )
        _RECORD_STMTS["postgresql-arrays"] = stmt
    return stmt


def _record(session, event_pk: int, handler: str, status: str, error: str | None = None) -> bool:
    """Write the idempotency record in the current transaction; False if it already exists."""
    params = {
        "event_id": event_pk,
        "handler": handler,
        "status": status,
        "error": error,
        "processed_at": utcnow(),
    }
    conn = session.connection()  # Core on the session's connection: no ORM work to do
    result = conn.execute(_record_stmt(conn.dialect.name), params)
    return result.first() is not None  # (rowcount is not reliable with RETURNING)


def _load_event(session, event_pk: int):
    """The outbox row, read with Core (no ORM identity map to fill), beginning the transaction
    that all handlers of the message share.

    On PostgreSQL the same statement sets `synchronous_commit` off for this transaction only
    (`set_config(…, true)` is `SET LOCAL`), saving a round trip. Why that is safe: COMMIT then
    returns before its WAL is flushed, so a PostgreSQL crash within a fraction of a second can
    lose the transaction — but atomically: each handler's effect goes together with its
    ProcessedEvent record, never one without the other. The outbox row stays `dispatched`
    (only the relay marks it `done`, after reading every handler's record in a transaction
    whose own synchronous commit flushes all WAL before it, these records included), so the
    relay redelivers the lost handlers after EVENTS_REDELIVER_AFTER: at-least-once holds, and
    idempotency makes the repeat harmless. A crash of the worker (not of PostgreSQL) loses
    nothing that was committed. Plain tasks, and every other transaction, keep synchronous
    commits."""
    rows = _load_events(session, [event_pk])
    return rows[0] if rows else None


def _relax_commit(session) -> None:
    """After a full rollback: the new transaction also commits asynchronously (see above)."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.set_config("synchronous_commit", "off", True)))


def _run_in(session, spec: HandlerSpec, event: Event, retries: int, nested: bool) -> str:
    """Run one handler inside the message's transaction, its effect and its record together.

    `nested`: earlier handlers' effects are in the transaction, so this one runs in a
    savepoint and its failure undoes only its own work. Otherwise a failure rolls the whole
    (still effect-free) transaction back, which is cheaper than a savepoint."""
    savepoint = session.begin_nested() if nested else None
    try:
        if not _record(session, event.id, spec.name, "ok"):
            if savepoint is not None:
                savepoint.commit()
            return _SKIPPED  # handled meanwhile by another delivery: a duplicate changes nothing
        spec.fn(event)
        prepare_commit(session)  # its deferred work fails here, as its own
        if savepoint is not None:
            savepoint.commit()  # flushes this handler's changes, releases the savepoint
        else:
            session.flush()  # a failing flush belongs to this handler, not to the commit
    except Exception as exc:
        if savepoint is not None:
            savepoint.rollback()  # events and after-commit work registered in it go too
        else:
            session.rollback()  # forgets its after-commit work too
            _relax_commit(session)
        if retries < spec.max_retries:
            log.warning(
                "handler %s failed on event %s (try %s): %r", spec.name, event.id, retries + 1, exc
            )
            return _RETRY
        log.exception("handler %s gave up on event %s", spec.name, event.id)
        _record(session, event.id, spec.name, "failed", repr(exc)[:2000])
        return _GAVE_UP
    return _DONE


def _run_one(spec: HandlerSpec, event: Event, retries: int) -> bool:
    """Run one handler in a transaction of its own. True when it has a result (ok, already
    recorded, or gave up); False when it failed and should be retried."""
    session = db.session
    outcome = _run_in(session, spec, event, retries, nested=False)
    session.commit()
    return outcome != _RETRY


class TakeTurns:
    """A lock granted first come, first served (threading.Lock promises no order).

    Embedded mode: SQLite has one writer at a time, and a connection that finds it busy
    polls with growing sleeps, so worker threads starve one another and a message taken
    later often overtakes an earlier one. Spine messages queue here instead, in order."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._tickets = itertools.count()
        self._serving = 0
        self._abandoned: set[int] = set()

    def __enter__(self) -> None:
        with self._cond:
            ticket = next(self._tickets)
            try:
                while ticket != self._serving:
                    self._cond.wait()
            except BaseException:  # interrupted (e.g. a time limit) while waiting its turn
                if ticket == self._serving:
                    self._next_turn()
                else:
                    self._abandoned.add(ticket)
                raise

    def __exit__(self, *exc_info: object) -> None:
        with self._cond:
            self._next_turn()

    def _next_turn(self) -> None:
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()


# (event id, handler name) → what it raised in the batch attempt of this delivery.
_Raised = dict[tuple[int, str], Exception]


class HandlersFailed(Exception):
    """Some handlers of a group failed and will be retried with the message."""


def _run_group(group: str, event_pks: int | list[int]) -> None:
    """Run every handler of `group` that wants these events and has no result yet.

    A message carries one event id, or a list of them (the events of one commit, see
    events.dispatch._send). One event takes the batch's way too: its handlers in one
    transaction with one INSERT of their records and no savepoints (a visitor's message has
    seven handlers in the chats group: seven INSERTs and six savepoints the other way). Only
    when a handler raises are the events run one by one, with a savepoint per handler; the
    handler that raised is not run again in this delivery (that was its try)."""
    if isinstance(event_pks, int):
        event_pks = [event_pks]
    turns = tasks_state().sqlite_turns
    with turns if turns is not None else contextlib.nullcontext(), handler_transaction():
        raised = _run_batch_in_transaction(group, event_pks)
        if raised is not None:
            _run_each(group, event_pks, raised)


def _wanted(group: str, topic: str) -> list[HandlerSpec]:
    handlers = registry.handlers
    return [
        handlers[name] for name in registry.handler_names_for(topic)
        if registry.queue_of(name, topic) == group
    ]  # fmt: skip


def _run_group_in_transaction(group: str, event_pk: int, raised: _Raised | None = None) -> None:
    """One event: each handler's effect and its (event, handler) record are written
    together, in a savepoint when another handler's effect precedes it, and one commit makes
    them all durable (or none: the message is then retried and every handler runs again, as
    none recorded a result). A handler in `raised` already had this delivery's try."""
    session = db.session
    row = _load_event(session, event_pk)
    if row is None:
        session.rollback()
        return  # pruned, or from a rolled-back transaction
    event = Event.from_row(row)
    message = CurrentMessage.get_current_message()
    retries = message.options.get("retries", 0) if message else 0
    failed = []
    nested = False
    for spec in _wanted(group, event.topic):
        exc = (raised or {}).get((event.id, spec.name))
        if exc is not None:
            outcome = _after_try(session, spec, event, retries, exc)
        else:
            outcome = _run_in(session, spec, event, retries, nested)
        if outcome == _RETRY:
            failed.append(spec.name)
        elif outcome != _SKIPPED:
            nested = True
    session.commit()
    if failed:
        raise HandlersFailed(f"event {event_pk}: {', '.join(failed)} will be retried")


def _after_try(session, spec: HandlerSpec, event: Event, retries: int, exc: Exception) -> str:
    """What _run_in does after a handler raised, for one that raised in this delivery's
    batch (whose work the batch's rollback undid): retried with the message, or given up
    on and recorded as failed."""
    if retries < spec.max_retries:
        log.warning(
            "handler %s failed on event %s (try %s): %r", spec.name, event.id, retries + 1, exc
        )
        return _RETRY
    log.error("handler %s gave up on event %s", spec.name, event.id, exc_info=exc)
    if not _record(session, event.id, spec.name, "failed", repr(exc)[:2000]):
        return _SKIPPED  # another delivery recorded a result meanwhile
    return _GAVE_UP


def _run_each(group: str, event_pks: list[int], raised: _Raised | None = None) -> None:
    """A batch one of whose handlers failed: each event on its own, as above, so the
    others' work is kept and only the failing handlers are retried (with the message; the
    rest have their records by then and are skipped)."""
    failures = []
    for event_pk in event_pks:
        try:
            _run_group_in_transaction(group, event_pk, raised)
        except HandlersFailed as exc:
            failures.append(str(exc))
    if failures:
        raise HandlersFailed("; ".join(failures))


def _run_batch_in_transaction(group: str, event_pks: list[int]) -> _Raised | None:
    """Many events in one transaction, no savepoints: one read of the events, one INSERT
    of every (event, handler) record (those already recorded by another delivery come back
    as conflicts and are skipped), the handlers one after the other, one commit.

    That is what makes a poll's fifty events cost about one event's round trips rather
    than fifty. Any handler raising undoes the whole batch (nothing of it is committed) and
    returns which handler of which event raised, and what (empty when it was not a handler
    but a preload or the deferred work): the caller then runs the events one by one with the
    usual per-handler savepoints, retries and give-ups. None: committed."""
    session = db.session
    rows = _load_events(session, event_pks)
    events = [Event.from_row(row) for row in rows]
    runs = [(event, spec) for event in events for spec in _wanted(group, event.topic)]
    if not runs:
        session.rollback()
        return None
    fresh = _record_many(session, [(event.id, spec.name) for event, spec in runs])
    runs = [(event, spec) for event, spec in runs if (event.id, spec.name) in fresh]
    session.info[BATCH_CACHE] = {}
    running: tuple[int, str] | None = None
    try:
        preloads: dict[Any, list[Event]] = {}
        for event, spec in runs:
            if spec.preload is not None:
                preloads.setdefault(spec.preload, []).append(event)
        for preload, its_events in preloads.items():
            preload(its_events)
        for event, spec in runs:
            running = (event.id, spec.name)
            spec.fn(event)
        running = None
        prepare_commit(session)  # one flush for the batch, then the work deferred to it
    except Exception as exc:  # noqa: BLE001 - the events are run one by one instead
        session.info.pop(BATCH_CACHE, None)
        session.rollback()  # forgets the batch's events and after-commit work too
        log.info(
            "a handler of %s failed in a batch of %s events (%r); running them one by one",
            group,
            len(events),
            exc,
        )
        return {running: exc} if running is not None else {}
    session.info.pop(BATCH_CACHE, None)
    session.commit()
    return None


def _load_events(session, event_pks: list[int]) -> list:
    """The outbox rows, in id order, beginning the batch's transaction (synchronous_commit
    off on PostgreSQL, for the reasons given in _load_event)."""
    conn = session.connection()
    dialect = conn.dialect.name
    stmt = _LOAD_MANY_STMTS.get(dialect)
    if stmt is None:
        from models.events import OutboxEvent

        table = OutboxEvent.__table__
        stmt = (
            select(*table.c)
            .where(table.c.id.in_(bindparam("event_pks", expanding=True)))
            .order_by(table.c.id)
        )
        if dialect == "postgresql":
            stmt = stmt.add_columns(func.set_config("synchronous_commit", "off", True))
        _LOAD_MANY_STMTS[dialect] = stmt
    return conn.execute(stmt, {"event_pks": list(event_pks)}).all()


_LOAD_MANY_STMTS: dict[str, Any] = {}


def _record_many(session, pairs: list[tuple[int, str]]) -> set[tuple[int, str]]:
    """Insert the ok-records of many (event, handler) pairs at once; the pairs inserted (the
    others already have a result)."""
    conn = session.connection()
    now = utcnow()
    if conn.dialect.name == "postgresql":
        # Two arrays in one statement whose text never changes: psycopg prepares it once,
        # where a multi-row VALUES list is new text for every batch size, parsed each time.
        params = {
            "event_ids": [pk for pk, _ in pairs],
            "handlers": [name for _, name in pairs],
            "now": now,
        }
        return {(row.event_id, row.handler) for row in conn.execute(_record_arrays(), params)}
    stmt = _record_stmt(conn.dialect.name)
    params = [
        {"event_id": pk, "handler": name, "status": "ok", "error": None, "processed_at": now}
        for pk, name in pairs
    ]
    return {(row.event_id, row.handler) for row in conn.execute(stmt, params)}


def _group_fn(group: str) -> Callable[[int | list[int]], None]:
    def run(event_pks: int | list[int]) -> None:
        _run_group(group, event_pks)

    run.__name__ = f"spine_{group}"
    return run


def _task_fn(spec: TaskSpec) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        message = CurrentMessage.get_current_message()
        job_id = message.options.get("job") if message else None
        try:
            result = spec.fn(*args, **kwargs)
        except BaseException as exc:  # a time limit interrupts with a BaseException
            db.session.remove()
            retries = message.options.get("retries", 0) if message else 0
            if job_id and retries >= spec.max_retries:
                _finish_job(job_id, spec.name, repr(exc)[:2000])
            raise
        finally:
            db.session.remove()
        if job_id:
            _finish_job(job_id, spec.name)
        return result

    run.__name__ = spec.name
    return run


def _finish_job(job_id: str, name: str, error: str | None = None) -> None:
    """Mark a job's outbox row done (the relay stops redelivering it); a job that gave up
    also gets a failed ProcessedEvent record, so `flask events list --failed` shows it."""
    from models.events import OutboxEvent

    table = OutboxEvent.__table__
    try:
        with db.engine.begin() as conn:
            pk = conn.execute(
                update(table)
                .where(table.c.event_id == uuid.UUID(job_id))
                .values(status="done")
                .returning(table.c.id)
            ).scalar()
            if pk is not None and error is not None:
                conn.execute(
                    _record_stmt(conn.dialect.name),
                    {
                        "event_id": pk,
                        "handler": name,
                        "status": "failed",
                        "error": error,
                        "processed_at": utcnow(),
                    },
                )
                log.error("job %s (%s) gave up: %s", pk, name, error)
    except Exception:  # noqa: BLE001 - the job ran; at worst the relay runs it again
        log.exception("could not mark job %s (%s) done", job_id, name)


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
    sqlite_turns: TakeTurns | None = None  # spine messages' turns at SQLite's one writer
    guard: PeriodicGuard | None = None
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
            if self.guard is not None:
                self.guard.close()

    def send(self, name: str, *args: Any, **kwargs: Any):
        return self.actors[name].send(*args, **kwargs)


def periodic_actor_name(name: str) -> str:
    return f"p_{name}"


def periodic_interval(app: Flask, spec: PeriodicSpec) -> float:
    """Seconds between a periodic job's ticks; 0 when it is off."""
    if isinstance(spec.every, str):
        return float(app.config.get(spec.every) or 0)
    return float(spec.every)


class Scheduler:
    """Enqueues the periodic jobs, and only that: each tick becomes a message to the job's
    own actor (its queue, time limit and retries), so a slow device poll or archive sweep
    never holds up the outbox relay's tick.

    With Redis, one scheduler per deployment does the enqueuing: the one holding a lease
    (SCHEDULER_LEASE_SECONDS, renewed while it lives, taken over by another when it lapses).
    A per-job key for each tick also keeps a tick from being enqueued twice across a
    takeover. Embedded, the one process's scheduler enqueues to its own worker threads."""

    # Renew the lease only if this scheduler still holds it (atomically: another may have
    # taken it over after it lapsed).
    _RENEW = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then "
        "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
    )

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._redis = None
        if app.config.get("REDIS_URL"):
            import redis

            self._redis = redis.Redis.from_url(app.config["REDIS_URL"], socket_timeout=5)
        self._leased_until = 0.0
        self._next_run: dict[str, float] = {}

    @property
    def lease_key(self) -> str:
        return f"{self.app.config['REDIS_PREFIX']}scheduler:lease"

    def interval(self, spec: PeriodicSpec) -> float:
        return periodic_interval(self.app, spec)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self._redis is not None:
            with contextlib.suppress(Exception):  # let another take over at once
                if self._redis.get(self.lease_key) == self.owner.encode():
                    self._redis.delete(self.lease_key)

    def holds_lease(self) -> bool:
        """Take or renew the lease; True while this scheduler holds it."""
        if self._redis is None:
            return True
        now = time.monotonic()
        if now < self._leased_until - self.lease_seconds / 2:
            return True  # renewed recently enough
        ttl_ms = int(self.lease_seconds * 1000)
        try:
            held = bool(self._redis.set(self.lease_key, self.owner, nx=True, px=ttl_ms)) or bool(
                self._redis.eval(self._RENEW, 1, self.lease_key, self.owner, ttl_ms)
            )
        except Exception as exc:  # noqa: BLE001 - no Redis, no ticks: the relay waits too
            log.warning("scheduler lease unavailable: %s", exc)
            held = False
        self._leased_until = now + self.lease_seconds if held else 0.0
        return held

    @property
    def lease_seconds(self) -> float:
        return float(self.app.config["SCHEDULER_LEASE_SECONDS"])

    def _claim_tick(self, spec: PeriodicSpec, interval: float) -> bool:
        if self._redis is None:
            return True
        key = f"{self.app.config['REDIS_PREFIX']}sched:{spec.name}"
        try:
            return bool(self._redis.set(key, "1", nx=True, px=max(int(interval * 900), 50)))
        except Exception as exc:  # noqa: BLE001
            log.warning("scheduler lock unavailable (%s); skipping %s this tick", exc, spec.name)
            return False

    def enqueue(self, spec: PeriodicSpec) -> None:
        actor = self.app.extensions["switchboard.tasks"].actors[periodic_actor_name(spec.name)]
        try:
            actor.send(time.time())
        except Exception as exc:  # noqa: BLE001 - the next tick tries again
            log.warning("could not enqueue periodic job %s: %s", spec.name, exc)

    def tick(self) -> None:
        """Enqueue every job whose time has come (if this scheduler holds the lease)."""
        now = time.monotonic()
        due = []
        for name, spec in list(registry.periodic.items()):
            interval = self.interval(spec)
            if interval <= 0:
                continue
            if now >= self._next_run.get(name, now):
                self._next_run[name] = now + interval
                due.append((spec, interval))
        if not due or not self.holds_lease():
            return
        for spec, interval in due:
            if self._claim_tick(spec, interval):
                self.enqueue(spec)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the scheduler must outlive any one failure
                log.exception("scheduler tick failed")
            self._stop.wait(0.05)


class PeriodicGuard:
    """One run of a periodic job at a time, across the deployment: a tick that finds the
    previous run still going is skipped (the job is due again next tick anyway), so a job
    slower than its interval does not fill every worker thread with copies of itself.

    A run holds its Redis key for HOLD_SECONDS at a time, renewed every RENEW_SECONDS by a
    thread of the process while it runs: a killed worker's hold lapses within seconds. Held
    for the job's whole time limit instead, a worker killed mid-sweep stopped the sweep that
    restarts orphaned replies for a minute, and archiving for a quarter of an hour."""

    HOLD_SECONDS = 5.0
    RENEW_SECONDS = 1.0
    _RENEW = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then "
        "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
    )
    _RELEASE = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then "
        "return redis.call('del', KEYS[1]) else return 0 end"
    )

    def __init__(self, app: Flask) -> None:
        self.app = app
        self._local: dict[str, threading.Lock] = {}
        self._redis = None
        self._held: dict[str, str] = {}  # key -> token, of the runs going on in this process
        self._held_lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._closed = threading.Event()
        if app.config.get("REDIS_URL"):
            import redis

            self._redis = redis.Redis.from_url(app.config["REDIS_URL"], socket_timeout=5)

    @contextlib.contextmanager
    def running(self, spec: PeriodicSpec):
        if self._redis is None:
            lock = self._local.setdefault(spec.name, threading.Lock())
            if not lock.acquire(blocking=False):
                yield False
                return
            try:
                yield True
            finally:
                lock.release()
            return
        key = f"{self.app.config['REDIS_PREFIX']}running:{spec.name}"
        token = uuid.uuid4().hex
        if not self._redis.set(key, token, nx=True, px=int(self.HOLD_SECONDS * 1000)):
            yield False
            return
        with self._held_lock:
            self._held[key] = token
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(
                    target=self._renew_held, name="periodic-guard", daemon=True
                )
                self._renewer.start()
        try:
            yield True
        finally:
            with self._held_lock:
                self._held.pop(key, None)
            with contextlib.suppress(Exception):
                self._redis.eval(self._RELEASE, 1, key, token)

    def _renew_held(self) -> None:
        hold_ms = int(self.HOLD_SECONDS * 1000)
        while not self._closed.wait(self.RENEW_SECONDS):
            with self._held_lock:
                held = list(self._held.items())
            for key, token in held:
                try:
                    self._redis.eval(self._RENEW, 1, key, token, hold_ms)
                except Exception as exc:  # noqa: BLE001 - Redis away: the hold may lapse
                    log.warning("could not renew %s: %s", key, exc)

    def close(self) -> None:
        """Stop renewing (the process is going): what it still holds lapses by itself."""
        self._closed.set()


def _periodic_fn(app: Flask, spec: PeriodicSpec, guard: PeriodicGuard) -> Callable[[float], None]:
    def run(scheduled_at: float) -> None:
        interval = periodic_interval(app, spec)
        message = CurrentMessage.get_current_message()
        first_try = not (message and message.options.get("retries"))
        if first_try and time.time() - scheduled_at > max(2 * interval, 60.0):
            return  # a backlog's old tick: a newer one is queued behind it
        try:
            with guard.running(spec) as mine:
                if mine:
                    spec.fn()
        finally:
            db.session.remove()

    run.__name__ = periodic_actor_name(spec.name)
    return run


def init_broker(app: Flask) -> TaskState:
    if app.config.get("REDIS_URL"):
        from tasks.redis_broker import SkipQueues, WakingRedisBroker

        broker: dramatiq.Broker = WakingRedisBroker(
            url=app.config["REDIS_URL"], namespace=app.config["DRAMATIQ_NAMESPACE"]
        )
        broker.add_middleware(SchedulerMiddleware(app))
        if app.config.get("WORKER_SKIP_QUEUES"):
            broker.add_middleware(SkipQueues(set(app.config["WORKER_SKIP_QUEUES"])))
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
    if str(app.config.get("SQLALCHEMY_DATABASE_URI", "")).startswith("sqlite"):
        state.sqlite_turns = TakeTurns()
    for group in registry.group_names():
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
    guard = state.guard = PeriodicGuard(app)
    for periodic_spec in registry.periodic.values():
        name = periodic_actor_name(periodic_spec.name)
        fn = _periodic_fn(app, periodic_spec, guard)
        state.actors[name] = _actor(broker, name, fn, periodic_spec.queue, periodic_spec)
    app.extensions["switchboard.tasks"] = state
    return state


def tasks_state(app: Flask | None = None) -> TaskState:
    return (app or current_app).extensions["switchboard.tasks"]


def send(name: str, *args: Any, **kwargs: Any):
    """Enqueue a registered task or handler by name on the current app's broker."""
    return tasks_state().send(name, *args, **kwargs)
