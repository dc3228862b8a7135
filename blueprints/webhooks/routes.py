"""Webhook endpoints of the tenant: list, create, edit, rotate the secret, see deliveries and
re-send one. Admins only; another tenant's endpoint is a 404."""

from __future__ import annotations

from flask import abort, flash, redirect, request, url_for
from flask_login import current_user
from sqlalchemy import func, select

from blueprints import admin_required, get_owned_or_404, keyset_page, render, scoped
from blueprints.webhooks import bp
from extensions import db
from models.webhooks import WebhookDelivery, WebhookEndpoint
from services import webhooks as svc
from services.live import render_fragment, snapshot, tenant_topic

DELIVERIES_PER_PAGE = 25
MAX_ENDPOINTS = 50


def _endpoints() -> list[WebhookEndpoint]:
    return list(
        db.session.scalars(
            scoped(select(WebhookEndpoint), WebhookEndpoint).order_by(WebhookEndpoint.id)
        )
    )


def _form_values() -> tuple[dict[str, str], dict[str, str], str | None, list[str] | None]:
    """(raw values, errors, url, topics) from the posted form."""
    raw = {
        "url": request.form.get("url", ""),
        "topics": request.form.get("topics", ""),
    }
    errors: dict[str, str] = {}
    url = topics = None
    try:
        url = svc.validate_url(raw["url"])
    except ValueError as exc:
        errors["url"] = str(exc)
    try:
        topics = svc.parse_topics(raw["topics"])
    except ValueError as exc:
        errors["topics"] = str(exc)
    return raw, errors, url, topics


@bp.get("/")
@admin_required
def index():
    return render("webhooks/index.html", endpoints=_endpoints(), values={}, errors={})


@bp.post("/")
@admin_required
def create():
    raw, errors, url, topics = _form_values()
    endpoints = _endpoints()
    if len(endpoints) >= MAX_ENDPOINTS:
        errors["url"] = f"A tenant can have at most {MAX_ENDPOINTS} endpoints."
    if errors:
        page = render("webhooks/index.html", endpoints=endpoints, values=raw, errors=errors)
        page.status_code = 422
        return page
    endpoint = WebhookEndpoint(tenant_id=current_user.tenant_id, url=url, topics=topics)
    db.session.add(endpoint)
    db.session.commit()
    flash("Webhook endpoint created. Its signing secret is shown below.", "info")
    return redirect(url_for("webhooks.detail", endpoint_id=endpoint.id), code=303)


def _past_first_page() -> bool:
    return bool(request.args.get("before") or request.args.get("after"))


def _detail_page(endpoint: WebhookEndpoint, values=None, errors=None, status: int = 200):
    stmt = select(WebhookDelivery).where(
        WebhookDelivery.endpoint_id == endpoint.id,
        WebhookDelivery.tenant_id == current_user.tenant_id,
    )
    deliveries, next_before = keyset_page(stmt, WebhookDelivery.id, DELIVERIES_PER_PAGE)
    response = render(
        "webhooks/detail.html",
        partial="webhooks/_deliveries.html",
        webhook=endpoint,
        deliveries=deliveries,
        next_before=next_before,
        values=values or {"url": endpoint.url, "topics": ", ".join(endpoint.topics or [])},
        errors=errors or {},
        # The first page takes each new attempt live; an older page stays as it is.
        live_topics=[] if _past_first_page() else [deliveries_topic_name(endpoint.id)],
    )
    response.status_code = status
    return response


@bp.get("/<int:endpoint_id>")
@admin_required
def detail(endpoint_id: int):
    return _detail_page(get_owned_or_404(WebhookEndpoint, endpoint_id))


@bp.post("/<int:endpoint_id>")
@admin_required
def update(endpoint_id: int):
    endpoint = get_owned_or_404(WebhookEndpoint, endpoint_id)
    raw, errors, url, topics = _form_values()
    if errors:
        return _detail_page(endpoint, values=raw, errors=errors, status=422)
    endpoint.url = url
    endpoint.topics = topics
    active = request.form.get("is_active") in ("1", "on", "true", "y")
    if active and not endpoint.is_active:
        endpoint.consecutive_failures = 0
        endpoint.disabled_reason = None
    endpoint.is_active = active
    db.session.commit()
    flash("Webhook endpoint saved.", "info")
    return redirect(url_for("webhooks.detail", endpoint_id=endpoint.id), code=303)


@bp.post("/<int:endpoint_id>/rotate-secret")
@admin_required
def rotate_secret(endpoint_id: int):
    endpoint = get_owned_or_404(WebhookEndpoint, endpoint_id)
    svc.rotate_secret(endpoint)
    db.session.commit()
    flash("New signing secret issued; update your receiver.", "info")
    return redirect(url_for("webhooks.detail", endpoint_id=endpoint.id), code=303)


def _confirm_delete_page(endpoint: WebhookEndpoint):
    deliveries = db.session.scalar(
        select(func.count())
        .select_from(WebhookDelivery)
        .where(
            WebhookDelivery.endpoint_id == endpoint.id,
            WebhookDelivery.tenant_id == current_user.tenant_id,
        )
    )
    return render("webhooks/delete.html", webhook=endpoint, deliveries=deliveries)


@bp.get("/<int:endpoint_id>/delete")
@admin_required
def confirm_delete(endpoint_id: int):
    return _confirm_delete_page(get_owned_or_404(WebhookEndpoint, endpoint_id))


@bp.post("/<int:endpoint_id>/delete")
@admin_required
def delete(endpoint_id: int):
    endpoint = get_owned_or_404(WebhookEndpoint, endpoint_id)
    if request.form.get("confirm") != "delete":
        # Only the confirmation page's button deletes: anything else gets the question.
        return _confirm_delete_page(endpoint)
    db.session.delete(endpoint)
    db.session.commit()
    flash("Webhook endpoint deleted.", "info")
    return redirect(url_for("webhooks.index"), code=303)


@bp.post("/<int:endpoint_id>/deliveries/<int:delivery_id>/resend")
@admin_required
def resend(endpoint_id: int, delivery_id: int):
    endpoint = get_owned_or_404(WebhookEndpoint, endpoint_id)
    delivery = db.session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.endpoint_id != endpoint.id:
        abort(404)
    refused = svc.request_resend(endpoint, delivery)
    if refused:
        db.session.rollback()
        flash(refused, "error")
    else:
        db.session.commit()
        flash("Delivery queued again.", "info")
    return redirect(url_for("webhooks.detail", endpoint_id=endpoint.id), code=303)


# ---------------------------------------------------------------- live deliveries


def deliveries_topic_name(endpoint_id: int) -> str:
    return f"webhook:{endpoint_id}"


def first_deliveries_html(tenant_id: int, endpoint_id: int) -> str:
    """The deliveries list's first page, to replace the one on an open detail page."""
    endpoint = db.session.scalar(
        select(WebhookEndpoint).where(
            WebhookEndpoint.id == endpoint_id, WebhookEndpoint.tenant_id == tenant_id
        )
    )
    if endpoint is None:
        return ""
    rows = list(
        db.session.scalars(
            select(WebhookDelivery)
            .where(
                WebhookDelivery.endpoint_id == endpoint.id,
                WebhookDelivery.tenant_id == tenant_id,
            )
            .order_by(WebhookDelivery.id.desc())
            .limit(DELIVERIES_PER_PAGE + 1)
        )
    )
    next_before = rows[DELIVERIES_PER_PAGE - 1].id if len(rows) > DELIVERIES_PER_PAGE else None
    return render_fragment(
        "webhooks/_deliveries.html",
        webhook=endpoint,
        deliveries=rows[:DELIVERIES_PER_PAGE],
        next_before=next_before,
        oob=True,
    )


def publish_deliveries(tenant_id: int, endpoint_id: int) -> None:
    """Replace the open detail pages' list after an attempt is recorded. One key per
    endpoint, so a burst of attempts coalesces into the latest list."""
    from services.live import publish

    html = first_deliveries_html(tenant_id, endpoint_id)
    if html:
        topic = tenant_topic(tenant_id, deliveries_topic_name(endpoint_id))
        publish(topic, f"deliveries-{endpoint_id}", html=html)


@snapshot("webhook")
def deliveries_snapshot(tenant_id: int, user, endpoint_id: str = "") -> str:
    if not user.is_admin or not endpoint_id.isdigit():
        return ""
    return first_deliveries_html(tenant_id, int(endpoint_id))
