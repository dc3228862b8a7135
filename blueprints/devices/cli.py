"""`flask devices …`: simulate receivers, poll or sync manufacturer services, manage endpoints."""

from __future__ import annotations

import time

import click
from flask.cli import AppGroup

import services.manufacturers.shure  # noqa: F401 - registers the "shure" service
from extensions import db
from models.accounts import Tenant
from models.devices import Location
from services import devices as device_service
from services.manufacturers import endpoints as endpoint_service

devices_cli = AppGroup("devices", help="Devices: manufacturer services, endpoints, simulator.")
endpoints_cli = AppGroup("endpoints", help="Receiver addresses the services connect to.")
devices_cli.add_command(endpoints_cli)
manufacturers_cli = AppGroup(
    "manufacturers", help="The manufacturer catalog every tenant chooses from (read-only to them)."
)
devices_cli.add_command(manufacturers_cli)


def _tenant(ref: str):
    try:
        return endpoint_service.resolve_tenant(ref)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None


def _service_code(code: str) -> str:
    try:
        return device_service.service_for(code).code
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None


# ---------------------------------------------------------------- simulate


@devices_cli.command("simulate")
@click.option("--receivers", default=20, show_default=True, type=click.IntRange(1, 500))
@click.option("--tenant", "tenant_ref", help="Tenant name or id: register the receivers for it.")
@click.option("--location", "location_ref", help="Location (name or id) for the endpoints.")
@click.option("--seed", type=int, help="Seed for models, names and animation (same ids each run).")
@click.option(
    "--tick",
    type=float,
    default=2.0,
    show_default=True,
    help="Seconds between animation steps (batteries drain, mics and receivers drop); 0: none.",
)
@click.option("--duration", type=float, hidden=True, help="Stop after this many seconds.")
def simulate_command(
    receivers: int,
    tenant_ref: str | None,
    location_ref: str | None,
    seed: int | None,
    tick: float,
    duration: float | None,
) -> None:
    """Run simulated Shure receivers on 127.0.0.1 until Ctrl-C."""
    from services.manufacturers.simulator import Fleet, attach_endpoints

    tenant = _tenant(tenant_ref) if tenant_ref else None
    if location_ref and tenant is None:
        raise click.ClickException("--location needs --tenant.")
    location = None
    if tenant is not None and location_ref:
        try:
            location = endpoint_service.resolve_location(tenant.id, location_ref)
        except LookupError as exc:
            raise click.ClickException(str(exc)) from None
    try:
        fleet = Fleet(receivers, seed=seed, tick=tick or None)
    except OSError as exc:
        raise click.ClickException(f"Could not start the receivers: {exc}") from None
    try:
        for receiver in fleet.receivers:
            host, port = receiver.address
            click.echo(
                f"  {host}:{port:<6} {receiver.model:<7} {receiver.device_id}"
                f"  ({len(receiver.channels)} channels)"
            )
        if tenant is not None:
            try:
                attach_endpoints(
                    tenant.id, fleet.endpoints, location_id=location.id if location else None
                )
            except ValueError as exc:
                db.session.rollback()
                raise click.ClickException(
                    f"{exc} The pollers would refuse these receivers: add 127.0.0.0/8 to "
                    "DEVICES_ALLOWED_NETWORKS (or run `flask serve` with "
                    "DEVICES_SIMULATOR_RECEIVERS)."
                ) from None
            db.session.commit()
            click.echo(f"Registered {len(fleet.endpoints)} endpoints for tenant {tenant.name!r}.")
        click.echo(f"{len(fleet.receivers)} simulated receivers running. Ctrl-C stops them.")
        stop_at = time.monotonic() + duration if duration is not None else None
        try:
            while stop_at is None or time.monotonic() < stop_at:
                time.sleep(0.1 if stop_at is not None else 0.5)
        except KeyboardInterrupt:
            click.echo("")
    finally:
        fleet.stop()
    click.echo("Receivers stopped.")


# ---------------------------------------------------------------- poll / sync


def _poll_when_free(tenant_id: int, service_code: str, name: str, wait: float, progress):
    """Poll once the running poll of the same tenant and service (a worker's, another
    command's) has finished, waiting at most `wait` seconds; None if it never did."""
    deadline = time.monotonic() + wait
    said = False
    while True:
        result = device_service.poll_service(tenant_id, service_code, progress=progress)
        if result.status != "skipped":
            return result
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if not said:
            click.echo(
                f"  Another poll of {service_code} for {name!r} is running; "
                f"waiting up to {wait:g} s for it…"
            )
            said = True
        time.sleep(min(0.25, left))


def _run_polls(
    tenant_ref: str | None, service: str | None, verb: str, quiet: bool, wait: float = 0.0
) -> None:
    code = _service_code(service) if service else None
    tenant = _tenant(tenant_ref) if tenant_ref else None
    targets = [
        (tenant_id, service_code)
        for tenant_id, service_code in sorted(device_service.tenants_with_endpoints())
        if (tenant is None or tenant_id == tenant.id) and (code is None or service_code == code)
    ]
    if not targets:
        who = f" for tenant {tenant.name!r}" if tenant else ""
        what = f" {code}" if code else ""
        click.echo(f"Nothing to {verb}: no enabled{what} endpoints{who}.")
        return

    def progress(report) -> None:
        state = "online" if report.online else "offline"
        click.echo(f"    {report.kind:<11} {report.api_device_id:<28} {state}  {report.name}")

    failed = []
    try:
        for tenant_id, service_code in targets:
            name = db.session.get(Tenant, tenant_id).name
            if service_code not in device_service.REGISTRY:
                # Endpoints of a manufacturer this install has no service for.
                problem = f"No manufacturer service {service_code!r}"
                click.echo(f"  {service_code} @ {name}: skipped. {problem}.")
                failed.append(f"{service_code} @ {name}: {problem}")
                continue
            click.echo(f"{verb.capitalize()}ing {service_code} for {name!r}…")
            result = _poll_when_free(
                tenant_id, service_code, name, wait, None if quiet else progress
            )
            if result is None:
                problem = f"another poll is still running after {wait:g} s; nothing was polled"
                click.echo(f"  {service_code} @ {name}: {problem}.")
                failed.append(f"{service_code} @ {name}: {problem}")
                continue
            click.echo(
                f"  {service_code} @ {name}: {result.device_count} devices, "
                f"{result.online_count} online, {result.error_count} errors, "
                f"status {result.status}, {result.duration_seconds:.2f} s"
            )
            endpoints = device_service.endpoints_for(tenant_id, service_code)
            for endpoint_id, problem in endpoint_service.connection_problems(endpoints).items():
                click.echo(f"    endpoint #{endpoint_id}: {problem}")
            if result.status == "failed":
                failed.append(f"{service_code} @ {name}: {result.error_message}")
    finally:
        for service_code in {c for _, c in targets}:
            shutdown = getattr(device_service.REGISTRY.get(service_code), "shutdown", None)
            if shutdown is not None:
                shutdown()  # this process is about to exit: close the connections cleanly
    if failed:
        raise click.ClickException(f"{verb.capitalize()} failed: " + "; ".join(failed))


_poll_options = [
    click.option("--tenant", "tenant_ref", help="Only this tenant (name or id)."),
    click.option("--service", help="Only this manufacturer service (e.g. shure)."),
    click.option("--quiet", "-q", is_flag=True, help="Only the summary lines."),
    click.option(
        "--wait",
        type=click.FloatRange(0, 3600),
        default=60.0,
        show_default=True,
        help="Seconds to wait for a poll already running (a worker's); then fail.",
    ),
]


def _with_poll_options(fn):
    for option in reversed(_poll_options):
        fn = option(fn)
    return fn


@devices_cli.command("poll")
@_with_poll_options
def poll_command(tenant_ref: str | None, service: str | None, quiet: bool, wait: float) -> None:
    """Poll every tenant's receivers once and apply what changed."""
    _run_polls(tenant_ref, service, "poll", quiet, wait)


@devices_cli.command("sync")
@_with_poll_options
def sync_command(tenant_ref: str | None, service: str | None, quiet: bool, wait: float) -> None:
    """Sync devices now: discover new ones, mark online/offline, record changes."""
    _run_polls(tenant_ref, service, "sync", quiet, wait)


# ---------------------------------------------------------------- endpoints


@endpoints_cli.command("add")
@click.argument("address")
@click.option("--tenant", "tenant_ref", required=True, help="Tenant name or id.")
@click.option("--location", "location_ref", help="Location name or id.")
@click.option("--service", default="shure", show_default=True)
def endpoints_add(address: str, tenant_ref: str, location_ref: str | None, service: str) -> None:
    """Add a receiver address, HOST[:PORT] (port 2202 when not given), inside
    DEVICES_ALLOWED_NETWORKS."""
    code = _service_code(service)
    tenant = _tenant(tenant_ref)
    try:
        host, port = endpoint_service.parse_address(address)
        location = (
            endpoint_service.resolve_location(tenant.id, location_ref) if location_ref else None
        )
        endpoint, created = endpoint_service.upsert_endpoint(
            tenant.id, host, port, service_code=code, location_id=location.id if location else None
        )
    except (ValueError, LookupError) as exc:
        db.session.rollback()
        raise click.ClickException(str(exc)) from None
    db.session.commit()
    host = endpoint.host
    where = f" at {location.name!r}" if location else ""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    verb = "Added" if created else "Updated"
    click.echo(f"{verb} {code} endpoint #{endpoint.id} {shown}{where} for tenant {tenant.name!r}.")


@endpoints_cli.command("list")
@click.option("--tenant", "tenant_ref", help="Only this tenant (name or id).")
def endpoints_list(tenant_ref: str | None) -> None:
    """List receiver addresses."""
    tenant = _tenant(tenant_ref) if tenant_ref else None
    rows = endpoint_service.list_endpoints(tenant.id if tenant else None)
    if not rows:
        click.echo("No endpoints.")
        return
    click.echo(f"{'#':>4}  {'tenant':<20} {'service':<8} {'address':<28} {'location':<20} state")
    for row in rows:
        tenant_name = db.session.get(Tenant, row.tenant_id).name
        location = db.session.get(Location, row.location_id) if row.location_id else None
        click.echo(
            f"{row.id:>4}  {tenant_name[:20]:<20} {row.manufacturer.code:<8} "
            f"{row.feed_label()[:28]:<28} {(location.name if location else '-')[:20]:<20} "
            f"{'enabled' if row.enabled else 'disabled'}"
        )


# ---------------------------------------------------------------- manufacturers


@manufacturers_cli.command("seed")
def manufacturers_seed() -> None:
    """Add the services this code base provides to the catalog (safe to run again)."""
    added = endpoint_service.seed_catalog()
    db.session.commit()
    click.echo(f"Added {', '.join(added)}." if added else "The catalog has every service.")


@manufacturers_cli.command("add")
@click.argument("code")
@click.argument("name")
def manufacturers_add(code: str, name: str) -> None:
    """Add CODE with its display NAME to the catalog (or rename it); every tenant sees it."""
    try:
        manufacturer, created = endpoint_service.add_manufacturer(code, name)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    db.session.commit()
    verb = "Added" if created else "Renamed"
    click.echo(f"{verb} manufacturer {manufacturer.code!r}: {manufacturer.name}.")


@manufacturers_cli.command("list")
def manufacturers_list() -> None:
    """List the catalog."""
    from sqlalchemy import select

    from models.devices import Manufacturer

    rows = db.session.scalars(select(Manufacturer).order_by(Manufacturer.code)).all()
    if not rows:
        click.echo("The catalog is empty: `flask devices manufacturers seed` adds the services.")
    for row in rows:
        click.echo(f"{row.code:<32} {row.name}")
