"""`flask events …`: look at the outbox and deliver what waits."""

from __future__ import annotations

import time

import click
from flask import current_app
from flask.cli import with_appcontext
from sqlalchemy import func, select

from events.dispatch import relay
from extensions import db
from models.events import OutboxEvent, ProcessedEvent

events_cli = click.Group("events", help="The event spine's outbox.")


@events_cli.command("relay")
@click.option("--loop", is_flag=True, help="Keep relaying every EVENTS_RELAY_INTERVAL seconds.")
@click.option("--min-age", default=0.0, show_default=True, help="Skip rows younger than this (s).")
@with_appcontext
def relay_command(loop: bool, min_age: float) -> None:
    """Send pending events to the broker and redeliver stale ones."""
    app = current_app._get_current_object()
    state = app.extensions["switchboard.tasks"]
    if state.embedded:
        # The StubBroker's queue lives in this process: run the handlers here too.
        state.start_embedded_worker()
    while True:
        report = relay(app, min_age_seconds=min_age)
        click.echo(
            f"sent {report.sent}, redelivered {report.redelivered}, done {report.completed}, "
            f"failed sends {report.failed_sends}"
        )
        if state.embedded:
            for queue_name in state.broker.get_declared_queues():
                state.broker.join(queue_name, timeout=120_000)
            state.worker.join()
        if not loop:
            if state.embedded:
                state.stop()
            if report.failed_sends:
                raise click.ClickException("the broker could not be reached; events stay pending")
            return
        time.sleep(app.config["EVENTS_RELAY_INTERVAL"])


@events_cli.command("list")
@click.option("--pending", "only_pending", is_flag=True, help="Only events not yet sent.")
@click.option("--failed", "only_failed", is_flag=True, help="Only events a handler gave up on.")
@click.option("--limit", default=50, show_default=True)
@with_appcontext
def list_command(only_pending: bool, only_failed: bool, limit: int) -> None:
    """Show the newest outbox events."""
    stmt = select(OutboxEvent).order_by(OutboxEvent.id.desc()).limit(limit)
    if only_pending:
        stmt = stmt.where(OutboxEvent.status == "pending")
    if only_failed:
        failed = select(ProcessedEvent.event_id).where(ProcessedEvent.status == "failed")
        stmt = stmt.where(OutboxEvent.id.in_(failed))
    rows = db.session.scalars(stmt).all()
    totals = dict(
        db.session.execute(
            select(OutboxEvent.status, func.count()).group_by(OutboxEvent.status)
        ).all()
    )
    summary = ", ".join(f"{totals.get(s, 0)} {s}" for s in ("pending", "dispatched", "done"))
    if not rows:
        click.echo(f"No events to show ({summary}).")
        return
    click.echo(f"{'id':>8}  {'status':<10} {'tries':>5}  {'created':<19}  {'tenant':>6}  topic")
    for row in rows:
        click.echo(
            f"{row.id:>8}  {row.status:<10} {row.attempts:>5}  "
            f"{row.created_at:%Y-%m-%d %H:%M:%S}  {row.tenant_id or '-':>6}  {row.topic}"
        )
    click.echo(f"({summary})")
