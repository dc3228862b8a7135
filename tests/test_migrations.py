"""The migrations build exactly the schema the models declare, and can be undone and redone."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask_migrate import downgrade, upgrade
from sqlalchemy import create_engine, inspect

from tests.conftest import make_app, new_pg_database


def _diff(app) -> list:
    from extensions import db

    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, db.metadata)


def _round_trip(app) -> None:
    from extensions import db

    with app.app_context():
        upgrade()
        tables = set(inspect(db.engine).get_table_names())
        assert {"tenants", "users", "chats", "devices", "projects", "outbox"} <= tables
        assert {"notifications", "webhook_endpoints", "metric_counters", "audit_logs"} <= tables
        assert _diff(app) == [], "models and migrations disagree: run `flask db migrate`"
        downgrade(revision="base")
        assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
        upgrade()
        assert _diff(app) == []
        db.engine.dispose()


def test_sqlite_upgrade_downgrade_upgrade(tmp_path):
    _round_trip(make_app(tmp_path))


@pytest.mark.integration
def test_postgresql_upgrade_downgrade_upgrade(tmp_path):
    with new_pg_database("migrations") as url:
        app = make_app(
            tmp_path, SQLALCHEMY_DATABASE_URI=url.replace("postgresql://", "postgresql+psycopg://")
        )
        _round_trip(app)
        # The app works on the migrated schema: the demo loads and the home page renders.
        runner = app.test_cli_runner()
        result = runner.invoke(args=["demo", "load"])
        assert result.exit_code == 0, result.output
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.connect() as connection:
            assert connection.exec_driver_sql("select count(*) from users").scalar() >= 1
        engine.dispose()
        with app.app_context():
            from extensions import db

            db.engine.dispose()
