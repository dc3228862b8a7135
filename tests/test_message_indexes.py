"""A reply's start and save find the visitor message's answer through an index, not by reading
every message of every chat: on a table of a busy year that is a scan per reply."""

from __future__ import annotations

import pytest
from flask_migrate import upgrade
from sqlalchemy import insert, text

from tests.conftest import Factory, make_app, new_pg_database

CHATS, PER_CHAT = 400, 50


def _plan(stmt, **values) -> str:
    """PostgreSQL's plan for a statement built once in the app, with these parameters."""
    from extensions import db

    compiled = stmt.compile(db.engine)
    params = {**compiled.params, **values}
    result = db.session.connection().exec_driver_sql("EXPLAIN " + str(compiled), params)
    return "\n".join(row[0] for row in result)


@pytest.mark.integration
def test_a_reply_start_and_save_do_not_scan_the_messages_table(tmp_path):
    from extensions import db
    from models.chats import Agent, Chat, Message
    from tasks.chats import _REPLY_START, _SAVED_REPLY

    with new_pg_database("msgindex") as url:
        app = make_app(
            tmp_path, SQLALCHEMY_DATABASE_URI=url.replace("postgresql://", "postgresql+psycopg://")
        )
        with app.app_context():
            upgrade()  # the migrated schema, as production has it
        tenant = Factory(app).tenant()
        with app.app_context():
            agent = Agent(tenant_id=tenant.id, name="Helper", model="m", is_default=True)
            db.session.add(agent)
            db.session.flush()
            chat_ids = [
                db.session.execute(
                    insert(Chat).values(tenant_id=tenant.id, agent_id=agent.id).returning(Chat.id)
                ).scalar_one()
                for _ in range(CHATS)
            ]
            rows = []
            for chat_id in chat_ids:
                for i in range(PER_CHAT):
                    sender = "visitor" if i % 2 == 0 else "assistant"
                    rows.append(
                        {
                            "tenant_id": tenant.id,
                            "chat_id": chat_id,
                            "sender": sender,
                            "content": "x",
                        }
                    )
            db.session.execute(insert(Message), rows)
            db.session.commit()
            db.session.execute(text("ANALYZE messages"))
            db.session.commit()
            message_id = db.session.execute(
                text("SELECT max(id) FROM messages WHERE sender = 'visitor'")
            ).scalar_one()

            for stmt in (_REPLY_START, _SAVED_REPLY):
                plan = _plan(stmt, message_id=message_id)
                assert "Seq Scan on messages" not in plan, plan
            db.session.remove()
            db.engine.dispose()
