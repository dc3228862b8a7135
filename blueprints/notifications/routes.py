"""Notifications pages: the list with filters, marking read, preferences, the bell snapshot."""

from flask import current_app, flash, redirect, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import select

from blueprints import keyset_page, render, safe_next
from blueprints.notifications import bp
from extensions import db
from models.notifications import Notification, NotificationPreference
from services import notifications as service
from services.live import render_fragment, snapshot


def _types() -> list[tuple[str, str]]:
    return sorted(service.TYPE_LABELS.items(), key=lambda item: item[1])


@bp.get("/")
@login_required
def index():
    unread_only = request.args.get("unread") == "1"
    kind = request.args.get("type", "")
    if kind and kind not in service.TYPE_LABELS:
        kind = ""
    stmt = select(Notification).where(
        Notification.recipient_id == current_user.id,
        Notification.tenant_id == current_user.tenant_id,
    )
    if unread_only:
        stmt = stmt.where(Notification.read_at.is_(None))
    if kind:
        stmt = stmt.where(Notification.type == kind)
    rows, next_before = keyset_page(stmt, Notification.id, current_app.config["LIST_PAGE_SIZE"])
    filter_args = {k: v for k, v in (("unread", "1" if unread_only else ""), ("type", kind)) if v}
    # Only the unfiltered first page takes new rows live: it is what the snapshot renders.
    first_page = not (request.args.get("before") or request.args.get("after"))
    live = first_page and not filter_args
    return render(
        "notifications/index.html",
        notifications=rows,
        next_before=next_before,
        unread_only=unread_only,
        kind=kind,
        types=_types(),
        type_labels=service.TYPE_LABELS,
        filter_args=filter_args,
        has_unread=service.unread_count(current_user.id) > 0,
        live_topics=["user:notifications"] if live else [],
    )


def _back():
    # Back where the click came from, if that is a page of this site.
    target = request.form.get("next") or request.referrer
    return redirect(safe_next(target, url_for("notifications.index")), code=303)


@bp.post("/<int:notification_id>/read")
@login_required
def read_one(notification_id: int):
    if not service.mark_read(current_user, [notification_id]):
        # Not theirs, or already read: nothing to do, and nothing to reveal.
        owned = db.session.scalar(
            select(Notification.id).where(
                Notification.id == notification_id,
                Notification.recipient_id == current_user.id,
            )
        )
        if owned is None:
            return render("error.html", code=404, message="That page does not exist."), 404
    db.session.commit()
    return _back()


@bp.post("/read-all")
@login_required
def read_all():
    changed = service.mark_read(current_user)
    db.session.commit()
    flash(f"Marked {changed} notification{'' if changed == 1 else 's'} read.", "info")
    return redirect(url_for("notifications.index"), code=303)


@bp.route("/preferences", methods=["GET", "POST"])
@login_required
def preferences():
    types = _types()
    if request.method == "POST":
        existing = {
            row.type: row
            for row in db.session.scalars(
                select(NotificationPreference).where(
                    NotificationPreference.user_id == current_user.id
                )
            )
        }
        for value, _label in types:
            in_app = request.form.get(f"in_app:{value}") == "1"
            email = request.form.get(f"email:{value}") == "1"
            row = existing.get(value)
            if in_app and email:
                if row is not None:
                    db.session.delete(row)  # back to the defaults
                continue
            if row is None:
                row = NotificationPreference(user_id=current_user.id, type=value)
                db.session.add(row)
            row.in_app, row.email = in_app, email
        db.session.commit()
        flash("Preferences saved.", "info")
        return redirect(url_for("notifications.preferences"), code=303)
    return render(
        "notifications/preferences.html",
        types=types,
        prefs=service.preferences_for(current_user.id),
        email_enabled=bool(current_app.config.get("SMTP_URL")),
    )


@snapshot("bell")
def bell_snapshot(tenant_id: int, user) -> str:
    return render_fragment(
        "notifications/_bell.html", unread=service.unread_count(user.id), oob=True
    )


@snapshot("notifications")
def list_snapshot(tenant_id: int, user) -> str:
    rows = db.session.scalars(
        select(Notification)
        .where(Notification.recipient_id == user.id, Notification.tenant_id == tenant_id)
        .order_by(Notification.id.desc())
        .limit(current_app.config["LIST_PAGE_SIZE"])
    )
    return render_fragment(
        "notifications/_snapshot.html", notifications=list(rows), type_labels=service.TYPE_LABELS
    )
