"""Erasure that erases: after `flask chats anonymize`, a phrase the visitor typed is found in
no column of any table (messages, replies quoting it, notifications, outbox payloads, audit
details, the erasure's own record) nor in the live bus's replayable frames, on SQLite with the
in-process bus and on PostgreSQL with Redis."""

from __future__ import annotations

import pytest
from sqlalchemy import JSON, String, Text, cast, func, select

from models.accounts import User
from models.chats import Agent, Chat, Message
from models.events import OutboxEvent
from services import chats
from tests.conftest import Factory, drain
from tests.fake_openai import FakeOpenAI, Script
from tests.helpers import wait_for

MARKER = "Zebulon Quartermaine"
VISITOR = "visitor-erase-me"


def _tables_holding(db, phrase: str) -> dict[str, int]:
    """table.column → how many rows hold `phrase`, over every text and JSON column."""
    found = {}
    for table in db.metadata.sorted_tables:
        for column in table.columns:
            if isinstance(column.type, JSON):
                target = cast(column, Text)
            elif isinstance(column.type, String | Text):
                target = column
            else:
                continue
            count = db.session.scalar(
                select(func.count()).select_from(table).where(target.contains(phrase))
            )
            if count:
                found[f"{table.name}.{column.name}"] = count
    return found


def _live_frames_holding(app, phrase: str) -> int:
    live = app.extensions["switchboard.live"].bus
    redis = getattr(live, "redis", None)
    if redis is None:
        return sum(phrase in data for frames in live._streams.values() for _, data in frames)
    count = 0
    for key in redis.scan_iter(match=live.prefix + "*", count=500):
        if redis.type(key) not in (b"stream", "stream"):
            continue
        for _, fields in redis.xrange(key):
            count += phrase.encode() in fields.get(b"d", b"")
    return count


def _all_handled(db) -> bool:
    db.session.rollback()
    return not db.session.scalar(
        select(func.count()).select_from(OutboxEvent).where(OutboxEvent.status != "done")
    )


def _converse(app, db, factory: Factory, settle) -> int:
    """An anonymous visitor's angry chat naming MARKER, a reply quoting it, the escalation
    notification, its audit records and a title edited by an operator."""
    tenant = factory.tenant("Erasure shop")
    admin = factory.user(tenant, role="admin")
    db.session.get(User, admin.id).on_duty = True
    db.session.add(Agent(tenant_id=tenant.id, name="Helper", model="fake", is_default=True))
    db.session.commit()
    chat = chats.start_chat(tenant.id, visitor_id=VISITOR)
    chats.add_message(chat, "visitor", f"I am furious: {MARKER} was charged twice, awful!")
    db.session.commit()
    chat_id = chat.id
    settle(lambda: db.session.scalar(select(func.count()).where(Message.sender == "assistant")))
    chat = db.session.get(Chat, chat_id)
    chat.title = f"Double charge for {MARKER}"  # an ORM edit: old → new in the event log
    db.session.commit()
    settle(lambda: True)
    return chat_id


def _erase_and_check(app, db, runner, chat_id: int, settle) -> None:
    before = _tables_holding(db, MARKER)
    # The phrase was copied far beyond the visitor's own message.
    assert {"messages.content", "outbox.payload", "audit_logs.details"} <= before.keys()
    assert "notifications.body" in before
    assert db.session.scalar(
        select(func.count()).where(
            Message.chat_id == chat_id,
            Message.sender == "assistant",
            Message.content.contains(MARKER),
        )
    )
    assert _live_frames_holding(app, MARKER) > 0

    result = runner.invoke(args=["chats", "anonymize", "--visitor-id", VISITOR])
    assert result.exit_code == 0, result.output
    assert "Anonymised 1 chats" in result.output
    settle(lambda: True)
    db.session.expire_all()

    assert _tables_holding(db, MARKER) == {}
    assert _tables_holding(db, "Quartermaine") == {}
    assert _live_frames_holding(app, "Quartermaine") == 0
    chat = db.session.get(Chat, chat_id)
    assert chat.visitor_id != VISITOR and chat.message_count == 2  # the chat stays, anonymous
    erased = db.session.scalars(select(OutboxEvent.topic).where(OutboxEvent.entity_id == chat_id))
    assert "chat.erased" in set(erased)
    again = runner.invoke(args=["chats", "anonymize", "--visitor-id", VISITOR])
    assert again.exit_code != 0 and "No chats belong to visitor" in again.output


@pytest.fixture
def quoting_upstream():
    fake = FakeOpenAI(Script(reply=f"I am so sorry, {MARKER}, let me fix that charge.")).start()
    yield fake
    fake.stop()


def test_anonymize_erases_the_visitors_words_from_every_table_sqlite(
    app, db, worker, runner, factory, quoting_upstream
):
    app.config.update(OPENAI_BASE_URL=quoting_upstream.base_url, OPENAI_API_KEY="k")

    def settle(_ready) -> None:
        drain(app)
        drain(app)
        assert wait_for(lambda: _all_handled(db), timeout=20)

    chat_id = _converse(app, db, factory, settle)
    _erase_and_check(app, db, runner, chat_id, settle)


def test_anonymize_erases_the_visitors_words_from_every_table_postgresql(
    prod_app, prod_worker, prod_factory, quoting_upstream
):
    from extensions import db

    prod_app.config.update(OPENAI_BASE_URL=quoting_upstream.base_url, OPENAI_API_KEY="k")
    runner = prod_app.test_cli_runner()

    def settle(ready) -> None:
        assert wait_for(lambda: _all_handled(db) and ready(), timeout=30)

    with prod_app.app_context():
        chat_id = _converse(prod_app, db, prod_factory, settle)
        _erase_and_check(prod_app, db, runner, chat_id, settle)
        db.session.remove()


def test_cli_needs_exactly_one_person(runner):
    result = runner.invoke(args=["chats", "anonymize"])
    assert result.exit_code != 0 and "exactly one of" in result.output
    result = runner.invoke(args=["chats", "anonymize", "--visitor-id", "nobody"])
    assert result.exit_code != 0 and "No chats belong to visitor 'nobody'" in result.output
