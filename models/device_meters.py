"""Per-minute meter history of a transmitter: what its battery, RF and audio did, downsampled.

Meters arrive many times a second; a row per sample would be millions a day. The owning
process folds a minute of samples into one row (min and max of each), which is enough to
answer "which transmitter faded during the second set" for DEVICES_METER_HISTORY_DAYS.
"""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from sqlalchemy import Float, ForeignKey, Index, Integer, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from extensions import db
from models.base import UTCDateTime, tenant_fk


class DeviceMeterMinute(db.Model):
    __tablename__ = "device_meter_minutes"
    __table_args__ = (
        # One row per device and minute: a second writer (an ownership hand-over) merges.
        UniqueConstraint("device_id", "minute", name="uq_device_meter_minutes_device_minute"),
        # Pruning walks by time across every device.
        Index("ix_device_meter_minutes_minute", "minute"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk(index=False)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    minute: Mapped[datetime] = mapped_column(UTCDateTime())
    samples: Mapped[int] = mapped_column(Integer, default=0)
    rf_min: Mapped[Optional[float]] = mapped_column(Float)  # dBm
    rf_max: Mapped[Optional[float]] = mapped_column(Float)
    audio_min: Mapped[Optional[float]] = mapped_column(Float)  # dBFS
    audio_max: Mapped[Optional[float]] = mapped_column(Float)
    battery_min: Mapped[Optional[int]] = mapped_column(Integer)  # bars (0-5)
    battery_max: Mapped[Optional[int]] = mapped_column(Integer)
