"""Metric counters kept in the database, so every web and worker process counts into one place.

Handlers on the spine add to a counter in the same transaction that records the event as
handled, so a redelivered event never counts twice. `/metrics` and the Metrics page read these
rows; gauges (active chats, devices online) are computed from the domain tables instead.
"""

from __future__ import annotations

from datetime import date

from sqlalchemy import Date, Float, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from extensions import db
from models.base import tenant_fk
from models.events import BigId


class MetricCounter(db.Model):
    """One counter value for (metric name, tenant, label set, UTC day).

    `labels` is the canonical `key=value,key=value` form (keys sorted) of a small, bounded
    label set; never ids of chats or messages. Per-day rows give the Metrics page its series;
    Prometheus totals are their sums.
    """

    __tablename__ = "metric_counters"
    __table_args__ = (UniqueConstraint("name", "tenant_id", "labels", "day"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[int] = tenant_fk(index=False)
    labels: Mapped[str] = mapped_column(String(200), default="")
    day: Mapped[date] = mapped_column(Date)
    value: Mapped[float] = mapped_column(Float, default=0.0)

    def label_dict(self) -> dict[str, str]:
        return dict(part.split("=", 1) for part in self.labels.split(",") if part)
