"""The audit trail: filters, keyset pages, CSV export. Admins only, scoped to their tenant."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, date, datetime, time, timedelta

from flask import Response, current_app, request, stream_with_context
from flask_login import current_user
from sqlalchemy import select

from blueprints import admin_required, keyset_page, parse_id, render
from blueprints.audit import bp
from events.outbox import emit
from extensions import db
from models.accounts import User
from models.audit import AuditLog

CSV_BATCH = 500


def _date_arg(name: str) -> tuple[date | None, str | None]:
    raw = (request.args.get(name) or "").strip()
    if not raw:
        return None, None
    try:
        return date.fromisoformat(raw), None
    except ValueError:
        return None, f"“{raw}” is not a date (use YYYY-MM-DD)."


def _filtered():
    """The filtered statement, the filter values for the form, and any input errors."""
    tenant_id = current_user.tenant_id
    stmt = select(AuditLog).where(AuditLog.tenant_id == tenant_id)
    errors: list[str] = []
    values = {
        "action": (request.args.get("action") or "").strip()[:48],
        "object_type": (request.args.get("object_type") or "").strip()[:48],
        "actor": (request.args.get("actor") or "").strip(),
        "since": (request.args.get("since") or "").strip(),
        "until": (request.args.get("until") or "").strip(),
    }
    if values["action"]:
        stmt = stmt.where(AuditLog.action == values["action"])
    if values["object_type"]:
        stmt = stmt.where(AuditLog.object_type == values["object_type"])
    if values["actor"] == "system":
        stmt = stmt.where(AuditLog.actor_user_id.is_(None))
    elif values["actor"]:
        actor_id = parse_id(values["actor"])
        if actor_id is not None:
            stmt = stmt.where(AuditLog.actor_user_id == actor_id)
        else:
            errors.append("Choose an actor from the list.")
            values["actor"] = ""
    since, error = _date_arg("since")
    if error:
        errors.append(error)
        values["since"] = ""
    elif since:
        stmt = stmt.where(AuditLog.created_at >= datetime.combine(since, time.min, UTC))
    until, error = _date_arg("until")
    if error:
        errors.append(error)
        values["until"] = ""
    elif until and until < date.max:  # up to the calendar's last day: no end at all
        end = datetime.combine(until + timedelta(days=1), time.min, UTC)
        stmt = stmt.where(AuditLog.created_at < end)
    return stmt, values, errors


def _choices(column) -> list[str]:
    return list(
        db.session.scalars(
            select(column)
            .distinct()
            .where(AuditLog.tenant_id == current_user.tenant_id, column.is_not(None))
            .order_by(column)
        )
    )


@bp.get("/")
@admin_required
def index():
    stmt, values, errors = _filtered()
    rows, next_before = keyset_page(stmt, AuditLog.id, current_app.config["LIST_PAGE_SIZE"])
    actors = db.session.execute(
        select(User.id, User.email)
        .where(User.tenant_id == current_user.tenant_id)
        .order_by(User.email)
    ).all()
    filter_args = {k: v for k, v in values.items() if v}
    return render(
        "audit/index.html",
        entries=rows,
        next_before=next_before,
        values=values,
        errors=errors,
        actions=_choices(AuditLog.action),
        object_types=_choices(AuditLog.object_type),
        actors=actors,
        filter_args=filter_args,
    )


@bp.get("/export.csv")
@admin_required
def export_csv():
    stmt, values, errors = _filtered()
    if errors:
        return render("error.html", code=400, message=" ".join(errors)), 400
    emit(
        "audit.exported",
        tenant_id=current_user.tenant_id,
        entity="audit_log",
        payload={"label": "Audit trail exported as CSV", "filters": values},
    )
    db.session.commit()
    app = current_app._get_current_object()
    stmt = stmt.order_by(AuditLog.id.desc())

    def generate():
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(
            ["id", "created_at", "actor", "action", "object_type", "object_id", "ip", "details"]
        )
        before = None
        with app.app_context():
            while True:
                page = stmt if before is None else stmt.where(AuditLog.id < before)
                batch = list(db.session.scalars(page.limit(CSV_BATCH)))
                for row in batch:
                    writer.writerow(
                        [
                            row.id,
                            row.created_at.isoformat(),
                            _csv_safe(row.actor_label),
                            row.action,
                            row.object_type,
                            row.object_id or "",
                            row.ip or "",
                            _csv_safe(json.dumps(row.details, ensure_ascii=False, sort_keys=True)),
                        ]
                    )
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
                if len(batch) < CSV_BATCH:
                    break
                before = batch[-1].id
                db.session.expunge_all()

    filename = f"audit-{datetime.now(UTC):%Y%m%d-%H%M%S}.csv"
    return Response(
        stream_with_context(generate()),
        mimetype="text/csv",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "private, no-store",
        },
    )


def _csv_safe(value: str) -> str:
    """Stop spreadsheets from running formulas a user typed into a label."""
    if value and value[0] in "=+-@\t\r":
        return "'" + value
    return value
