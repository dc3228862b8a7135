"""Domain metrics: counters kept in the database, gauges computed from domain tables.

Handlers (tasks/metrics.py) add to `MetricCounter` rows with an upsert inside the transaction
that records the event as handled, so every web and worker process counts into one place and a
redelivered event never counts twice. `/metrics`, the Metrics page and `flask chats metrics`
all read from here.

Label values are bounded: sender, agent id, device event type, generation outcome, histogram
bucket. Never chat, message or device ids.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select

from events.outbox import before_commit
from events.registry import batch_cache
from extensions import db
from models.metrics import MetricCounter
from services.charts import bar_chart, share_bar

CHATS_CREATED = "chats_created_total"
MESSAGES_CREATED = "messages_created_total"
MESSAGE_LENGTH_BUCKET = "message_length_bucket"
MESSAGE_LENGTH_SUM = "message_length_sum"
MESSAGE_LENGTH_COUNT = "message_length_count"
DEVICE_EVENTS = "device_events_total"
PROJECT_GENERATIONS = "project_generations_total"

# Upper bounds (characters) of the message_length histogram; "+Inf" is implied last.
LENGTH_BUCKETS: tuple[int, ...] = (10, 25, 50, 100, 250, 500, 1000, 2000)
SENDERS = ("visitor", "assistant", "operator", "system")
DEVICE_EVENT_TYPES = (
    "discovered",
    "online",
    "offline",
    "updated",
    "synced",
    "recovered",
    "battery_low",
    "offline_alert",
    "offline_reminder",
)
GENERATION_OUTCOMES = ("completed", "failed")
SENTIMENTS = ("positive", "neutral", "negative")
RANGES = (7, 30, 90)
DEFAULT_RANGE = 30


# ---------------------------------------------------------------- writing


def canonical_labels(labels: dict[str, object] | None) -> str:
    """`k=v,k=v` with keys sorted; the form stored in MetricCounter.labels."""
    if not labels:
        return ""
    parts = []
    for key in sorted(labels):
        value = str(labels[key]).replace(",", "_").replace("=", "_")
        parts.append(f"{key}={value}")
    return ",".join(parts)


def event_day(created_at: datetime | None) -> date:
    if created_at is None:
        return datetime.now(UTC).date()
    if created_at.tzinfo is not None:
        created_at = created_at.astimezone(UTC)
    return created_at.date()


def increment(
    name: str,
    tenant_id: int,
    day: date,
    labels: dict[str, object] | None = None,
    amount: float = 1.0,
) -> None:
    """Add `amount` to one counter row in the current transaction (no commit)."""
    add_counts([(name, tenant_id, day, labels, amount)])


Count = tuple[str, int, date, dict[str, object] | None, float]
_BATCH_SUMS = "metrics"


def add_counts(counts: Iterable[Count]) -> None:
    """Add to many counter rows in the current transaction: one executemany of the upsert.

    Inside a batch of events (one commit's, run in one transaction: tasks/broker.py) the
    amounts are summed per row instead and written once, just before the batch commits: a
    poll's fifty device events are one upsert, not fifty."""
    sums: dict[tuple[str, int, str, date], float] = {}
    for name, tenant_id, day, labels, amount in counts:
        key = (name, tenant_id, canonical_labels(labels), day)
        sums[key] = sums.get(key, 0.0) + float(amount)
    if not sums:
        return
    session = db.session()
    cache = batch_cache(session)
    if cache is None:
        _write_sums(sums)
        return
    pending = cache.get(_BATCH_SUMS)
    if pending is None:
        pending = cache[_BATCH_SUMS] = {}

        def write() -> None:
            # Taken out first: a count added after this ran starts a new sum with a
            # callback of its own.
            _write_sums(cache.pop(_BATCH_SUMS, None) or {})

        # Last before the commit, after the batch's rows and renders: the upsert locks
        # counter rows that every batch of the tenant's events adds to, and taken earlier
        # it made the other worker's batch wait out this one's rendering (at a fleet's
        # sustained load, 16 ms a batch: 1.1 s of lock waits in an 8 s run).
        before_commit(write, session, last=True)
    for key, value in sums.items():
        pending[key] = pending.get(key, 0.0) + value


def _write_sums(sums: dict[tuple[str, int, str, date], float]) -> None:
    if not sums:
        return
    rows = [
        {"name": name, "tenant_id": tenant_id, "labels": labels, "day": day, "value": value}
        for (name, tenant_id, labels, day), value in sums.items()
    ]
    conn = db.session.connection()
    conn.execute(_upsert(conn.dialect.name), rows)


def _upsert(dialect: str):
    """INSERT … ON CONFLICT DO UPDATE value = value + excluded.value, built once per dialect
    (with bound parameters, so SQLAlchemy's statement cache needs no key of the values)."""
    stmt = _UPSERTS.get(dialect)
    if stmt is None:
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:  # pragma: no cover - only PostgreSQL and SQLite are supported
            raise RuntimeError(f"metrics upsert not supported on {dialect}")
        table = MetricCounter.__table__
        stmt = insert(table)
        stmt = stmt.on_conflict_do_update(
            index_elements=["name", "tenant_id", "labels", "day"],
            set_={"value": table.c.value + stmt.excluded.value},
        )
        _UPSERTS[dialect] = stmt
    return stmt


_UPSERTS: dict[str, Any] = {}


def length_bucket_labels(length: int) -> list[str]:
    """The `le` values (cumulative) a message of this length counts into."""
    return [str(b) for b in LENGTH_BUCKETS if length <= b] + ["+Inf"]


def record_message(tenant_id: int, day: date, sender: str, content: str | None) -> None:
    sender = sender if sender in SENDERS else "other"
    length = len(content or "")
    by_sender = {"sender": sender}
    add_counts(
        [
            (MESSAGES_CREATED, tenant_id, day, by_sender, 1.0),
            *(
                (MESSAGE_LENGTH_BUCKET, tenant_id, day, {"le": le, "sender": sender}, 1.0)
                for le in length_bucket_labels(length)
            ),
            (MESSAGE_LENGTH_SUM, tenant_id, day, by_sender, float(length)),
            (MESSAGE_LENGTH_COUNT, tenant_id, day, by_sender, 1.0),
        ]
    )


def record_chat(tenant_id: int, day: date, agent_id: object) -> None:
    agent = str(agent_id) if agent_id not in (None, "") else "none"
    increment(CHATS_CREATED, tenant_id, day, {"agent_id": agent})


def record_device_event(tenant_id: int, day: date, action: str) -> None:
    kind = action if action in DEVICE_EVENT_TYPES else "other"
    increment(DEVICE_EVENTS, tenant_id, day, {"type": kind})


def record_generation(tenant_id: int, day: date, outcome: str) -> None:
    if outcome in GENERATION_OUTCOMES:
        increment(PROJECT_GENERATIONS, tenant_id, day, {"outcome": outcome})


# ---------------------------------------------------------------- reading: Prometheus


def counter_totals() -> dict[str, list[tuple[int, dict[str, str], float]]]:
    """Every counter summed over its days: name -> [(tenant_id, labels, value)]."""
    rows = db.session.execute(
        select(
            MetricCounter.name,
            MetricCounter.tenant_id,
            MetricCounter.labels,
            func.sum(MetricCounter.value),
        )
        .group_by(MetricCounter.name, MetricCounter.tenant_id, MetricCounter.labels)
        .order_by(MetricCounter.name, MetricCounter.tenant_id, MetricCounter.labels)
    ).all()
    out: dict[str, list[tuple[int, dict[str, str], float]]] = defaultdict(list)
    for name, tenant_id, labels, value in rows:
        parsed = dict(part.split("=", 1) for part in (labels or "").split(",") if part)
        out[name].append((tenant_id, parsed, float(value or 0)))
    return out


def active_chats_by_tenant() -> dict[int, int]:
    from models.chats import Chat

    rows = db.session.execute(
        select(Chat.tenant_id, func.count()).where(Chat.status == "active").group_by(Chat.tenant_id)
    ).all()
    return {tenant_id: int(n) for tenant_id, n in rows}


def devices_by_tenant(tenant_id: int | None = None) -> dict[int, tuple[int, int]]:
    """tenant_id -> (online devices, all devices)."""
    from models.devices import Device

    query = select(
        Device.tenant_id,
        func.sum(case((Device.is_online.is_(True), 1), else_=0)),
        func.count(),
    ).group_by(Device.tenant_id)
    if tenant_id is not None:
        query = query.where(Device.tenant_id == tenant_id)
    return {t: (int(on or 0), int(total)) for t, on, total in db.session.execute(query).all()}


class DomainCollector:
    """A prometheus_client collector reading the database at scrape time."""

    def collect(self) -> Iterator:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        totals = counter_totals()

        chats = CounterMetricFamily(
            "chats_created", "Chats started.", labels=["tenant_id", "agent_id"]
        )
        for tenant_id, labels, value in totals.get(CHATS_CREATED, []):
            chats.add_metric([str(tenant_id), labels.get("agent_id", "none")], value)
        yield chats

        messages = CounterMetricFamily(
            "messages_created", "Messages saved.", labels=["sender", "tenant_id"]
        )
        for tenant_id, labels, value in totals.get(MESSAGES_CREATED, []):
            messages.add_metric([labels.get("sender", "other"), str(tenant_id)], value)
        yield messages

        active = GaugeMetricFamily("active_chats", "Chats now active.", labels=["tenant_id"])
        for tenant_id, n in sorted(active_chats_by_tenant().items()):
            active.add_metric([str(tenant_id)], n)
        yield active

        yield _length_histogram(HistogramMetricFamily, totals)

        devices = CounterMetricFamily(
            "device_events", "Device lifecycle events by type.", labels=["tenant_id", "type"]
        )
        for tenant_id, labels, value in totals.get(DEVICE_EVENTS, []):
            devices.add_metric([str(tenant_id), labels.get("type", "other")], value)
        yield devices

        generations = CounterMetricFamily(
            "project_generations",
            "Project generations finished, by outcome.",
            labels=["tenant_id", "outcome"],
        )
        for tenant_id, labels, value in totals.get(PROJECT_GENERATIONS, []):
            generations.add_metric([str(tenant_id), labels.get("outcome", "other")], value)
        yield generations

        online = GaugeMetricFamily("devices_online", "Devices now online.", labels=["tenant_id"])
        known = GaugeMetricFamily("devices", "Devices known.", labels=["tenant_id"])
        ratio = GaugeMetricFamily(
            "device_online_ratio", "Share of devices online (0..1).", labels=["tenant_id"]
        )
        for tenant_id, (on, total) in sorted(devices_by_tenant().items()):
            online.add_metric([str(tenant_id)], on)
            known.add_metric([str(tenant_id)], total)
            ratio.add_metric([str(tenant_id)], on / total if total else 0.0)
        yield online
        yield known
        yield ratio


def _length_histogram(family_cls, totals):
    hist = family_cls(
        "message_length", "Message length in characters.", labels=["sender", "tenant_id"]
    )
    buckets: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    sums: dict[tuple[str, int], float] = defaultdict(float)
    for tenant_id, labels, value in totals.get(MESSAGE_LENGTH_BUCKET, []):
        buckets[(labels.get("sender", "other"), tenant_id)][labels.get("le", "+Inf")] = value
    for tenant_id, labels, value in totals.get(MESSAGE_LENGTH_SUM, []):
        sums[(labels.get("sender", "other"), tenant_id)] = value
    order = [str(b) for b in LENGTH_BUCKETS] + ["+Inf"]
    for key in sorted(buckets):
        counts = buckets[key]
        pairs = [(le, counts.get(le, 0.0)) for le in order]
        hist.add_metric([key[0], str(key[1])], buckets=pairs, sum_value=sums.get(key, 0.0))
    return hist


def exposition() -> tuple[bytes, str]:
    """The Prometheus text of every domain metric, from a registry built for this scrape."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DomainCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST


def scrape_allowed(
    authorization: str | None, remote_addr: str | None, token: str | None, networks: str | None
) -> bool:
    """A matching bearer token, or a client address inside an allowlisted network."""
    if token and authorization and authorization.startswith("Bearer "):
        given = authorization[len("Bearer ") :].strip()
        if hmac.compare_digest(given.encode(), token.encode()):
            return True
    if not remote_addr:
        return False
    try:
        address = ipaddress.ip_address(remote_addr)
    except ValueError:
        return False
    for item in (networks or "").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            if address in ipaddress.ip_network(item, strict=False):
                return True
        except ValueError:
            continue
    return False


# ---------------------------------------------------------------- reading: page and CLI


def clamp_days(value: object) -> int:
    try:
        days = int(str(value))
    except (TypeError, ValueError):
        return DEFAULT_RANGE
    return days if days in RANGES else DEFAULT_RANGE


def today() -> date:
    return datetime.now(UTC).date()


def daily_series(name: str, tenant_id: int, start: date, end: date, label: str | None = None):
    """{day: {label value: total}} for one counter over [start, end]."""
    rows = db.session.execute(
        select(MetricCounter.day, MetricCounter.labels, func.sum(MetricCounter.value))
        .where(
            MetricCounter.name == name,
            MetricCounter.tenant_id == tenant_id,
            MetricCounter.day >= start,
            MetricCounter.day <= end,
        )
        .group_by(MetricCounter.day, MetricCounter.labels)
    ).all()
    out: dict[date, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for day, labels, value in rows:
        parsed = dict(part.split("=", 1) for part in (labels or "").split(",") if part)
        key = parsed.get(label, "") if label else ""
        out[day][key] += float(value or 0)
    return out


def sentiment_mix(tenant_id: int, start: date, end: date) -> dict[str, int]:
    from models.chats import Message

    since = datetime.combine(start, datetime.min.time(), tzinfo=UTC)
    until = datetime.combine(end + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    rows = db.session.execute(
        select(Message.sentiment_label, func.count())
        .where(
            Message.tenant_id == tenant_id,
            Message.created_at >= since,
            Message.created_at < until,
            Message.sentiment_label.is_not(None),
        )
        .group_by(Message.sentiment_label)
    ).all()
    return {label: int(n) for label, n in rows}


@dataclass
class PeriodRow:
    start: date
    chats: int = 0
    messages: int = 0
    visitor: int = 0
    assistant: int = 0
    negative: int = 0


def period_table(tenant_id: int, days: int, period: str = "daily") -> list[PeriodRow]:
    """Chats and messages per day (or ISO week, Monday start) over the last `days` days."""
    from models.chats import Message

    end = today()
    start = end - timedelta(days=days - 1)

    def key(day: date) -> date:
        return day - timedelta(days=day.weekday()) if period == "weekly" else day

    rows: dict[date, PeriodRow] = {}
    day = start
    while day <= end:
        rows.setdefault(key(day), PeriodRow(start=key(day)))
        day += timedelta(days=1)
    for day, values in daily_series(CHATS_CREATED, tenant_id, start, end).items():
        rows[key(day)].chats += int(sum(values.values()))
    for day, values in daily_series(MESSAGES_CREATED, tenant_id, start, end, "sender").items():
        row = rows[key(day)]
        row.messages += int(sum(values.values()))
        row.visitor += int(values.get("visitor", 0))
        row.assistant += int(values.get("assistant", 0))
    since = datetime.combine(start, datetime.min.time(), tzinfo=UTC)
    negatives = db.session.scalars(
        select(Message.created_at).where(
            Message.tenant_id == tenant_id,
            Message.sentiment_label == "negative",
            Message.created_at >= since,
        )
    ).all()
    for created_at in negatives:
        day = event_day(created_at)
        if key(day) in rows:
            rows[key(day)].negative += 1
    return [rows[k] for k in sorted(rows)]


def generations_by_outcome(tenant_id: int, start: date, end: date) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for values in daily_series(PROJECT_GENERATIONS, tenant_id, start, end, "outcome").values():
        for outcome, value in values.items():
            totals[outcome] += int(value)
    return dict(totals)


# ---------------------------------------------------------------- the Metrics page


PALETTE = {"chats": "#3b6fd8", "messages": "#1f9d74"}


def dashboard(tenant_id: int, days: int) -> dict[str, object]:
    """Everything the Metrics page shows for one tenant over the last `days` days."""
    end = today()
    start = end - timedelta(days=days - 1)
    axis = [start + timedelta(days=i) for i in range(days)]
    chats = daily_series(CHATS_CREATED, tenant_id, start, end)
    messages = daily_series(MESSAGES_CREATED, tenant_id, start, end)
    chat_values = [sum(chats.get(d, {}).values()) for d in axis]
    message_values = [sum(messages.get(d, {}).values()) for d in axis]
    mix = sentiment_mix(tenant_id, start, end)
    on, total = devices_by_tenant(tenant_id).get(tenant_id, (0, 0))
    outcomes = generations_by_outcome(tenant_id, start, end)
    ordered_mix = [(s, mix.get(s, 0)) for s in SENTIMENTS] + [
        (s, n) for s, n in sorted(mix.items()) if s not in SENTIMENTS
    ]
    return {
        "days": days,
        "ranges": RANGES,
        "start": start,
        "end": end,
        "totals": {
            "chats": int(sum(chat_values)),
            "messages": int(sum(message_values)),
            "devices_online": on,
            "devices": total,
            "active_chats": active_chats_by_tenant().get(tenant_id, 0),
        },
        "chats_chart": bar_chart(axis, chat_values, PALETTE["chats"], "Chats", "chats"),
        "messages_chart": bar_chart(
            axis, message_values, PALETTE["messages"], "Messages", "messages"
        ),
        "sentiment_chart": share_bar(ordered_mix, "Analysed messages"),
        "devices_chart": share_bar([("online", on), ("offline", total - on)], "Devices"),
        "generations_chart": share_bar(
            [(o, outcomes.get(o, 0)) for o in GENERATION_OUTCOMES], "Finished generations"
        ),
    }
