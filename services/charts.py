"""The console's SVG charts: this module does the arithmetic (scales, ticks, positions) and
templates/_charts.html draws it, autoescaped, so no chart is HTML built from strings.

No JavaScript: hover values are SVG <title> elements (screen readers read them too), and only
presentation attributes are used, so the Content-Security-Policy needs no inline styles.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime

from flask import current_app
from markupsafe import Markup

WIDTH = 640
HEIGHT = 200
# Room on the left and right for tick labels, above for the legend, below for the dates.
LEFT, RIGHT, TOP, BOTTOM = 44, 44, 28, 28
# A line chart marks at most this many points per series for hovering; a week of readings
# can be 2000 points, and a title for each would only make the page heavy.
MAX_MARKED_POINTS = 240

SHARE_COLORS = {
    "positive": "#1f9d74",
    "neutral": "#98a2b3",
    "negative": "#d64545",
    "completed": "#1f9d74",
    "failed": "#d64545",
    "online": "#1f9d74",
    "offline": "#d0d5dd",
}


def as_utc(moment: datetime | None) -> datetime | None:
    """`moment` as an aware UTC datetime (a naive one is taken to be UTC already)."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class Series:
    name: str
    points: list[tuple[datetime, float]]
    color: str
    max_value: float


@dataclass(frozen=True)
class Tick:
    y: float
    label: str


@dataclass(frozen=True)
class Mark:
    """A bar or a point with its hover text."""

    x: float
    y: float
    width: float
    height: float
    title: str


@dataclass(frozen=True)
class Line:
    name: str
    color: str
    coords: str
    marks: list[Mark]
    legend_x: float
    legend: str


@dataclass(frozen=True)
class Share:
    name: str
    color: str
    x: float
    width: float
    legend_x: float
    label: str


def number(value: float) -> str:
    """A value as the charts write it: whole numbers without a decimal point."""
    return f"{value:g}" if value != int(value) else str(int(value))


def nice_ticks(top: float, count: int = 4, whole: bool = False) -> list[float]:
    """0 up to a round number at or above `top`, in `count` or fewer equal round steps
    (whole-number steps with `whole`: counts have no quarter chats)."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if step >= 1 or whole:
        step = math.ceil(step)
    steps = math.ceil(top / step - 1e-9)
    return [round(i * step, 6) for i in range(steps + 1)]


def _render(macro: str, **arguments) -> Markup:
    module = current_app.jinja_env.get_template("_charts.html").module
    return Markup(getattr(module, macro)(**arguments))


def _y(value: float, top: float) -> float:
    inner = HEIGHT - TOP - BOTTOM
    share = max(0.0, min(value / top, 1.0)) if top else 0.0
    return TOP + inner * (1 - share)


def bar_chart(days: list[date], values: list[float], color: str, title: str, unit: str) -> Markup:
    """One bar per day, a y axis with round ticks, and each day's value on hover."""
    if not days or not any(values):
        return _render("empty", message=f"No {title.lower()} in this range yet.")
    ticks = nice_ticks(max(values), whole=True)
    top = ticks[-1]
    inner_w = WIDTH - LEFT - RIGHT
    slot = inner_w / len(days)
    bar_w = max(slot * 0.7, 1.0)
    bars = []
    for index, (day, value) in enumerate(zip(days, values, strict=True)):
        y = _y(value, top)
        bars.append(
            Mark(
                x=LEFT + index * slot + (slot - bar_w) / 2,
                y=y,
                width=bar_w,
                height=HEIGHT - BOTTOM - y,
                title=f"{day.isoformat()}: {number(value)} {unit}",
            )
        )
    return _render(
        "bar_chart",
        label=f"{title} per day",
        legend=f"{title}: {number(sum(values))} in {len(days)} days, at most {number(max(values))}"
        " a day",
        color=color,
        bars=bars,
        gap=(slot - bar_w) / 2,
        ticks=[Tick(_y(t, top), number(t)) for t in ticks],
        first=days[0].isoformat(),
        last=days[-1].isoformat(),
        size=_size(),
    )


def line_chart(series: list[Series], width: int = WIDTH, height: int = HEIGHT) -> Markup:
    """Lines over a shared time axis, each scaled to its own maximum. The first series' scale
    is on the left axis and the second's on the right, in their colours."""
    stamps = [t for s in series for t, _ in s.points]
    if not stamps:
        return _render("empty", message="No readings yet.")
    start, end = min(stamps), max(stamps)
    span = max((end - start).total_seconds(), 1.0)
    inner_w = WIDTH - LEFT - RIGHT
    lines = []
    axes = []
    for index, s in enumerate(series):
        if index < 2:
            # Each line is scaled to its own fixed maximum, so its ticks stop there.
            ticks = [t for t in nice_ticks(s.max_value) if t < s.max_value] + [s.max_value]
            axes.append(
                {
                    "side": "left" if index == 0 else "right",
                    "color": s.color,
                    "ticks": [Tick(_y(t, s.max_value), number(t)) for t in ticks],
                }
            )
        if not s.points:
            continue

        def x(t: datetime, start=start) -> float:
            return LEFT + inner_w * (t - start).total_seconds() / span

        every = max(1, math.ceil(len(s.points) / MAX_MARKED_POINTS))
        marks = [
            Mark(
                x=x(t),
                y=_y(v, s.max_value),
                width=0,
                height=0,
                title=f"{as_utc(t):%Y-%m-%d %H:%M} UTC: {number(v)}",
            )
            for t, v in s.points[::every]
        ]
        lines.append(
            Line(
                name=s.name,
                color=s.color,
                coords=" ".join(f"{x(t):.1f},{_y(v, s.max_value):.1f}" for t, v in s.points),
                marks=marks,
                legend_x=LEFT + index * 260,
                legend=f"{s.name} (max {number(s.max_value)})",
            )
        )
    return _render(
        "line_chart",
        label=", ".join(s.name for s in series) + " over time",
        lines=lines,
        axes=axes,
        first=f"{as_utc(start):%Y-%m-%d %H:%M} UTC",
        last=f"{as_utc(end):%Y-%m-%d %H:%M} UTC",
        size=_size(),
    )


def share_bar(parts: Iterable[tuple[str, float]], title: str) -> Markup:
    """One horizontal bar split into shares, with a legend underneath."""
    items = [(name, value) for name, value in parts if value > 0]
    total = sum(value for _, value in items)
    if not total:
        return _render("empty", message=f"No {title.lower()} yet.")
    pad = 8
    inner_w = WIDTH - 2 * pad
    shares = []
    x = float(pad)
    for index, (name, value) in enumerate(items):
        width = inner_w * value / total
        shares.append(
            Share(
                name=name,
                color=SHARE_COLORS.get(name, "#667085"),
                x=x,
                width=width,
                legend_x=pad + index * 170,
                label=f"{name} {number(value)} ({100 * value / total:.0f}%)",
            )
        )
        x += width
    return _render("share_bar", label=title, shares=shares, pad=pad, width=WIDTH)


def _size() -> dict[str, int]:
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "left": LEFT,
        "right": WIDTH - RIGHT,
        "top": TOP,
        "bottom": HEIGHT - BOTTOM,
    }
