"""Pooled PostgreSQL connections are pinged before use only after sitting idle (app.py
_ping_idle_connections): a connection the server dropped meanwhile is replaced unseen, and
one that fails is replaced with every older one of its pool."""

from __future__ import annotations

import time

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from tests.conftest import PG_URL, make_app
from tests.helpers import wait_for


def _app(tmp_path, pg_database_url, idle: float):
    url = pg_database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    return make_app(tmp_path, SQLALCHEMY_DATABASE_URI=url, DATABASE_PING_IDLE_SECONDS=idle)


def _backend_pid() -> int:
    from extensions import db

    try:
        return db.session.execute(text("SELECT pg_backend_pid()")).scalar_one()
    finally:
        db.session.remove()  # the connection goes back to the pool


def _terminate(pid: int) -> None:
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert wait_for(
            lambda: (
                admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone()[0]
                == 0
            ),
            timeout=5,
        )


def test_a_connection_dropped_while_idle_is_replaced_without_an_error(tmp_path, pg_database_url):
    from extensions import db

    app = _app(tmp_path, pg_database_url, idle=0.2)
    try:
        with app.app_context():
            first = _backend_pid()
            assert _backend_pid() == first  # the pool keeps its connection
            _terminate(first)  # the server drops it while it sits in the pool
            time.sleep(0.3)
            assert _backend_pid() != first  # pinged, found dead, replaced: no error
    finally:
        with app.app_context():
            db.engine.dispose()


def test_a_connection_used_a_moment_ago_is_not_pinged_and_a_failure_renews_the_pool(
    tmp_path, pg_database_url
):
    from extensions import db

    app = _app(tmp_path, pg_database_url, idle=30)
    try:
        with app.app_context():
            first = _backend_pid()
            _terminate(first)
            # Used again at once: no ping (the round trip it saves is the point), so the
            # statement meets the dropped connection, as one would if it dropped mid-use...
            with pytest.raises(OperationalError):
                _backend_pid()
            # ...and the pool replaces it: the next use works without a restart.
            assert _backend_pid() != first
    finally:
        with app.app_context():
            db.engine.dispose()
