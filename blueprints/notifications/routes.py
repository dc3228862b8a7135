from flask import current_app
from flask_login import current_user, login_required
from sqlalchemy import select

from blueprints import keyset_page, render
from blueprints.notifications import bp
from models.notifications import Notification


@bp.get("/")
@login_required
def index():
    stmt = select(Notification).where(
        Notification.recipient_id == current_user.id,
        Notification.tenant_id == current_user.tenant_id,
    )
    rows, next_before = keyset_page(stmt, Notification.id, current_app.config["LIST_PAGE_SIZE"])
    return render("notifications/index.html", notifications=rows, next_before=next_before)
