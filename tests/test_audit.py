"""The audit trail through the real spine: changes, logins, role changes and exports become
AuditLog rows of the right tenant; the page filters, pages and exports them."""

from __future__ import annotations

import csv
import io

import pytest
from sqlalchemy import select

from models.audit import AuditLog
from models.chats import Agent
from models.devices import Device, Manufacturer
from models.events import OutboxEvent
from tests.conftest import PASSWORD, csrf_token_from, drain, login


@pytest.fixture
def office(factory):
    tenant = factory.tenant("Office")
    admin = factory.user(tenant, role="admin", email="root@office.example")
    agent = factory.user(tenant, role="agent", email="desk@office.example")
    return tenant, admin, agent


def _entries(db, tenant_id: int, **where) -> list[AuditLog]:
    db.session.expire_all()
    stmt = select(AuditLog).where(AuditLog.tenant_id == tenant_id)
    for key, value in where.items():
        stmt = stmt.where(getattr(AuditLog, key) == value)
    # The page lists entries in event time; handlers may run in any order.
    return list(db.session.scalars(stmt.order_by(AuditLog.created_at, AuditLog.id)))


def _agent_form(page: bytes, **fields) -> dict:
    form = {
        "csrf_token": csrf_token_from(page),
        "name": "Night desk",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "temperature": "0.5",
        "max_tokens": "400",
        "system_prompt": "Be brief.",
        "is_active": "y",
    }
    form.update(fields)
    return form


def test_page_changes_are_audited_with_actor_ip_and_field_changes(app, client, db, worker, office):
    tenant, admin, _ = office
    login(client, admin)
    page = client.get("/chats/agents/new")
    assert client.post("/chats/agents/new", data=_agent_form(page.data)).status_code == 303
    agent = db.session.scalars(select(Agent).where(Agent.tenant_id == tenant.id)).one()
    page = client.get(f"/chats/agents/{agent.id}")
    form = _agent_form(page.data, name="Night desk", temperature="1.2")
    assert client.post(f"/chats/agents/{agent.id}", data=form).status_code == 303
    drain(app)

    created = _entries(db, tenant.id, action="created", object_type="agent")
    assert len(created) == 1
    assert created[0].actor_user_id == admin.id and created[0].actor_label == admin.email
    assert created[0].ip == "127.0.0.1" and created[0].object_id == str(agent.id)
    updated = _entries(db, tenant.id, action="updated", object_type="agent")
    assert len(updated) == 1 and updated[0].details["changes"]["temperature"] == [0.5, 1.2]

    db.session.delete(db.session.get(Agent, agent.id))
    db.session.commit()
    drain(app)
    deleted = _entries(db, tenant.id, action="deleted", object_type="agent")
    assert len(deleted) == 1 and deleted[0].actor_label == "system"  # no one logged in here


def test_logins_failed_logins_and_role_changes(app, client, db, worker, office):
    tenant, admin, agent = office
    login(client, agent)
    page = client.get("/login")
    client.post("/logout", data={"csrf_token": csrf_token_from(client.get("/").data)})
    page = client.get("/login")
    bad = client.post(
        "/login",
        data={"email": agent.email, "password": "wrong!", "csrf_token": csrf_token_from(page.data)},
    )
    assert bad.status_code == 401
    # A login is its own event; the last_login_at it stamps writes no "user.updated" (the
    # activity feed showed one after every login).
    topics = db.session.scalars(select(OutboxEvent.topic)).all()
    assert "user.logged_in" in topics and "user.updated" not in topics
    runner = app.test_cli_runner()
    result = runner.invoke(args=["users", "set-role", "--email", agent.email, "--role", "admin"])
    assert result.exit_code == 0 and "now admin" in result.output
    drain(app)

    logins = _entries(db, tenant.id, action="login")
    assert [e.actor_label for e in logins] == [agent.email]
    failed = _entries(db, tenant.id, action="login_failed")
    assert len(failed) == 1 and failed[0].object_id == str(agent.id)
    roles = _entries(db, tenant.id, action="role_changed")
    assert len(roles) == 1 and roles[0].details["changes"]["role"] == ["agent", "admin"]
    # A login's own bookkeeping (last_login_at) is not an "updated" entry.
    assert _entries(db, tenant.id, action="updated", object_type="user") == []


def test_routine_device_bookkeeping_is_not_audited(app, db, worker, office):
    tenant, _, _ = office
    maker = Manufacturer(code="audit-sim", name="Audit simulator")
    db.session.add(maker)
    db.session.flush()
    device = Device(
        tenant_id=tenant.id, manufacturer_id=maker.id, api_device_id="SIM-1", name="Rack 1"
    )
    db.session.add(device)
    db.session.commit()
    device.missed_polls = 2
    db.session.commit()
    device.name = "Rack one"
    db.session.commit()
    drain(app)
    entries = _entries(db, tenant.id, object_type="device_record")
    assert [e.action for e in entries] == ["created", "updated"]
    assert entries[1].details["changes"] == {"name": ["Rack 1", "Rack one"]}


def test_audit_page_filters_pages_exports_and_is_admin_only(
    app, client, db, worker, office, factory
):
    tenant, admin, agent = office
    other = factory.tenant("Elsewhere")
    for n in range(30):
        db.session.add(Agent(tenant_id=tenant.id, name=f"Agent {n:02d}"))
    db.session.add(Agent(tenant_id=other.id, name="Foreign agent"))
    db.session.commit()
    drain(app)

    login(client, agent)
    assert client.get("/audit/").status_code == 403
    assert client.get("/audit/export.csv").status_code == 403
    client.post("/logout", data={"csrf_token": csrf_token_from(client.get("/").data)})

    login(client, admin)
    drain(app)
    app.config["LIST_PAGE_SIZE"] = 25
    first = client.get("/audit/?object_type=agent")
    assert first.status_code == 200
    assert first.data.count(b'<tr id="audit-') == 25
    assert b"Foreign agent" not in first.data
    older = client.get(
        "/audit/?object_type=agent&before="
        + first.data.split(b"before=")[1].split(b"&")[0].decode()
    )
    assert older.data.count(b'<tr id="audit-') == 5
    assert client.get("/audit/?action=login").data.count(b'<tr id="audit-') == 2  # both
    future = client.get("/audit/?since=2999-01-01")
    assert b"Nothing matches these filters" in future.data
    bad = client.get("/audit/?since=yesterday")
    assert bad.status_code == 200 and b"is not a date" in bad.data

    export = client.get("/audit/export.csv?object_type=agent")
    assert export.status_code == 200 and export.mimetype == "text/csv"
    rows = list(csv.reader(io.StringIO(export.get_data(as_text=True))))
    assert rows[0][:4] == ["id", "created_at", "actor", "action"]
    assert len(rows) == 31 and all(r[4] == "agent" for r in rows[1:])
    assert not any("Foreign agent" in ",".join(r) for r in rows)
    drain(app)
    exports = _entries(db, tenant.id, action="export", object_type="audit_log")
    assert len(exports) == 1 and exports[0].actor_label == admin.email


def test_login_password_is_never_recorded(app, client, db, worker, office):
    tenant, admin, _ = office
    login(client, admin)
    drain(app)
    for entry in _entries(db, tenant.id):
        assert PASSWORD not in str(entry.details)
        assert "password_hash" not in str(entry.details)
