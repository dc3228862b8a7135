"""`flask chats metrics`: the Metrics page's chat and message figures as a table."""

from __future__ import annotations

import click
from flask.cli import with_appcontext
from sqlalchemy import select

from extensions import db
from services import metrics


@click.command("metrics")
@click.option(
    "--period",
    type=click.Choice(["daily", "weekly"]),
    default="daily",
    show_default=True,
    help="One row per day, or per ISO week (Monday start).",
)
@click.option(
    "--days",
    type=click.IntRange(1, 366),
    default=30,
    show_default=True,
    help="How many days back, today included (UTC).",
)
@click.option("--tenant", "tenant_name", default=None, help="Tenant name or id (default: all).")
@with_appcontext
def metrics_command(period: str, days: int, tenant_name: str | None) -> None:
    """Chats and messages per period, per tenant."""
    from models.accounts import Tenant

    query = select(Tenant).order_by(Tenant.id)
    if tenant_name:
        if tenant_name.isdigit():
            query = query.where(Tenant.id == int(tenant_name))
        else:
            query = query.where(Tenant.name == tenant_name)
    tenants = db.session.scalars(query).all()
    if not tenants:
        raise click.ClickException(f"No tenant {tenant_name!r}." if tenant_name else "No tenants.")
    headers = ("period start", "chats", "messages", "visitor", "assistant", "negative")
    for index, tenant in enumerate(tenants):
        if index:
            click.echo()
        click.echo(f"{tenant.name} (#{tenant.id}), {period}, last {days} days")
        rows = metrics.period_table(tenant.id, days, period)
        table = [
            (r.start.isoformat(), r.chats, r.messages, r.visitor, r.assistant, r.negative)
            for r in rows
        ]
        totals = ("total", *(sum(row[i] for row in table) for i in range(1, len(headers))))
        widths = [
            max(len(str(row[i])) for row in (headers, *table, totals)) for i in range(len(headers))
        ]

        def line(row, widths=widths) -> str:
            first = str(row[0]).ljust(widths[0])
            rest = (str(v).rjust(w) for v, w in zip(row[1:], widths[1:], strict=True))
            return "  ".join((first, *rest))

        click.echo(line(headers))
        click.echo("  ".join("-" * w for w in widths))
        for row in table:
            click.echo(line(row))
        click.echo("  ".join("-" * w for w in widths))
        click.echo(line(totals))
