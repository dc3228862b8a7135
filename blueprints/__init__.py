"""One package per area. Shared helpers for pages live here: partial-or-page rendering,
tenant-scoped lookups and keyset pagination."""

from __future__ import annotations

from typing import Any, TypeVar

from flask import abort, make_response, render_template, request
from flask_login import current_user
from sqlalchemy import Select

from extensions import db

M = TypeVar("M")


def is_partial_request() -> bool:
    """An htmx request that swaps part of a page (not boosted, not a history restore)."""
    return (
        request.headers.get("HX-Request") == "true"
        and request.headers.get("HX-Boosted") != "true"
        and request.headers.get("HX-History-Restore-Request") != "true"
    )


def render(page: str, partial: str | None = None, **context: Any):
    """Render the full page, or only its partial for an htmx request (Vary: HX-Request)."""
    template = partial if partial and is_partial_request() else page
    response = make_response(render_template(template, **context))
    response.headers.add("Vary", "HX-Request")
    return response


def admin_required(view):
    """Login and the admin role; anyone else gets 403."""
    from functools import wraps

    from flask_login import login_required

    @wraps(view)
    @login_required
    def wrapped(*args, **kwargs):
        if not current_user.is_admin:
            abort(403)
        return view(*args, **kwargs)

    return wrapped


def scoped(stmt: Select, model: Any) -> Select:
    """Restrict a select to the current user's tenant."""
    return stmt.where(model.tenant_id == current_user.tenant_id)


def get_owned_or_404(model: type[M], object_id: Any) -> M:
    """Fetch a record of the current user's tenant; anything else is a 404, never a 403."""
    obj = db.session.get(model, object_id)
    if obj is None or getattr(obj, "tenant_id", None) != current_user.tenant_id:
        abort(404)
    return obj


def int_arg(name: str) -> int | None:
    raw = request.args.get(name, "")
    try:
        return int(raw) if raw else None
    except ValueError:
        abort(400)


def keyset_page(stmt: Select, id_column: Any, limit: int) -> tuple[list[Any], int | None]:
    """Newest-first page of `stmt` before ?before=<id>; returns (rows, next before-id or None)."""
    before = int_arg("before")
    if before is not None:
        stmt = stmt.where(id_column < before)
    rows = list(db.session.scalars(stmt.order_by(id_column.desc()).limit(limit + 1)))
    next_before = rows[limit - 1].id if len(rows) > limit else None
    return rows[:limit], next_before
