from flask import current_app
from flask_login import login_required
from sqlalchemy import select

from blueprints import get_owned_or_404, keyset_page, render, scoped
from blueprints.devices import bp
from extensions import db
from models.devices import ActivityLog, Device


@bp.get("/")
@login_required
def index():
    stmt = scoped(select(Device), Device)
    devices, next_before = keyset_page(stmt, Device.id, current_app.config["LIST_PAGE_SIZE"])
    return render(
        "devices/index.html", "devices/_rows.html", devices=devices, next_before=next_before
    )


@bp.get("/<int:device_id>")
@login_required
def detail(device_id: int):
    device = get_owned_or_404(Device, device_id)
    activity = db.session.scalars(
        select(ActivityLog)
        .where(ActivityLog.device_id == device.id, ActivityLog.tenant_id == device.tenant_id)
        .order_by(ActivityLog.created_at.desc(), ActivityLog.id.desc())
        .limit(50)
    ).all()
    return render("devices/detail.html", device=device, activity=activity)
