"""Device endpoints: the receiver addresses a tenant's manufacturer services connect to, and
the manufacturer catalog they belong to.

The catalog is global and read-only for tenants: it holds the services this code base
provides (SERVICE_NAMES, seeded where needed) and whatever an operator adds with
`flask devices manufacturers add`. An address is checked against the device network policy
(services/netpolicy.py) when it is saved, and again by the poller each time it connects.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from flask import current_app
from sqlalchemy import select

from extensions import db
from models.accounts import Tenant
from models.devices import DeviceEndpoint, Location, Manufacturer
from services import netpolicy
from services.manufacturers.shure_protocol import DEFAULT_PORT

# The manufacturer services this code base provides (the simulator speaks Shure's protocol
# and registers its receivers as "shure" endpoints).
SERVICE_NAMES = {"shure": "Shure"}

_CODE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def manufacturer_for(code: str, *, create: bool = True) -> Manufacturer:
    """The Manufacturer row of a service code, created when missing (flushes)."""
    found = db.session.scalar(select(Manufacturer).where(Manufacturer.code == code))
    if found is None:
        if not create:
            raise LookupError(f"No manufacturer {code!r}.")
        found = Manufacturer(code=code, name=SERVICE_NAMES.get(code, code.capitalize()))
        db.session.add(found)
        db.session.flush()
    return found


def seed_catalog() -> list[str]:
    """Add the code base's services missing from the catalog; their codes (flushes)."""
    have = set(db.session.scalars(select(Manufacturer.code)))
    added = [code for code in SERVICE_NAMES if code not in have]
    for code in added:
        manufacturer_for(code)
    return added


def add_manufacturer(code: str, name: str) -> tuple[Manufacturer, bool]:
    """Add a catalog entry, or rename the one with this code; (row, created). Flushes."""
    code, name = code.strip().lower(), name.strip()
    if not _CODE.match(code):
        raise ValueError(
            f"A code is 1-32 lower-case letters, digits, '-' or '_', starting with a letter; "
            f"got {code[:40]!r}."
        )
    if not name or len(name) > 120:
        raise ValueError("A name is 1-120 characters.")
    found = db.session.scalar(select(Manufacturer).where(Manufacturer.code == code))
    if found is not None:
        found.name = name
        db.session.flush()
        return found, False
    found = Manufacturer(code=code, name=name)
    db.session.add(found)
    db.session.flush()
    return found, True


def checked_address(host: str, port: int | None, config: Mapping[str, Any] | None = None) -> str:
    """The host as it is stored (lower case; an IP address in its usual form), once its syntax,
    the port and every address it resolves to pass the device network policy; ValueError
    with a message for a form or the CLI otherwise."""
    if port is None or not 0 < int(port) < 65536:
        raise ValueError("The port must be a number between 1 and 65535.")
    name = netpolicy.normalise_host(host)
    literal = netpolicy.literal_address(name)
    stored = str(literal) if literal is not None else name
    checker = netpolicy.device_checker(config if config is not None else current_app.config)
    netpolicy.checked_addresses(stored, int(port), checker)
    return stored


def connection_problems(endpoints: Iterable[DeviceEndpoint]) -> dict[int, str]:
    """Why this process's poller cannot talk to each endpoint right now (refused by the
    policy, lookup or connect errors), by endpoint id; only endpoints it has tried."""
    from services.devices import REGISTRY

    problems: dict[int, str] = {}
    for endpoint in endpoints:
        service = REGISTRY.get(endpoint.manufacturer.code)
        problem_of = getattr(service, "connection_problem", None)
        problem = problem_of(endpoint.host, endpoint.port) if problem_of else None
        if problem:
            problems[endpoint.id] = problem
    return problems


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port` -> (host, port); ValueError when malformed."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""  # a bare name or a bare IPv6 address
    if not host:
        raise ValueError(f"No host in {text!r}.")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"Bad port in {text!r}.")
    return host, int(port_text)


def resolve_tenant(ref: str) -> Tenant:
    """A tenant by id or exact name; LookupError when there is none."""
    tenant = db.session.get(Tenant, int(ref)) if ref.strip().isdigit() else None
    if tenant is None:
        tenant = db.session.scalar(select(Tenant).where(Tenant.name == ref.strip()))
    if tenant is None:
        raise LookupError(f"No tenant {ref!r}.")
    return tenant


def resolve_location(tenant_id: int, ref: str) -> Location:
    """One of the tenant's locations by id or exact name; LookupError when there is none."""
    location = None
    if ref.strip().isdigit():
        location = db.session.get(Location, int(ref))
        if location is not None and location.tenant_id != tenant_id:
            location = None
    if location is None:
        location = db.session.scalar(
            select(Location).where(Location.tenant_id == tenant_id, Location.name == ref.strip())
        )
    if location is None:
        names = db.session.scalars(
            select(Location.name).where(Location.tenant_id == tenant_id).order_by(Location.name)
        ).all()
        have = f" (have: {', '.join(names)})" if names else " (the tenant has none)"
        raise LookupError(f"No location {ref!r}{have}.")
    return location


def upsert_endpoint(
    tenant_id: int,
    host: str,
    port: int,
    *,
    service_code: str = "shure",
    location_id: int | None = None,
) -> tuple[DeviceEndpoint, bool]:
    """Add (or re-enable and update) an endpoint; returns (endpoint, created). Flushes.

    ValueError when the address is refused by the device network policy."""
    host = checked_address(host, port)
    manufacturer = manufacturer_for(service_code)
    endpoint = db.session.scalar(
        select(DeviceEndpoint).where(
            DeviceEndpoint.tenant_id == tenant_id,
            DeviceEndpoint.manufacturer_id == manufacturer.id,
            DeviceEndpoint.host == host,
            DeviceEndpoint.port == port,
        )
    )
    created = endpoint is None
    if created:
        endpoint = DeviceEndpoint(
            tenant_id=tenant_id, manufacturer_id=manufacturer.id, host=host, port=port
        )
        db.session.add(endpoint)
    endpoint.enabled = True
    if location_id is not None:
        endpoint.location_id = location_id
    db.session.flush()
    return endpoint, created


def list_endpoints(tenant_id: int | None = None) -> list[DeviceEndpoint]:
    stmt = select(DeviceEndpoint).order_by(DeviceEndpoint.tenant_id, DeviceEndpoint.id)
    if tenant_id is not None:
        stmt = stmt.where(DeviceEndpoint.tenant_id == tenant_id)
    return list(db.session.scalars(stmt))
