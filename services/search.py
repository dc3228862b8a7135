"""Global search over one tenant's devices, chats and projects.

PostgreSQL matches words with full-text search (the 'simple' configuration: no stemming, so
model numbers and names in any language match as typed); SQLite, used in development, falls
back to a case-insensitive substring LIKE. Identifiers that are not words (IP addresses,
visitor ids) match as substrings on both. Every query is scoped to the tenant and ordered by
id, newest first, so the pages are keyset-paged like every other list."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Select, and_, exists, func, literal_column, or_, select

from extensions import db
from models.chats import Chat, Message
from models.devices import Device
from models.projects import Project

KINDS = ("devices", "chats", "projects")
MAX_QUERY_LENGTH = 200
LIKE_ESCAPE = "\\"


def clean_query(raw: str | None) -> str:
    """The query as searched: control characters (PostgreSQL refuses NUL in text) become
    spaces, runs of whitespace collapse, and it is cut to MAX_QUERY_LENGTH characters."""
    text = "".join(" " if ord(char) < 32 or char == "\x7f" else char for char in raw or "")
    return " ".join(text.split())[:MAX_QUERY_LENGTH]


def like_pattern(query: str) -> str:
    """A LIKE pattern matching `query` anywhere, with % and _ taken literally."""
    escaped = (
        query.replace(LIKE_ESCAPE, LIKE_ESCAPE * 2)
        .replace("%", LIKE_ESCAPE + "%")
        .replace("_", LIKE_ESCAPE + "_")
    )
    return f"%{escaped}%"


def _full_text() -> bool:
    return db.session.get_bind().dialect.name == "postgresql"


def _contains(columns: list[Any], query: str) -> ColumnElement[bool]:
    pattern = like_pattern(query)
    return or_(*(column.ilike(pattern, escape=LIKE_ESCAPE) for column in columns))


def _words(columns: list[Any], query: str) -> ColumnElement[bool]:
    """Each of the query's words is in one of the columns (in any order, as full-text search
    reads it): full text on PostgreSQL, one LIKE per word elsewhere."""
    if not _full_text():
        return and_(*(_contains(columns, word) for word in query.split()))
    simple = literal_column("'simple'::regconfig")
    document = func.concat_ws(" ", *(func.coalesce(column, "") for column in columns))
    return func.to_tsvector(simple, document).op("@@")(func.plainto_tsquery(simple, query))


def devices_matching(tenant_id: int, query: str) -> Select:
    return select(Device).where(
        Device.tenant_id == tenant_id,
        or_(_words([Device.name, Device.model], query), _contains([Device.ip_address], query)),
    )


def chats_matching(tenant_id: int, query: str) -> Select:
    said = exists().where(
        Message.chat_id == Chat.id,
        Message.tenant_id == tenant_id,
        _words([Message.content], query),
    )
    return select(Chat).where(
        Chat.tenant_id == tenant_id,
        or_(_contains([Chat.visitor_id], query), _words([Chat.title], query), said),
    )


def projects_matching(tenant_id: int, query: str) -> Select:
    return select(Project).where(Project.tenant_id == tenant_id, _words([Project.name], query))


MATCHERS = {"devices": devices_matching, "chats": chats_matching, "projects": projects_matching}
MODELS = {"devices": Device, "chats": Chat, "projects": Project}


def first_matches(tenant_id: int, query: str, limit: int) -> dict[str, tuple[list[Any], bool]]:
    """The newest `limit` matches of each kind, and whether there are more."""
    found = {}
    for kind in KINDS:
        model = MODELS[kind]
        stmt = MATCHERS[kind](tenant_id, query).order_by(model.id.desc()).limit(limit + 1)
        rows = list(db.session.scalars(stmt))
        found[kind] = (rows[:limit], len(rows) > limit)
    return found
