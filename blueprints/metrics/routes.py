"""Routes of the metrics area.

`GET /metrics` is the Prometheus scrape endpoint (no login; bearer token or network allowlist
from config). `GET /metrics/dashboard` is the Metrics page for the signed-in user's tenant.
"""

from flask import Response, abort, current_app, request
from flask_login import current_user, login_required

from blueprints import render
from blueprints.metrics import bp
from services import metrics
from services.live import bus, publish, render_fragment, snapshot, tenant_topic

DEFAULT_ALLOWED_NETWORKS = "127.0.0.1/32,::1/128"


@bp.get("")
def prometheus():
    allowed = metrics.scrape_allowed(
        request.headers.get("Authorization"),
        request.remote_addr,
        current_app.config.get("METRICS_TOKEN"),
        current_app.config.get("METRICS_ALLOWED_NETWORKS", DEFAULT_ALLOWED_NETWORKS),
    )
    if not allowed:
        abort(403)
    body, content_type = metrics.exposition()
    response = Response(body, content_type=content_type)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/dashboard")
@login_required
def index():
    days = metrics.clamp_days(request.args.get("days", metrics.DEFAULT_RANGE))
    data = metrics.dashboard(current_user.tenant_id, days)
    return render("metrics/index.html", **data, live_topics=[metrics_topic_name(days)])


def metrics_topic_name(days: int) -> str:
    return f"metrics:{days}"


def live_html(tenant_id: int, days: int) -> str:
    return render_fragment("metrics/_live.html", **metrics.dashboard(tenant_id, days), oob=True)


def publish_metrics(tenant_id: int) -> None:
    """Replace the counters and charts on the tenant's open Metrics pages, one frame per
    range (each page listens to its own range's topic), under one key so they coalesce."""
    topics = {days: tenant_topic(tenant_id, metrics_topic_name(days)) for days in metrics.RANGES}
    # Only the ranges some open page shows (see services.live.publish_if_watched). This runs
    # after the counters' commit and reads them afresh, and a page registers its topic
    # before its snapshot reads them: one that comes after this check reads at least this.
    try:
        watched, _generation = bus().watched(topics.values())
    except Exception:  # noqa: BLE001 - unsure: render them all
        watched = set(topics.values())
    for days, topic in topics.items():
        if topic in watched:
            publish(topic, "metrics", html=live_html(tenant_id, days))


@snapshot("metrics")
def metrics_snapshot(tenant_id: int, user, days: str = "") -> str:
    return live_html(tenant_id, metrics.clamp_days(days))
