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


def _user_or_fail(email: str):
    from services.accounts import user_by_email

    user = user_by_email(email)
    if user is None:
        raise click.ClickException(f"No user with email {email}.")
    return user


@users_cli.command("logout-everywhere")
@click.argument("email")
@with_appcontext
def logout_everywhere_command(email: str) -> None:
    """End every session and remember-me cookie of a user (they sign in again)."""
    from services.accounts import end_all_sessions

    user = _user_or_fail(email)
    end_all_sessions(user)
    db.session.commit()
    click.echo(f"{user.email} is signed out on every device.")


@users_cli.command("deactivate")
@click.argument("email")
@with_appcontext
def deactivate_command(email: str) -> None:
    """Stop a user from signing in; their sessions and cookies stop working for good."""
    from services.accounts import set_active

    user = _user_or_fail(email)
    set_active(user, False)
    db.session.commit()
    click.echo(f"{user.email} is deactivated and signed out everywhere.")


@users_cli.command("activate")
@click.argument("email")
@with_appcontext
def activate_command(email: str) -> None:
    """Let a deactivated user sign in again (with their password; old cookies stay dead)."""
    from services.accounts import set_active

    user = _user_or_fail(email)
    set_active(user, True)
    db.session.commit()
    click.echo(f"{user.email} can sign in again.")


@demo_cli.command("load")
@click.option("--force", is_flag=True, help="Load it even in production mode (REDIS_URL is set).")
@with_appcontext
def demo_load(force: bool) -> None:
    """Load the demo tenant, its admin login and sample records (safe to run twice)."""
    from flask import current_app

    from services.demo import load_demo

    if not current_app.config["EMBEDDED"] and not force:
        # The demo admin's email and password are documented, so on a reachable server
        # they are a way in.
        raise click.ClickException(
            "Refusing to load demo data in production mode (REDIS_URL is set): it creates "
            "an admin login whose password is published (DEMO_EMAIL / DEMO_PASSWORD). "
            "Run `flask demo load --force` if this really is a demo server."
        )
    result = load_demo()
    db.session.commit()
    click.echo(result.describe())
