"""Devices domain: manufacturers, locations, devices, their activity log and sync runs."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from extensions import db
from models.base import Timestamps, Tracked, UTCDateTime, tenant_fk, utcnow

DEVICE_KINDS = ("receiver", "transmitter")
ACTIVITY_STATUSES = ("success", "warning", "error")


class Manufacturer(Timestamps, db.Model):
    """A manufacturer service (e.g. `shure`, `simulator`); shared by all tenants."""

    __tablename__ = "manufacturers"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(120))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)


class Location(Tracked, Timestamps, db.Model):
    __tablename__ = "locations"
    __entity__ = "location"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk()
    name: Mapped[str] = mapped_column(String(120))
    alert_on_offline: Mapped[bool] = mapped_column(Boolean, default=False)
    maintenance_mode: Mapped[bool] = mapped_column(Boolean, default=False)


class DeviceEndpoint(Tracked, Timestamps, db.Model):
    """A receiver address a manufacturer service connects to (discovery and polling)."""

    __tablename__ = "device_endpoints"
    __entity__ = "device_endpoint"
    __table_args__ = (UniqueConstraint("tenant_id", "manufacturer_id", "host", "port"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk()
    manufacturer_id: Mapped[int] = mapped_column(ForeignKey("manufacturers.id", ondelete="CASCADE"))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer, default=2202)
    location_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("locations.id", ondelete="SET NULL")
    )
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)

    manufacturer: Mapped[Manufacturer] = relationship()

    def feed_label(self) -> str:
        return f"{self.host}:{self.port}"


class Device(Tracked, Timestamps, db.Model):
    __tablename__ = "devices"
    # Record changes are "device_record.*": "device.*" topics are the lifecycle events that
    # manufacturer services emit (discovered, online, offline, updated, synced).
    __entity__ = "device_record"
    # Set by the device.* lifecycle handlers, which those events already describe.
    __event_routine__ = frozenset(
        {
            "is_online",
            "last_seen",
            "missed_polls",
            "state",
            "offline_alerted_at",
            "offline_reminded_at",
            "state_version",
            "flap_count",
            "back_online_at",
        }
    )
    # api_device_id is unique per manufacturer *within a tenant*: two tenants may own
    # receivers that report the same serial-style id, and neither may see the other's.
    __table_args__ = (
        UniqueConstraint("tenant_id", "manufacturer_id", "api_device_id"),
        CheckConstraint("kind IN ('receiver', 'transmitter')", name="kind_valid"),
        Index("ix_devices_tenant_location_name", "tenant_id", "location_id", "name", "id"),
        Index("ix_devices_tenant_online", "tenant_id", "is_online"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk(index=False)
    manufacturer_id: Mapped[int] = mapped_column(
        ForeignKey("manufacturers.id", ondelete="RESTRICT"), index=True
    )
    api_device_id: Mapped[str] = mapped_column(String(120))
    kind: Mapped[str] = mapped_column(String(16), default="receiver")
    name: Mapped[str] = mapped_column(String(120))
    model: Mapped[str] = mapped_column(String(120), default="")
    ip_address: Mapped[Optional[str]] = mapped_column(String(64))
    port: Mapped[Optional[int]] = mapped_column(Integer)
    firmware: Mapped[str] = mapped_column(String(64), default="")
    location_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("locations.id", ondelete="SET NULL"), index=True
    )
    is_online: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    maintenance_mode: Mapped[bool] = mapped_column(Boolean, default=False)
    missed_polls: Mapped[int] = mapped_column(Integer, default=0)
    # When the current outage was alerted and last reminded (None while online).
    offline_alerted_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    offline_reminded_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    # An alerted outage stays open until the device has answered for
    # DEVICES_RECOVERY_CONFIRM_SECONDS (from back_online_at); each drop meanwhile is a flap
    # of the same outage, counted here rather than alerted again.
    back_online_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    flap_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Battery bars / run time, RF and audio levels, frequency, channel name.
    state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Bumped by the poll in the transaction that applies what a receiver reported (fields,
    # readings, online flag) and carried by the device.* events it emits, so a handler can
    # tell an event older than the row (delivered late or again) and leave the row alone.
    state_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    manufacturer: Mapped[Manufacturer] = relationship()
    location: Mapped[Optional[Location]] = relationship()

    @property
    def availability(self) -> str:
        """What the card says: "online"; "pending" (missing polls, not yet offline);
        "tx_off" (its receiver answers and reports no transmitter); "unreachable" (a
        transmitter whose receiver cannot be reached); "offline" (a receiver that cannot)."""
        if self.is_online:
            if self.kind == "transmitter" and (self.state or {}).get("tx_on") is False:
                return "tx_off"
            return "pending" if self.missed_polls else "online"
        return "unreachable" if self.kind == "transmitter" else "offline"


class MaintenanceWindow(db.Model):
    """A scheduled time without alerts: for the tenant's devices at one location, one device,
    or (neither given) all of them. Besides the manual flags on devices and locations."""

    __tablename__ = "maintenance_windows"
    __table_args__ = (
        CheckConstraint("ends_at > starts_at", name="ends_after_start"),
        Index("ix_maintenance_windows_tenant_ends", "tenant_id", "ends_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk(index=False)
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ends_at: Mapped[datetime] = mapped_column(UTCDateTime())
    location_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("locations.id", ondelete="CASCADE")
    )
    device_id: Mapped[Optional[int]] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    note: Mapped[str] = mapped_column(String(200), default="")

    location: Mapped[Optional[Location]] = relationship()
    device: Mapped[Optional[Device]] = relationship()


class DiscoveredDevice(db.Model):
    """A device a poll found that the tenant does not have, while auto-provisioning is off:
    logged once when first found, listed until an admin adds it (or it is added otherwise)."""

    __tablename__ = "discovered_devices"
    __table_args__ = (UniqueConstraint("tenant_id", "manufacturer_id", "api_device_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk(index=False)
    manufacturer_id: Mapped[int] = mapped_column(ForeignKey("manufacturers.id", ondelete="CASCADE"))
    api_device_id: Mapped[str] = mapped_column(String(120))
    kind: Mapped[str] = mapped_column(String(16), default="receiver")
    name: Mapped[str] = mapped_column(String(120), default="")
    model: Mapped[str] = mapped_column(String(120), default="")
    ip_address: Mapped[Optional[str]] = mapped_column(String(64))
    port: Mapped[Optional[int]] = mapped_column(Integer)
    # The report as found (firmware, location, state), for the device an admin adds.
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    manufacturer: Mapped[Manufacturer] = relationship()


class DeviceReading(db.Model):
    """A sample of a device's battery, RF and audio levels, for its charts."""

    __tablename__ = "device_readings"
    __table_args__ = (Index("ix_device_readings_device_at", "device_id", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk(index=False)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    battery_bars: Mapped[Optional[int]] = mapped_column(Integer)
    battery_minutes: Mapped[Optional[int]] = mapped_column(Integer)
    rf_level: Mapped[Optional[float]] = mapped_column(Float)
    audio_level: Mapped[Optional[float]] = mapped_column(Float)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ActivityLog(db.Model):
    """What happened to a device or a service, newest first on every page that shows it."""

    __tablename__ = "activity_logs"
    __table_args__ = (
        CheckConstraint("status IN ('success', 'warning', 'error')", name="status_valid"),
        # Every list (page, API, device page) is newest first by id with a keyset cursor on
        # id, optionally narrowed by type, status or device: one index per narrowing, each
        # ending in id, so a page is an index range scan however deep it is.
        Index("ix_activity_logs_tenant_id", "tenant_id", "id"),
        Index("ix_activity_logs_tenant_type_id", "tenant_id", "activity_type", "id"),
        Index("ix_activity_logs_tenant_status_id", "tenant_id", "status", "id"),
        Index("ix_activity_logs_device_id", "device_id", "id"),
        # Date ranges (metrics by day).
        Index("ix_activity_logs_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk(index=False)
    activity_type: Mapped[str] = mapped_column(String(48))
    operation: Mapped[str] = mapped_column(String(48), default="")
    status: Mapped[str] = mapped_column(String(16), default="success")
    summary: Mapped[str] = mapped_column(String(500))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    device_id: Mapped[Optional[int]] = mapped_column(ForeignKey("devices.id", ondelete="SET NULL"))
    service_code: Mapped[Optional[str]] = mapped_column(String(32), index=True)
    event_id: Mapped[Optional[int]] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    device: Mapped[Optional[Device]] = relationship()


class ServiceSyncLog(db.Model):
    """One sync run of a manufacturer service for a tenant, written from start to finish."""

    __tablename__ = "service_sync_logs"
    __table_args__ = (
        CheckConstraint(
            "status IN ('running', 'success', 'partial', 'failed')", name="status_valid"
        ),
        Index("ix_service_sync_logs_tenant_started", "tenant_id", "started_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk(index=False)
    service_code: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="running")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    device_count: Mapped[int] = mapped_column(Integer, default=0)
    online_count: Mapped[int] = mapped_column(Integer, default=0)
    error_count: Mapped[int] = mapped_column(Integer, default=0)
    duration_seconds: Mapped[Optional[float]] = mapped_column(Float)
    error_message: Mapped[Optional[str]] = mapped_column(Text)
