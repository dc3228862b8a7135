"""Small server-rendered SVG charts (no JavaScript; presentation attributes only, so the
console's Content-Security-Policy needs no inline styles)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from markupsafe import Markup, escape


@dataclass(frozen=True)
class Series:
    name: str
    points: list[tuple[datetime, float]]
    color: str
    max_value: float


def line_chart(series: list[Series], width: int = 640, height: int = 180) -> Markup:
    """Lines over a shared time axis, each scaled to its own maximum (labelled)."""
    stamps = [t for s in series for t, _ in s.points]
    if not stamps:
        return Markup('<p class="empty">No readings yet.</p>')
    start, end = min(stamps), max(stamps)
    span = max((end - start).total_seconds(), 1.0)
    pad = 28
    inner_w, inner_h = width - 2 * pad, height - 2 * pad

    def x(t: datetime) -> float:
        return pad + inner_w * (t - start).total_seconds() / span

    def y(v: float, top: float) -> float:
        return pad + inner_h * (1 - max(0.0, min(v / top if top else 0, 1.0)))

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
        f'aria-label="{escape(", ".join(s.name for s in series))} over time" '
        'xmlns="http://www.w3.org/2000/svg">',
        f'<rect x="{pad}" y="{pad}" width="{inner_w}" height="{inner_h}" fill="#fafbfc" '
        'stroke="#e3e6ec"/>',
    ]
    for index, s in enumerate(series):
        if not s.points:
            continue
        coords = " ".join(f"{x(t):.1f},{y(v, s.max_value):.1f}" for t, v in s.points)
        parts.append(
            f'<polyline points="{coords}" fill="none" stroke="{s.color}" stroke-width="2"/>'
        )
        parts.append(
            f'<text x="{pad + index * 180}" y="{pad - 8}" font-size="12" fill="{s.color}">'
            f"{escape(s.name)} (max {s.max_value:g})</text>"
        )
    parts.append(
        f'<text x="{pad}" y="{height - 8}" font-size="11" fill="#667085">'
        f"{start:%Y-%m-%d %H:%M}</text>"
        f'<text x="{width - pad}" y="{height - 8}" font-size="11" fill="#667085" '
        f'text-anchor="end">{end:%Y-%m-%d %H:%M}</text></svg>'
    )
    return Markup("".join(parts))
