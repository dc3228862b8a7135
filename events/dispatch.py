"""Hand committed outbox rows to Dramatiq, and the relay that delivers what is left behind.

A row is *claimed* (pending → dispatched) by one UPDATE … RETURNING before its messages are
sent, so the after-commit path and any number of relays never send the same row twice in
the normal course; a failed send puts it back to pending. A row that was sent but whose
handlers have not all recorded a result after EVENTS_REDELIVER_AFTER seconds (a lost message,
a Redis restart, a killed embedded worker) is sent again to the missing handlers only.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from flask import Flask
from sqlalchemy import and_, bindparam, func, select, update

from events.registry import registry
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
        names = registry.handler_names_for(topic)
        if only is not None:
            names = tuple(n for n in names if n in only.get(event_pk, set()))
        if not names:
            empty.append(event_pk)
            continue
        for group in registry.groups_for(names):
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


def _claim(conn, condition, limit: int | None = None) -> list[tuple[int, str]]:
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
        .returning(*_returning(conn))
    )
    return [(row.id, row.topic) for row in conn.execute(stmt)]


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


def dispatch_new(app: Flask, event_ids: Sequence[uuid.UUID]) -> None:
    """Called right after a commit with the ids of the events it wrote."""
    state = _state(app)
    if not state.can_dispatch_now():
        return  # embedded CLI process: the web process's relay delivers them
    with db.engine.begin() as conn:
        rows = _claim_new(conn, event_ids)
    if not rows:
        return
    sent, failed, empty = _send(app, rows)
    if failed or empty:
        with db.engine.begin() as conn:
            _mark(conn, failed, "pending")
            _mark(conn, empty, "done")


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
    if rows:
        sent, failed, empty = _send(app, rows)
        report.sent += len(sent)
        report.failed_sends += len(failed)
        with db.engine.begin() as conn:
            _mark(conn, failed, "pending")
            _mark(conn, empty, "done")
        report.completed += len(empty)

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
        finished, stale = [], []
        for cand in candidates:
            missing = set(registry.handler_names_for(cand.topic)) - done_by.get(cand.id, set())
            if not missing:
                finished.append(cand.id)
            elif cand.dispatched_at is None or cand.dispatched_at <= now - redeliver_after:
                stale.append((cand.id, cand.topic, missing))
        _mark(conn, finished, "done")
        report.completed += len(finished)
        if stale:
            stale_ids = [s[0] for s in stale]
            conn.execute(
                update(table)
                .where(table.c.id.in_(stale_ids))
                .values(dispatched_at=now, attempts=table.c.attempts + 1)
            )
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
