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


@users_cli.command("set-role")
@click.option("--email", required=True)
@click.option("--role", type=click.Choice(["admin", "agent"]), required=True)
@with_appcontext
def set_role_command(email: str, role: str) -> None:
    """Change a user's role (recorded in the tenant's audit trail)."""
    from sqlalchemy import select

    from models.accounts import User

    user = db.session.scalar(select(User).where(User.email == email.strip().lower()))
    if user is None:
        raise click.ClickException(f"No user with email {email}.")
    if user.role == role:
        click.echo(f"{user.email} is already {role}.")
        return
    user.role = role
    db.session.commit()
    click.echo(f"{user.email} is now {role}.")


@demo_cli.command("load")
@with_appcontext
def demo_load() -> None:
    """Load the demo tenant, its admin login and sample records (safe to run twice)."""
    from services.demo import load_demo

    result = load_demo()
    db.session.commit()
    click.echo(result.describe())
