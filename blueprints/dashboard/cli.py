"""`flask serve`: the embedded-mode server used by `make run`."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import with_appcontext


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@with_appcontext
def serve_command(host: str, port: int) -> None:
    """Serve the console with its worker threads in this process (embedded mode)."""
    from werkzeug.serving import run_simple

    app = current_app._get_current_object()
    state = app.extensions["switchboard.tasks"]
    fleet = _start_simulated_receivers(app)
    try:
        if state.embedded:
            state.start_embedded_worker()
        else:
            click.echo("Production mode: run `dramatiq tasks.worker` for the worker processes.")
        click.echo(f"Switchboard on http://{host}:{port}/")
        if _demo_login_exists(app):
            click.echo(f"Log in as {app.config['DEMO_EMAIL']} / {app.config['DEMO_PASSWORD']}")
        run_simple(host, port, app, threaded=True, use_reloader=False, use_debugger=False)
    finally:
        if fleet is not None:
            fleet.stop()


def _demo_login_exists(app) -> bool:
    """Only a login that works is printed (none on a server without the demo data)."""
    from sqlalchemy import select

    from extensions import db
    from models.accounts import User

    with app.app_context():
        try:
            return (
                db.session.scalar(select(User.id).where(User.email == app.config["DEMO_EMAIL"]))
                is not None
            )
        finally:
            db.session.remove()


def _start_simulated_receivers(app):
    """DEVICES_SIMULATOR_RECEIVERS > 0: a demo fleet of simulated Shure receivers, registered
    as the demo tenant's endpoints so the periodic poll discovers and watches them."""
    count = int(app.config.get("DEVICES_SIMULATOR_RECEIVERS", 0) or 0)
    if count <= 0:
        return None
    from services.manufacturers.simulator import start_demo_fleet

    fleet = start_demo_fleet(app, count)
    if fleet is None:
        click.echo("No demo tenant: run `flask demo load` to watch simulated receivers.")
        return None
    addresses = ", ".join(f"{h}:{p}" for h, p in fleet.endpoints)
    click.echo(f"{count} simulated Shure receivers for the demo tenant: {addresses}")
    return fleet
