"""Device endpoints: the receiver addresses a tenant's manufacturer services connect to."""

from __future__ import annotations

from sqlalchemy import select

from extensions import db
from models.accounts import Tenant
from models.devices import DeviceEndpoint, Location, Manufacturer
from services.manufacturers.shure_protocol import DEFAULT_PORT

SERVICE_NAMES = {"shure": "Shure"}


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
    """Add (or re-enable and update) an endpoint; returns (endpoint, created). Flushes."""
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
