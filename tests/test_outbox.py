"""The outbox: committed changes become events in the same transaction, nothing else does."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from models.chats import Agent
from models.events import OutboxEvent


def _events(db):
    db.session.expire_all()
    return db.session.scalars(select(OutboxEvent).order_by(OutboxEvent.id)).all()


def test_create_update_delete_become_events_with_field_changes(db, factory):
    tenant = factory.tenant()
    agent = Agent(tenant_id=tenant.id, name="Helper", temperature=0.5)
    db.session.add(agent)
    db.session.commit()
    agent.temperature = 0.9
    agent.name = "Helper 2"
    db.session.commit()
    db.session.delete(agent)
    db.session.commit()

    events = [e for e in _events(db) if e.entity == "agent"]
    assert [e.topic for e in events] == ["agent.created", "agent.updated", "agent.deleted"]
    created, updated, deleted = events
    assert created.tenant_id == tenant.id
    assert created.payload["fields"]["name"] == "Helper"
    assert updated.payload["changes"] == {"name": ["Helper", "Helper 2"], "temperature": [0.5, 0.9]}
    assert deleted.payload["fields"]["name"] == "Helper 2"
    assert all(e.status == "pending" for e in events)  # no worker here: they wait


def test_update_without_real_change_emits_nothing(db, factory):
    tenant = factory.tenant()
    agent = Agent(tenant_id=tenant.id, name="Same")
    db.session.add(agent)
    db.session.commit()
    before = len(_events(db))
    agent.name = "Same"
    db.session.commit()
    assert len(_events(db)) == before


def test_rollback_emits_nothing(db, factory):
    tenant = factory.tenant()
    before = len(_events(db))
    db.session.add(Agent(tenant_id=tenant.id, name="Never"))
    db.session.flush()  # the outbox row is written...
    db.session.rollback()  # ...and goes with the transaction
    assert len(_events(db)) == before


def test_savepoint_rollback_drops_only_its_events(db, factory):
    from events import emit

    tenant = factory.tenant()
    before = {e.id for e in _events(db)}
    db.session.add(Agent(tenant_id=tenant.id, name="Kept"))
    emit("test.kept", tenant_id=tenant.id, payload={"n": 1})
    savepoint = db.session.begin_nested()
    db.session.add(Agent(tenant_id=tenant.id, name="Dropped"))
    emit("test.dropped", tenant_id=tenant.id)
    db.session.flush()
    savepoint.rollback()
    db.session.commit()

    new = [e for e in _events(db) if e.id not in before]
    assert sorted(e.topic for e in new) == ["agent.created", "test.kept"]
    assert [e.payload["fields"]["name"] for e in new if e.topic == "agent.created"] == ["Kept"]


def test_explicit_event_is_written_with_the_change(db, factory):
    from events import emit

    tenant = factory.tenant()
    emit("device.offline", tenant_id=tenant.id, entity="device", entity_id=7, payload={"x": 1})
    db.session.commit()
    event = _events(db)[-1]
    assert (event.topic, event.entity_id, event.payload) == ("device.offline", 7, {"x": 1})


def test_before_commit_work_sees_ids_and_goes_with_a_rolled_back_savepoint(db, factory):
    from events.outbox import before_commit, on_commit

    tenant = factory.tenant()
    seen: list[tuple[str, int | None]] = []
    kept = Agent(tenant_id=tenant.id, name="Kept")
    db.session.add(kept)
    before_commit(lambda: seen.append(("kept", kept.id)))
    savepoint = db.session.begin_nested()
    dropped = Agent(tenant_id=tenant.id, name="Dropped")
    db.session.add(dropped)
    before_commit(lambda: seen.append(("dropped", dropped.id)))
    savepoint.rollback()
    on_commit(lambda: seen.append(("committed", None)))
    assert seen == []  # nothing runs before the commit
    db.session.commit()
    # Ran inside the transaction, after the flush that gave the row its id, before on_commit.
    assert seen == [("kept", kept.id), ("committed", None)] and kept.id is not None
    db.session.add(Agent(tenant_id=tenant.id, name="Rolled back"))
    before_commit(lambda: seen.append(("rolled back", None)))
    db.session.rollback()
    db.session.commit()
    assert len(seen) == 2


def test_last_before_commit_work_runs_after_all_the_rest_and_goes_with_a_savepoint(db, factory):
    from events.outbox import before_commit, prepare_commit

    tenant = factory.tenant()
    seen: list[str] = []
    before_commit(lambda: seen.append("counts"), last=True)
    before_commit(lambda: (seen.append("rows"), before_commit(lambda: seen.append("renders"))))
    savepoint = db.session.begin_nested()
    before_commit(lambda: seen.append("dropped"), last=True)
    savepoint.rollback()
    db.session.add(Agent(tenant_id=tenant.id, name="Kept"))
    db.session.commit()
    # After the other callbacks, and after those they registered.
    assert seen == ["rows", "renders", "counts"]
    db.session.add(Agent(tenant_id=tenant.id, name="Rolled back"))
    before_commit(lambda: seen.append("rolled back"), last=True)
    db.session.rollback()
    db.session.commit()
    assert seen == ["rows", "renders", "counts"]

    # Its errors are raised where prepare_commit is called, as the others' are.
    def fail() -> None:
        raise RuntimeError("counter write failed")

    before_commit(fail, last=True)
    with pytest.raises(RuntimeError):
        prepare_commit(db.session)
    db.session.rollback()


def test_on_commit_work_runs_before_or_after_the_commits_events_are_sent(db, factory, worker):
    from events.outbox import on_commit

    tenant = factory.tenant()
    statuses: list[tuple[str, str]] = []

    def status_now(label: str) -> None:
        with db.engine.connect() as conn:
            row = conn.execute(
                select(OutboxEvent.status).where(OutboxEvent.topic == "agent.created")
            ).one()
        statuses.append((label, row.status))

    db.session.add(Agent(tenant_id=tenant.id, name="Urgent"))
    on_commit(lambda: status_now("after"))
    on_commit(lambda: status_now("before"), before_events=True)
    db.session.commit()
    # A reply someone waits for goes out before the handlers' messages; the rest after them.
    assert statuses == [("before", "pending"), ("after", "dispatched")]


def test_rows_kept_until_the_commit_are_written_by_it_together(db, factory):
    """deferred_emits(until_commit=True): a flush writes no outbox row; the commit writes
    them all in one INSERT, those of changes only its own flush sees included."""
    from sqlalchemy import event

    from events import emit, enqueue
    from events.outbox import deferred_emits

    tenant = factory.tenant()
    before = len(_events(db))
    inserts: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO OUTBOX"):
            inserts.append(statement)

    event.listen(db.engine, "before_cursor_execute", seen)
    try:
        with deferred_emits(until_commit=True):
            agent = Agent(tenant_id=tenant.id, name="Deferred")
            db.session.add(agent)
            db.session.flush()
            emit("test.deferred", tenant_id=tenant.id, payload={"agent": agent.id})
            enqueue("generate_reply", 12345)
            db.session.flush()
            assert inserts == []
            agent.name = "Renamed"  # flushed by the commit itself
            db.session.commit()
    finally:
        event.remove(db.engine, "before_cursor_execute", seen)
    assert len(inserts) == 1
    new = _events(db)[before:]
    assert sorted(e.topic for e in new) == [
        "agent.created",
        "agent.updated",
        "job:generate_reply",
        "test.deferred",
    ]
    assert [e.payload for e in new if e.topic == "job:generate_reply"] == [{"args": [12345]}]


def test_rows_kept_until_the_commit_go_with_a_rollback(db, factory):
    from events import emit
    from events.outbox import deferred_emits

    tenant = factory.tenant()
    before = len(_events(db))
    with deferred_emits(until_commit=True):
        db.session.add(Agent(tenant_id=tenant.id, name="Never"))
        db.session.flush()
        emit("test.never", tenant_id=tenant.id)
        db.session.rollback()
        db.session.add(Agent(tenant_id=tenant.id, name="Kept"))
        db.session.commit()
    new = _events(db)[before:]
    assert [(e.topic, e.payload["fields"]["name"]) for e in new] == [("agent.created", "Kept")]
