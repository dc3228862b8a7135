"""Session listeners that turn committed changes into outbox rows, in the same transaction.

- `after_flush` writes one row per created / updated / deleted `Tracked` instance, with the
  changed fields as old→new pairs, through the flush's own connection (so a rolled-back
  transaction or savepoint takes its rows with it).
- `emit()` adds an explicit domain event (e.g. `device.offline`) to the current session.
- `enqueue()` adds a background job the same way: an outbox row whose topic is
  `job:<task name>`, sent to its task's actor right after commit and relayed like an event.
- At the outermost commit only (releasing a savepoint commits nothing, and rolling one back
  drops the events and callbacks registered inside it), the new event ids go to the
  dispatcher and `on_commit` callbacks run. Both happen once the transaction has *ended*
  and its connection is back in the pool, not in `after_commit` (which SQLAlchemy fires
  while the session still holds it): dispatching needs a connection of its own, and a
  thread holding one while waiting for another deadlocks a full pool as soon as as many
  threads commit at once as the pool has connections.
"""

from __future__ import annotations

import contextlib
import decimal
import enum
import logging
import threading
import uuid
from collections.abc import Callable, Iterable
from datetime import date, datetime
from typing import Any

from flask import current_app, has_app_context, has_request_context
from sqlalchemy import event as sa_event
from sqlalchemy import inspect
from sqlalchemy.orm import Session

from models.base import Tracked, utcnow
from models.events import OutboxEvent

log = logging.getLogger(__name__)

EVENT_IDS = "sb_outbox_event_ids"
JOBS = "sb_outbox_jobs"
AFTER_COMMIT = "sb_after_commit"
BEFORE_COMMIT = "sb_before_commit"
BEFORE_COMMIT_LAST = "sb_before_commit_last"
AT_COMMIT = "sb_at_commit"
COMMITTED = "sb_committed_work"
SAVEPOINT_MARKS = "sb_savepoint_marks"
DEFERRED = "sb_outbox_deferred_rows"
DEFER_MODE = "sb_outbox_defer"
UNTIL_COMMIT = "until commit"
DISPATCH_DELAY = "sb_dispatch_delay"


def to_primitive(value: Any) -> Any:
    """JSON-safe copy of a column value."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): to_primitive(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [to_primitive(v) for v in value]
    return str(value)


def _actor_user_id() -> int | None:
    if not has_request_context():
        return None
    from flask_login import current_user

    try:
        if current_user and current_user.is_authenticated:
            return int(current_user.get_id())
    except Exception:  # noqa: BLE001 - an event must never fail for want of an actor
        return None
    return None


def _actor_ip() -> str | None:
    if not has_request_context():
        return None
    from flask import request

    return (request.remote_addr or "")[:64] or None


def _column_keys(obj: Tracked) -> list[str]:
    mapper = inspect(obj).mapper
    return [
        attr.key
        for attr in mapper.column_attrs
        if attr.key not in obj.__event_exclude__ and attr.key != "updated_at"
    ]


def _snapshot(obj: Tracked) -> dict[str, Any]:
    return {key: to_primitive(getattr(obj, key)) for key in _column_keys(obj)}


def _changes(obj: Tracked) -> dict[str, list[Any]]:
    state = inspect(obj)
    changed: dict[str, list[Any]] = {}
    for key in _column_keys(obj):
        history = state.attrs[key].history
        if not history.has_changes():
            continue
        old = history.deleted[0] if history.deleted else None
        new = history.added[0] if history.added else None
        if old == new:
            continue
        changed[key] = [to_primitive(old), to_primitive(new)]
    return changed


def _row(obj: Tracked, action: str, payload: dict[str, Any], actor: int | None) -> dict:
    return {
        "event_id": uuid.uuid4(),
        "topic": f"{obj.__entity__}.{action}",
        "entity": obj.__entity__,
        "entity_id": getattr(obj, "id", None),
        "tenant_id": getattr(obj, "tenant_id", None),
        "actor_user_id": actor,
        "actor_ip": _actor_ip(),
        "payload": payload,
        "status": "pending",
        "attempts": 0,
        "created_at": utcnow(),
    }


def _after_flush(session: Session, flush_context: Any) -> None:
    rows: list[dict] = []
    actor = _actor_user_id()
    for obj in session.new:
        if isinstance(obj, Tracked):
            payload = {"label": obj.feed_label(), "fields": _snapshot(obj)}
            rows.append(_row(obj, "created", payload, actor))
    for obj in session.dirty:
        if isinstance(obj, Tracked) and session.is_modified(obj, include_collections=False):
            changes = _changes(obj)
            if changes and not changes.keys() <= obj.__event_routine__:
                payload = {"label": obj.feed_label(), "changes": changes}
                rows.append(_row(obj, "updated", payload, actor))
    for obj in session.deleted:
        if isinstance(obj, Tracked):
            payload = {"label": obj.feed_label(), "fields": _snapshot(obj)}
            rows.append(_row(obj, "deleted", payload, actor))
    if session.info.get(DEFER_MODE) == UNTIL_COMMIT:
        if rows:
            _in_transaction(session)
            session.info.setdefault(DEFERRED, []).extend(rows)
            session.info.setdefault(EVENT_IDS, []).extend(row["event_id"] for row in rows)
        return
    write_deferred(session)
    if not rows:
        return
    session.connection().execute(OutboxEvent.__table__.insert(), rows)
    session.info.setdefault(EVENT_IDS, []).extend(row["event_id"] for row in rows)


def emit(
    topic: str,
    *,
    tenant_id: int | None,
    payload: dict[str, Any] | None = None,
    entity: str | None = None,
    entity_id: int | None = None,
    session: Session | None = None,
    actor_user_id: int | None = None,
) -> uuid.UUID:
    """Add an explicit domain event to the current transaction; it is sent after commit.

    The actor is the logged-in user unless `actor_user_id` names one (e.g. at login)."""
    from extensions import db

    session = session or db.session()
    values = {
        "event_id": uuid.uuid4(),
        "topic": topic,
        "entity": entity,
        "entity_id": entity_id,
        "tenant_id": tenant_id,
        "actor_user_id": actor_user_id if actor_user_id is not None else _actor_user_id(),
        "actor_ip": _actor_ip(),
        "payload": to_primitive(payload or {}),
        "status": "pending",
        "attempts": 0,
        "created_at": utcnow(),
    }
    if session.info.get(DEFER_MODE):
        _in_transaction(session)
        session.info.setdefault(DEFERRED, []).append(values)
    else:
        session.add(OutboxEvent(**values))
    session.info.setdefault(EVENT_IDS, []).append(values["event_id"])
    return values["event_id"]


@contextlib.contextmanager
def deferred_emits(session: Session | None = None, *, until_commit: bool = False):
    """Within it, `emit()` and `enqueue()` keep their rows aside and write them all with one
    executemany of a Core INSERT: at the next flush or commit of the outermost transaction,
    or when `write_deferred()` is called. For code that emits many events per transaction
    and reads none of them back before it commits (a poll: fifty per commit), where an ORM
    object per row cost more CPU than everything else the poll does with the event.

    `until_commit`: the rows, those of tracked models' changes included, are written at the
    commit only, together: for a transaction on someone's way to an answer (a visitor's
    message: its message.created row and its reply's job row are one round trip, not one
    each at the flush that gave the message its id and at the commit).

    A rollback drops them as it drops ORM-added rows, a savepoint's rollback only those
    emitted inside it."""
    from extensions import db

    session = session or db.session()
    outer = session.info.get(DEFER_MODE)
    session.info[DEFER_MODE] = UNTIL_COMMIT if until_commit or outer == UNTIL_COMMIT else True
    try:
        yield session
    finally:
        if not outer:
            session.info.pop(DEFER_MODE, None)
        else:
            session.info[DEFER_MODE] = outer


def write_deferred(session: Session) -> None:
    """Write the rows `deferred_emits()` kept aside. Only outside savepoints: a row written
    inside one would go with its rollback although it was emitted before it."""
    if session.info.get(DEFER_MODE) == UNTIL_COMMIT:
        return
    if session.info.get(DEFERRED) and not session.in_nested_transaction():
        rows = session.info.pop(DEFERRED)
        session.connection().execute(OutboxEvent.__table__.insert(), rows)


def enqueue(name: str, *args: Any, session: Session | None = None) -> uuid.UUID:
    """Run the registered task `name` with `args` once the current transaction commits.

    The job is an outbox row written in this transaction (topic `job:<name>`, the arguments
    as JSON): a rollback drops it, and a commit makes it durable. Right after the commit it
    is sent to the task's actor, ahead of the commit's events; if Redis is unreachable then,
    or the message is lost later (a Redis restart, a worker killed before it finished), the
    relay sends it again. Delivery is at-least-once: a task must tolerate running twice for
    one enqueue (check the state it moves on, or claim the work, before doing it).

    Jobs are sent before the commit's `before_events` callbacks and its events.

    Arguments must be JSON primitives (ids, strings, numbers, lists, dicts). The row is
    marked done when the task returns, or when it raised and has no retries left."""
    from events.registry import registry
    from extensions import db

    if name not in registry.tasks:
        raise ValueError(f"no task is registered as {name!r}")
    session = _in_transaction(session or db.session())
    arguments = to_primitive(list(args))
    values = {
        "event_id": uuid.uuid4(),
        "topic": job_topic(name),
        "entity": None,
        "entity_id": None,
        "tenant_id": None,  # not a tenant's event: no feed row, no webhooks
        "actor_user_id": None,
        "actor_ip": None,
        "payload": {"args": arguments},
        "status": "pending",
        "attempts": 0,
        "created_at": utcnow(),
    }
    if session.info.get(DEFER_MODE):
        session.info.setdefault(DEFERRED, []).append(values)
    else:
        session.add(OutboxEvent(**values))
    session.info.setdefault(EVENT_IDS, []).append(values["event_id"])
    session.info.setdefault(JOBS, []).append((values["event_id"], name, arguments))
    return values["event_id"]


JOB_TOPIC_PREFIX = "job:"


def job_topic(name: str) -> str:
    return JOB_TOPIC_PREFIX + name


def job_name(topic: str) -> str | None:
    """The task a job row runs, or None for an event."""
    return topic[len(JOB_TOPIC_PREFIX) :] if topic.startswith(JOB_TOPIC_PREFIX) else None


def on_commit(
    fn: Callable[[], None], session: Session | None = None, *, before_events: bool = False
) -> None:
    """Run `fn` after the current transaction commits (never if it rolls back): after the
    commit's events were sent to their handlers, or, with before_events, before that (for
    work someone is waiting for, which should not queue behind the events' handlers)."""
    from extensions import db

    session = _in_transaction(session or db.session())
    session.info.setdefault(AFTER_COMMIT, []).append((fn, before_events))


def delay_events(seconds: float, session: Session | None = None) -> None:
    """Send the current transaction's events to their handlers `seconds` after it commits,
    from a thread of this process, instead of at once; its jobs and before-events callbacks
    still go at once. For a commit whose job someone is waiting for (a visitor, for the
    reply): the events' handlers then run after the job has started rather than beside it,
    sharing the cores with it. A process that dies meanwhile leaves the events pending for
    the relay, as one that dies just after any commit does. (A transaction with after-events
    callbacks sends them at once: those callbacks wait for them.)"""
    from extensions import db

    session = _in_transaction(session or db.session())
    session.info[DISPATCH_DELAY] = max(seconds, session.info.get(DISPATCH_DELAY, 0.0))


def before_commit(
    fn: Callable[[], None], session: Session | None = None, *, last: bool = False
) -> None:
    """Run `fn` inside the current transaction just before it commits, after a flush of
    everything pending (so new rows have their ids), and never if it rolls back.

    For work that needs ids but need not hold up the handler: a handler that adds a row
    and renders it at once must flush for the id, a round trip per row; deferred to here,
    one flush writes all the rows of a batch of events in a statement or two.

    `last`: after every other before-commit callback, those they register included. For a
    write that locks rows other transactions also write (shared counters): the lock is then
    held for the commit only, not while the rest of the work is done."""
    from extensions import db

    session = _in_transaction(session or db.session())
    session.info.setdefault(BEFORE_COMMIT_LAST if last else BEFORE_COMMIT, []).append(fn)


def at_commit(fn: Callable[[], None], session: Session | None = None) -> None:
    """Run `fn` at the last moment before the outermost COMMIT (after the before-commit work
    and its flush), never if the transaction rolls back before it.

    For an effect that must not be lost when the process dies just after the commit, and that
    may be repeated: should the COMMIT itself then fail, the work is retried and does it
    again (an event handler's transaction is)."""
    from extensions import db

    session = _in_transaction(session or db.session())
    session.info.setdefault(AT_COMMIT, []).append(fn)


_handler_transactions = threading.local()


@contextlib.contextmanager
def handler_transaction():
    """Marks the transactions of an event handler's message on this thread: their live
    frames are published at commit (services.live), so a worker dying between its commit
    and its after-commit callbacks loses none (the handlers' records are committed by then,
    and a redelivery would skip them)."""
    _handler_transactions.active = True
    try:
        yield
    finally:
        _handler_transactions.active = False


def in_handler_transaction() -> bool:
    return getattr(_handler_transactions, "active", False)


def _in_transaction(session: Session) -> Session:
    """Work registered between transactions belongs to the next one: begun now, so that a
    rollback before any statement drops the work too (a session with no transaction ignores
    rollback(), and the next commit would have run it)."""
    if not session.in_transaction():
        session.begin()
    return session


def prepare_commit(session: Session) -> None:
    """Flush and run the before-commit work (the commit does it too; call it first to have
    its errors raised where they can still be handled)."""
    while True:
        if session.info.get(BEFORE_COMMIT):
            key = BEFORE_COMMIT
        elif session.info.get(BEFORE_COMMIT_LAST):
            key = BEFORE_COMMIT_LAST
        else:
            return
        session.flush()
        for fn in session.info.pop(key):
            fn()


def _before_commit(session: Session) -> None:
    if not session.in_nested_transaction():
        if session.info.get(DEFER_MODE) == UNTIL_COMMIT:
            # The commit's own flush comes after this: the rows it makes are written by it.
            session.flush()
            session.info[DEFER_MODE] = True
        prepare_commit(session)
        write_deferred(session)
        work = session.info.pop(AT_COMMIT, None)
        if work:
            with contextlib.ExitStack() as scopes:
                for scope in _callback_scopes:
                    scopes.enter_context(scope())
                _run_callbacks(work)


def _after_commit(session: Session) -> None:
    if session.in_nested_transaction():
        # A savepoint released: what it registered stays, for the outermost commit.
        session.info.get(SAVEPOINT_MARKS, {}).pop(session.get_nested_transaction(), None)
        return
    # Committed; the work runs in _after_transaction_end, once the connection is released.
    event_ids = session.info.pop(EVENT_IDS, None)
    callbacks = session.info.pop(AFTER_COMMIT, None)
    jobs = session.info.pop(JOBS, None)
    delay = session.info.pop(DISPATCH_DELAY, 0.0)
    if event_ids or callbacks:
        session.info[COMMITTED] = (event_ids, callbacks, jobs, delay)


def _run_committed_work(session: Session) -> None:
    event_ids, callbacks, jobs, delay = session.info.pop(COMMITTED)
    callbacks = callbacks or ()
    if jobs and has_app_context():
        from events.dispatch import send_new_jobs

        unsent = send_new_jobs(current_app._get_current_object(), jobs)
        if unsent:  # pending for the relay: not to be claimed as sent
            event_ids = [event_id for event_id in event_ids if event_id not in unsent]
    _run_callbacks(fn for fn, before_events in callbacks if before_events)
    after_events = [fn for fn, before_events in callbacks if not before_events]
    if event_ids and has_app_context():
        from events.dispatch import dispatch_later, dispatch_new

        app = current_app._get_current_object()
        try:
            if delay > 0 and not after_events:
                dispatch_later(app, event_ids, delay)
            else:
                dispatch_new(app, event_ids)
        except Exception:  # noqa: BLE001 - the commit stands; the relay delivers later
            log.exception("dispatch after commit failed; events stay pending for the relay")
    with contextlib.ExitStack() as scopes:
        for scope in _callback_scopes:
            scopes.enter_context(scope())
        _run_callbacks(after_events)


# Context managers wrapped around a commit's (after-events) callbacks, e.g. one that gathers
# the live frames they publish and sends them together when the last callback has run.
_callback_scopes: list[Callable[[], contextlib.AbstractContextManager]] = []


def around_commit_callbacks(scope: Callable[[], contextlib.AbstractContextManager]) -> None:
    if scope not in _callback_scopes:
        _callback_scopes.append(scope)


def _run_callbacks(callbacks: Iterable[Callable[[], None]]) -> None:
    for fn in callbacks:
        try:
            fn()
        except Exception:  # noqa: BLE001 - one failed callback must not stop the others
            log.exception("on_commit callback failed")


def _after_transaction_create(session: Session, transaction: Any) -> None:
    if transaction.nested:  # remember what was registered before the savepoint
        marks = session.info.setdefault(SAVEPOINT_MARKS, {})
        marks[transaction] = {
            key: len(session.info.get(key, ()))
            for key in (
                EVENT_IDS,
                AFTER_COMMIT,
                BEFORE_COMMIT,
                BEFORE_COMMIT_LAST,
                AT_COMMIT,
                JOBS,
                DEFERRED,
            )
        }


def _after_transaction_end(session: Session, transaction: Any) -> None:
    if not transaction.nested:
        if transaction.parent is None and COMMITTED in session.info:
            _run_committed_work(session)
        return
    # Still marked: the savepoint ended without being released (rolled back), so the events
    # and after-commit work registered inside it go with it.
    marks = session.info.get(SAVEPOINT_MARKS, {}).pop(transaction, None)
    for key, mark in (marks or {}).items():
        if key in session.info:
            del session.info[key][mark:]


def _after_soft_rollback(session: Session, previous_transaction: Any) -> None:
    if previous_transaction.parent is None:
        session.info.pop(EVENT_IDS, None)
        session.info.pop(DEFERRED, None)
        session.info.pop(JOBS, None)
        session.info.pop(AFTER_COMMIT, None)
        session.info.pop(BEFORE_COMMIT, None)
        session.info.pop(BEFORE_COMMIT_LAST, None)
        session.info.pop(AT_COMMIT, None)
        session.info.pop(SAVEPOINT_MARKS, None)
        session.info.pop(COMMITTED, None)
        session.info.pop(DISPATCH_DELAY, None)


def _keep_old_value(target, value, oldvalue, initiator):
    return value


def _mapper_configured(mapper, class_) -> None:
    # Load the old value when a tracked column is set, even after a commit expired it, so
    # "updated" events always carry old→new pairs.
    if issubclass(class_, Tracked):
        for attr in mapper.column_attrs:
            sa_event.listen(
                getattr(class_, attr.key), "set", _keep_old_value, active_history=True, retval=True
            )


_installed = False


def install() -> None:
    """Attach the listeners to every ORM Session (once per process)."""
    global _installed
    if _installed:
        return
    from sqlalchemy.orm import Mapper

    sa_event.listen(Mapper, "mapper_configured", _mapper_configured)
    sa_event.listen(Session, "after_flush", _after_flush)
    sa_event.listen(Session, "before_commit", _before_commit)
    sa_event.listen(Session, "after_commit", _after_commit)
    sa_event.listen(Session, "after_soft_rollback", _after_soft_rollback)
    sa_event.listen(Session, "after_transaction_create", _after_transaction_create)
    sa_event.listen(Session, "after_transaction_end", _after_transaction_end)
    _installed = True
