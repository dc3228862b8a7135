"""Hand committed outbox rows to Dramatiq, and the relay that delivers what is left behind.

A row is *claimed* (pending → dispatched) by one UPDATE … RETURNING before its messages are
sent, so the after-commit path and any number of relays never send the same row twice in
the normal course; a failed send puts it back to pending. A row that was sent but whose
handlers have not all recorded a result after EVENTS_REDELIVER_AFTER seconds (a lost message,
a Redis restart, a killed embedded worker) is sent again to the missing handlers only.

Jobs (events.enqueue: rows whose topic is `job:<task>`) take the same path to one task's
actor, with the row's event id in the message (option `job`); the task's wrapper marks the
row done when it has finished. A job dispatched and not done after its own redelivery window
(job_redeliver_after: long enough for every try the task may make) is sent again.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from flask import Flask
from sqlalchemy import and_, bindparam, func, select, update

from events.outbox import job_name
from events.registry import TaskSpec, registry
from extensions import db
from models.base import utcnow
from models.events import OutboxEvent, ProcessedEvent

log = logging.getLogger(__name__)


@dataclass
class RelayReport:
    sent: int = 0
    redelivered: int = 0
    completed: int = 0
    failed_sends: int = 0


def _state(app: Flask):
    return app.extensions["switchboard.tasks"]


def _send(app: Flask, rows: Sequence[tuple[int, str]], only: dict[int, set[str]] | None = None):
    """Send the events to their handler groups: one message per group for up to
    EVENTS_BATCH events (a poll's commit writes dozens; the group runs them in one
    transaction). Returns (sent, failed, handler-less) ids."""
    state = _state(app)
    batch = max(1, int(app.config["EVENTS_BATCH"]))
    empty: list[int] = []
    by_group: dict[str, list[int]] = {}
    for event_pk, topic in rows:
        if job_name(topic) is not None:
            raise ValueError("jobs are sent by _send_jobs")
        names = registry.handler_names_for(topic)
        if only is not None:
            names = tuple(n for n in names if n in only.get(event_pk, set()))
        if not names:
            empty.append(event_pk)
            continue
        for group in registry.groups_for(names, topic):
            by_group.setdefault(group, []).append(event_pk)
    grouped = {pk for pks in by_group.values() for pk in pks}
    failed: set[int] = set()
    for group, pks in by_group.items():
        actor = state.actors[group_actor_name(group)]
        for start in range(0, len(pks), batch):
            chunk = pks[start : start + batch]
            try:
                actor.send(chunk[0] if len(chunk) == 1 else chunk)
            except Exception as exc:  # noqa: BLE001 - broker unreachable: the rows wait
                log.warning("could not send events %s to the broker: %s", chunk, exc)
                failed.update(chunk)
    # A row that some group did not get goes back to pending, and the relay sends it to all
    # of them again later: the groups that had it skip it by their records.
    sent = [pk for pk, _ in rows if pk not in failed and pk in grouped]
    lost = [pk for pk, _ in rows if pk in failed]
    return sent, lost, empty


def send_job(app: Flask, name: str, args: Sequence[Any], job_id: uuid.UUID) -> None:
    """Send one job to its task's actor; raises when the broker cannot take it."""
    actor = _state(app).actors[name]
    actor.send_with_options(args=tuple(args), job=str(job_id))


def _send_jobs(app: Flask, rows: Sequence[Any]) -> tuple[list[int], list[int], list[int]]:
    """Send claimed job rows (id, event_id, topic, payload). Returns (sent, failed, unknown)
    ids: a job whose task no longer exists is done (logged), not retried for ever."""
    sent, failed, unknown = [], [], []
    for row in rows:
        name = job_name(row.topic)
        if name not in registry.tasks:
            log.error("job %s names no registered task (%s); dropped", row.id, row.topic)
            unknown.append(row.id)
            continue
        try:
            send_job(app, name, (row.payload or {}).get("args", ()), row.event_id)
        except Exception as exc:  # noqa: BLE001 - broker unreachable: the row waits
            log.warning("could not send job %s to the broker: %s", row.id, exc)
            failed.append(row.id)
        else:
            sent.append(row.id)
    return sent, failed, unknown


def job_redeliver_after(app: Flask, spec: TaskSpec) -> float:
    """Seconds after which a dispatched job with no result is presumed lost: every try
    the task may make, with its back-offs, plus EVENTS_REDELIVER_AFTER. Sooner, a job still
    being retried by Dramatiq would run a second time alongside."""
    tries = spec.max_retries + 1
    busy_ms = tries * spec.time_limit_ms + spec.max_retries * spec.max_backoff_ms
    return float(app.config["EVENTS_REDELIVER_AFTER"]) + busy_ms / 1000


def group_actor_name(group: str) -> str:
    return f"spine_{group}"


def _returning(conn) -> list:
    table = OutboxEvent.__table__
    returning = [table.c.id, table.c.topic]
    if conn.dialect.name == "postgresql":
        # SET LOCAL synchronous_commit TO OFF, in the same round trip: a claim need not wait
        # for its WAL flush. If PostgreSQL crashes and loses it, the rows are pending again
        # and the relay sends them a second time; handlers are idempotent, so at most a
        # duplicate delivery that changes nothing. (The rows themselves were written by the
        # producer's own, synchronous, commit.)
        returning.append(func.set_config("synchronous_commit", "off", True))
    return returning


def _claim(conn, condition, limit: int | None = None) -> list[Any]:
    """Claim rows (the relay's): (id, topic, event_id, payload) each."""
    table = OutboxEvent.__table__
    ids = select(table.c.id).where(condition).order_by(table.c.id)
    if limit:
        ids = ids.limit(limit)
    if conn.dialect.name == "postgresql":
        ids = ids.with_for_update(skip_locked=True)
    stmt = (
        update(table)
        .where(table.c.id.in_(ids.scalar_subquery()))
        .values(status="dispatched", dispatched_at=utcnow(), attempts=table.c.attempts + 1)
        .returning(*_returning(conn), table.c.event_id, table.c.payload)
    )
    return list(conn.execute(stmt))


def _split_jobs(rows: Sequence[Any]) -> tuple[list[tuple[int, str]], list[Any]]:
    events, jobs = [], []
    for row in rows:
        if job_name(row.topic) is None:
            events.append((row.id, row.topic))
        else:
            jobs.append(row)
    return events, jobs


_CLAIM_NEW: dict[str, Any] = {}


def _claim_new(conn, event_ids: Sequence[uuid.UUID]) -> list[tuple[int, str]]:
    """Claim the rows a commit just wrote, by event id, with a statement built once.

    Unlike the relay's claim it needs no SKIP LOCKED subquery: should a relay be claiming
    one of these rows at this very moment, the UPDATE waits for it and then finds the row
    no longer pending — as correct, and cheaper on every commit."""
    stmt = _CLAIM_NEW.get(conn.dialect.name)
    if stmt is None:
        table = OutboxEvent.__table__
        stmt = (
            update(table)
            .where(
                table.c.event_id.in_(bindparam("event_ids", expanding=True)),
                table.c.status == "pending",
            )
            .values(
                status="dispatched",
                dispatched_at=bindparam("now"),
                attempts=table.c.attempts + 1,
            )
            .returning(*_returning(conn))
        )
        _CLAIM_NEW[conn.dialect.name] = stmt
    params = {"event_ids": list(event_ids), "now": utcnow()}
    return [(row.id, row.topic) for row in conn.execute(stmt, params)]


def _mark(conn, ids: Sequence[int], status: str) -> None:
    if ids:
        table = OutboxEvent.__table__
        conn.execute(update(table).where(table.c.id.in_(ids)).values(status=status))


def send_new_jobs(app: Flask, jobs: Sequence[tuple[uuid.UUID, str, Sequence[Any]]]) -> set:
    """Called right after a commit, first of all, with the jobs (event id, task, args) it
    wrote: someone may be waiting for one (a visitor for a reply), so they go out before any
    round trip to the database. Returns the ids of those not sent: they stay pending for the
    relay, and dispatch_new must leave them out of its claim."""
    if not jobs or not _state(app).can_dispatch_now():
        return {job_id for job_id, _, _ in jobs}
    unsent = set()
    for job_id, name, args in jobs:
        try:
            send_job(app, name, args, job_id)
        except Exception as exc:  # noqa: BLE001 - the row stays pending; the relay sends it
            log.warning("could not send job %s (%s) after commit: %s", job_id, name, exc)
            unsent.add(job_id)
    return unsent


def dispatch_new(app: Flask, event_ids: Sequence[uuid.UUID]) -> None:
    """Called right after a commit with the ids of the events it wrote, and of the jobs
    send_new_jobs sent: one claim marks them all dispatched."""
    state = _state(app)
    if not state.can_dispatch_now() or not event_ids:
        return  # embedded CLI process: the web process's relay delivers them
    with db.engine.begin() as conn:
        claimed = _claim_new(conn, event_ids)
    rows = [(pk, topic) for pk, topic in claimed if job_name(topic) is None]
    if not rows:
        return
    sent, failed, empty = _send(app, rows)
    if failed or empty:
        with db.engine.begin() as conn:
            _mark(conn, failed, "pending")
            _mark(conn, empty, "done")


class _LaterDispatches:
    """The commits' events that delay_events() holds back, each sent by dispatch_new when
    it is due, by one thread per process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._due: list[tuple[float, int, Flask, Sequence[uuid.UUID]]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        thread = threading.Thread(target=self._run, name="events-later", daemon=True)
        thread.start()

    def add(self, app: Flask, event_ids: Sequence[uuid.UUID], delay: float) -> None:
        with self._wake:
            heapq.heappush(self._due, (time.monotonic() + delay, next(self._order), app, event_ids))
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._wake.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, _, app, event_ids = heapq.heappop(self._due)
            try:
                with app.app_context():
                    dispatch_new(app, event_ids)
            except Exception:  # noqa: BLE001 - the relay delivers what is still pending
                log.exception("delayed dispatch failed; events stay pending for the relay")


_later: _LaterDispatches | None = None
_later_lock = threading.Lock()


def dispatch_later(app: Flask, event_ids: Sequence[uuid.UUID], delay: float) -> None:
    """dispatch_new(app, event_ids) in `delay` seconds, off the caller's thread."""
    global _later
    with _later_lock:
        if _later is None or _later.pid != os.getpid():  # (a forked worker starts its own)
            _later = _LaterDispatches()
        later = _later
    later.add(app, list(event_ids), delay)


def relay(app: Flask, *, limit: int | None = None, min_age_seconds: float = 1.0) -> RelayReport:
    """Send pending rows, redeliver stale ones, mark finished ones done. Safe to run anywhere."""
    report = RelayReport()
    limit = limit or app.config["EVENTS_RELAY_BATCH"]
    table = OutboxEvent.__table__
    now = utcnow()

    # 1. Pending rows old enough that their own commit's dispatch is not still under way.
    with db.engine.begin() as conn:
        rows = _claim(
            conn,
            and_(
                table.c.status == "pending",
                table.c.created_at <= now - timedelta(seconds=min_age_seconds),
            ),
            limit,
        )
    events, jobs = _split_jobs(rows)
    if events or jobs:
        sent, failed, empty = _send(app, events)
        sent_jobs, failed_jobs, unknown_jobs = _send_jobs(app, jobs)
        report.sent += len(sent) + len(sent_jobs)
        report.failed_sends += len(failed) + len(failed_jobs)
        with db.engine.begin() as conn:
            _mark(conn, failed + failed_jobs, "pending")
            _mark(conn, empty + unknown_jobs, "done")
        report.completed += len(empty) + len(unknown_jobs)

    # 2. Dispatched rows: done when every handler has a result; else redeliver when stale.
    redeliver_after = timedelta(seconds=app.config["EVENTS_REDELIVER_AFTER"])
    processed = ProcessedEvent.__table__
    with db.engine.begin() as conn:
        candidates = conn.execute(
            select(table.c.id, table.c.topic, table.c.dispatched_at)
            .where(table.c.status == "dispatched")
            .order_by(table.c.id)
            .limit(limit)
        ).all()
        if not candidates:
            return report
        done_by: dict[int, set[str]] = {}
        for event_pk, name in conn.execute(
            select(processed.c.event_id, processed.c.handler).where(
                processed.c.event_id.in_([c.id for c in candidates])
            )
        ):
            done_by.setdefault(event_pk, set()).add(name)
        finished, stale, stale_jobs = [], [], []
        for cand in candidates:
            name = job_name(cand.topic)
            if name is not None:  # done only by its task's wrapper (tasks.broker)
                spec = registry.tasks.get(name)
                window = job_redeliver_after(app, spec) if spec else 0.0
                if cand.dispatched_at is None or cand.dispatched_at <= now - timedelta(
                    seconds=window
                ):
                    stale_jobs.append(cand.id)
                continue
            missing = set(registry.handler_names_for(cand.topic)) - done_by.get(cand.id, set())
            if not missing:
                finished.append(cand.id)
            elif cand.dispatched_at is None or cand.dispatched_at <= now - redeliver_after:
                stale.append((cand.id, cand.topic, missing))
        _mark(conn, finished, "done")
        report.completed += len(finished)
        if stale or stale_jobs:
            stale_ids = [s[0] for s in stale] + stale_jobs
            conn.execute(
                update(table)
                .where(table.c.id.in_(stale_ids))
                .values(dispatched_at=now, attempts=table.c.attempts + 1)
            )
        job_rows = (
            conn.execute(
                select(table.c.id, table.c.topic, table.c.event_id, table.c.payload).where(
                    table.c.id.in_(stale_jobs)
                )
            ).all()
            if stale_jobs
            else []
        )
    if job_rows:
        sent_jobs, failed_jobs, unknown_jobs = _send_jobs(app, job_rows)
        report.redelivered += len(sent_jobs)
        report.failed_sends += len(failed_jobs)
        if unknown_jobs or failed_jobs:
            with db.engine.begin() as conn:
                _mark(conn, unknown_jobs, "done")
                _mark(conn, failed_jobs, "pending")  # the next relay tries again soon
    if stale:
        only = {s[0]: s[2] for s in stale}
        sent, failed, _ = _send(app, [(s[0], s[1]) for s in stale], only=only)
        report.redelivered += len(sent)
        report.failed_sends += len(failed)
    return report


def pending_count() -> int:
    return (
        db.session.scalar(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.status == "pending")
        )
        or 0
    )
