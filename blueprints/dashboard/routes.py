from flask import current_app, jsonify
from flask_login import current_user, login_required
from sqlalchemy import text

from blueprints import id_max, int_arg, is_partial_request, render
from blueprints.dashboard import bp
from extensions import db
from models.events import OutboxEvent
from services import feed
from services.live import render_fragment, snapshot


@bp.get("/")
@login_required
def home():
    page_size = current_app.config["FEED_PAGE_SIZE"]
    most = id_max(OutboxEvent.id)  # the feed is the outbox
    before = int_arg("before", maximum=most)
    after = None if before is not None else int_arg("after", maximum=most)
    tenant_id = current_user.tenant_id
    items = feed.latest(tenant_id, before=before, after=after, limit=page_size)
    first_page = before is None and after is None
    newer_after = None
    if not first_page:
        boundary = items[0].id if items else (before - 1 if before else after)
        if feed.latest(tenant_id, after=boundary, limit=1):
            newer_after = boundary
    return render(
        "dashboard/home.html",
        "dashboard/_feed_page.html",
        items=items,
        page_size=page_size,
        first_page=first_page,
        appending=before is not None and is_partial_request(),
        newer_after=newer_after,
        # An older page stays as it is; only the first one takes new events and snapshots.
        live_topics=["feed"] if first_page else [],
    )


@snapshot("feed")
def feed_snapshot(tenant_id: int, user) -> str:
    page_size = current_app.config["FEED_PAGE_SIZE"]
    items = feed.latest(tenant_id, limit=page_size)
    return render_fragment("dashboard/_feed_snapshot.html", items=items, page_size=page_size)


@bp.get("/healthz")
def healthz():
    checks: dict[str, dict] = {}
    try:
        db.session.execute(text("SELECT 1"))
        checks["database"] = {"ok": True, "backend": db.engine.dialect.name}
    except Exception as exc:  # noqa: BLE001 - report, don't raise
        db.session.rollback()
        checks["database"] = {"ok": False, "error": type(exc).__name__}
    state = current_app.extensions["switchboard.tasks"]
    try:
        if state.embedded:
            checks["broker"] = {"ok": True, "backend": "stub", "worker": state.worker is not None}
        else:
            state.broker.client.ping()
            checks["broker"] = {"ok": True, "backend": "redis"}
    except Exception as exc:  # noqa: BLE001
        checks["broker"] = {"ok": False, "error": type(exc).__name__}
    live = current_app.extensions["switchboard.live"]
    try:
        live.bus.ping()
        checks["live_bus"] = {
            "ok": True,
            "backend": "memory" if state.embedded else "redis",
            "subscribers": live.hub.subscriber_count(),
        }
    except Exception as exc:  # noqa: BLE001
        checks["live_bus"] = {"ok": False, "error": type(exc).__name__}
    ok = all(check["ok"] for check in checks.values())
    return jsonify(status="ok" if ok else "degraded", checks=checks), 200 if ok else 503
