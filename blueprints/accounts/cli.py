"""`flask users …` and `flask demo …` commands."""

from __future__ import annotations

import click
from flask.cli import with_appcontext

from extensions import db
from services.accounts import AccountError, create_user, get_or_create_tenant

users_cli = click.Group("users", help="Manage users.")
demo_cli = click.Group("demo", help="Demo data.")


@users_cli.command("create")
@click.option("--email", required=True)
@click.option("--tenant", "tenant_name", required=True, help="Tenant name (created if new).")
@click.option("--role", type=click.Choice(["admin", "agent"]), default="agent", show_default=True)
@click.password_option(help="Prompted for when not given.")
@with_appcontext
def create_user_command(email: str, tenant_name: str, role: str, password: str) -> None:
    """Create a user (and the tenant if it does not exist yet)."""
    try:
        tenant = get_or_create_tenant(tenant_name)
        user = create_user(email, password, tenant, role=role)
        db.session.commit()
    except AccountError as exc:
        db.session.rollback()
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Created {user.role} {user.email} in tenant {tenant.name!r}.")


@demo_cli.command("load")
@with_appcontext
def demo_load() -> None:
    """Load the demo tenant, its admin login and sample records (safe to run twice)."""
    from services.demo import load_demo

    result = load_demo()
    db.session.commit()
    click.echo(result.describe())
