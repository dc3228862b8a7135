"""Routes of the metrics area.

`GET /metrics` is the Prometheus scrape endpoint (no login; bearer token or network allowlist
from config). `GET /metrics/dashboard` is the Metrics page for the signed-in user's tenant.
"""

from flask import Response, abort, current_app, request
from flask_login import current_user, login_required

from blueprints import render
from blueprints.metrics import bp
from services import metrics

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
    return render("metrics/index.html", **data)
