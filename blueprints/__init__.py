"""One package per area. Shared helpers for pages live here: partial-or-page rendering,
tenant-scoped lookups, keyset pagination, the range of ids a URL may carry, and safe
redirect targets."""

from __future__ import annotations

import re
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import abort, g, make_response, render_template, request, url_for
from flask_login import current_user
from sqlalchemy import BigInteger, Select
from werkzeug.routing import IntegerConverter

from extensions import db

M = TypeVar("M")

# Every id column is an INTEGER on PostgreSQL (a few append-only tables use BIGINT): a number
# past the column's range makes the database raise instead of finding nothing, so it must be
# refused before a query is built.
DB_INT_MAX = 2**31 - 1
DB_BIGINT_MAX = 2**63 - 1
_DIGITS = re.compile(r"[0-9]{1,19}")


def parse_id(raw: str | None, *, maximum: int = DB_INT_MAX) -> int | None:
    """`raw` as a database id (1..maximum), or None when it is anything else."""
    raw = (raw or "").strip()
    if not _DIGITS.fullmatch(raw):
        return None
    value = int(raw)
    return value if 1 <= value <= maximum else None


class DatabaseIdConverter(IntegerConverter):
    """`<int:…>` in every route: a positive id within the INTEGER range. Anything else
    matches no route (404) rather than reaching the database."""

    regex = r"[0-9]+"

    def __init__(self, map, fixed_digits=0, min=1, max=DB_INT_MAX, signed=False) -> None:
        super().__init__(map, fixed_digits=fixed_digits, min=min, max=max, signed=False)


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


def int_arg(name: str, *, maximum: int = DB_INT_MAX) -> int | None:
    """The query argument `name` as an id; absent or blank is None, anything else but an id
    in 1..maximum is a 400 that says what was expected."""
    raw = request.args.get(name, "")
    if not raw.strip():
        return None
    value = parse_id(raw, maximum=maximum)
    if value is None:
        abort(400, description=f"“{name}” must be a whole number from 1 to {maximum}.")
    return value


def id_max(column: Any) -> int:
    """The largest id `column` can hold."""
    return DB_BIGINT_MAX if isinstance(column.type, BigInteger) else DB_INT_MAX


def keyset_page(stmt: Select, id_column: Any, limit: int) -> tuple[list[Any], int | None]:
    """Newest-first page of `stmt` before ?before=<id>, or the page just newer than
    ?after=<id>; returns (rows, next before-id or None). The "Newer" link's after-id, when
    there are newer rows, is left in g.keyset_newer_after for _pager.html."""
    before = int_arg("before", maximum=id_max(id_column))
    after = None if before is not None else int_arg("after", maximum=id_max(id_column))
    g.keyset_newer_after = None
    if after is not None:
        # Oldest-first from the boundary, so the page is the one right above it.
        newer = stmt.where(id_column > after).order_by(id_column.asc()).limit(limit + 1)
        rows = list(db.session.scalars(newer))
        if len(rows) > limit:
            rows = rows[:limit]
            g.keyset_newer_after = rows[-1].id
        rows.reverse()
        oldest_shown = rows[-1].id if rows else after + 1
        older = stmt.with_only_columns(id_column).where(id_column < oldest_shown).limit(1)
        return rows, oldest_shown if db.session.scalar(older) is not None else None
    if before is not None:
        stmt = stmt.where(id_column < before)
        g.keyset_newer_after = before - 1
    rows = list(db.session.scalars(stmt.order_by(id_column.desc()).limit(limit + 1)))
    next_before = rows[limit - 1].id if len(rows) > limit else None
    return rows[:limit], next_before


def safe_next(target: str | None, fallback: str | None = None) -> str:
    """`target` if it is a path on this site, else `fallback` (the dashboard by default).

    Browsers read a backslash as a slash and skip tabs and newlines inside a URL, so a
    backslash or a control character anywhere makes the target unsafe, like a leading `//`."""
    fallback = fallback or url_for("dashboard.home")
    target = (target or "").strip()
    if target.startswith(request.host_url):
        target = "/" + target[len(request.host_url) :]
    if any(ord(char) < 32 or char in "\\\x7f" for char in target):
        return fallback
    if not target.startswith("/") or target.startswith("//"):
        return fallback
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return fallback
    return target
