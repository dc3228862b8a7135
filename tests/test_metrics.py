"""Domain metrics: DB counters, `/metrics`, the Metrics page and `flask chats metrics`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from blueprints.metrics.cli import metrics_command
from models.chats import Agent, Chat, Message
from models.events import OutboxEvent
from models.metrics import MetricCounter
from services import chats
from services import metrics as metrics_service
from tests.conftest import drain, login
from tests.helpers import stop_process, wait_for, worker_process_env

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "scrape-secret-token"


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def _scrape(client, token: str | None = TOKEN, addr: str = "10.1.2.3"):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.get("/metrics", headers=headers, environ_base={"REMOTE_ADDR": addr})


@pytest.fixture
def shop(app, db, factory):
    app.config["METRICS_TOKEN"] = TOKEN
    app.config["METRICS_ALLOWED_NETWORKS"] = "10.0.0.0/8"
    tenant = factory.tenant("Shop")
    agent = Agent(tenant_id=tenant.id, name="Helper", is_default=True)
    db.session.add(agent)
    db.session.commit()
    return tenant, agent


def _make_chats(db, tenant_id: int, n: int = 3) -> list[int]:
    ids = []
    for i in range(n):
        chat = chats.start_chat(tenant_id, visitor_id=f"visitor-{i:08d}")
        chats.add_message(chat, "visitor", "Hello there " * (i + 1))
        chats.add_message(chat, "operator", "Hi! How can I help?")
        ids.append(chat.id)
    db.session.commit()
    return ids


def _db_counts(db, tenant_id: int) -> tuple[int, int, int]:
    db.session.rollback()
    n_chats = db.session.scalar(
        select(func.count()).select_from(Chat).where(Chat.tenant_id == tenant_id)
    )
    n_messages = db.session.scalar(
        select(func.count()).select_from(Message).where(Message.tenant_id == tenant_id)
    )
    n_active = db.session.scalar(
        select(func.count())
        .select_from(Chat)
        .where(Chat.tenant_id == tenant_id, Chat.status == "active")
    )
    return n_chats, n_messages, n_active


def _assert_scrape_matches_db(text: str, db, tenant_id: int, agent_id: int) -> None:
    n_chats, n_messages, n_active = _db_counts(db, tenant_id)
    t = str(tenant_id)
    assert _sample(text, "chats_created_total", tenant_id=t, agent_id=str(agent_id)) == n_chats
    total_messages = sum(
        _sample(text, "messages_created_total", tenant_id=t, sender=s) or 0
        for s in metrics_service.SENDERS
    )
    assert total_messages == n_messages
    assert _sample(text, "active_chats", tenant_id=t) == n_active
    histogram_count = sum(
        _sample(text, "message_length_count", tenant_id=t, sender=s) or 0
        for s in metrics_service.SENDERS
    )
    assert histogram_count == n_messages


def test_counts_match_database_after_worker(app, db, shop, worker):
    tenant, agent = shop
    chat_ids = _make_chats(db, tenant.id)
    drain(app)
    response = _scrape(app.test_client())
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    _assert_scrape_matches_db(text, db, tenant.id, agent.id)
    assert (
        _sample(text, "message_length_bucket", tenant_id=str(tenant.id), sender="operator", le="25")
        == 3
    )
    # No unbounded label values: no chat id ever appears as a label value.
    label_values = set(re.findall(r'="([^"]*)"', text))
    labels_by_key = re.findall(r'(\w+)="([^"]*)"', text)
    assert {key for key, _ in labels_by_key} <= {
        "tenant_id",
        "agent_id",
        "sender",
        "le",
        "type",
        "outcome",
    }
    for chat_id in chat_ids:
        assert ("chat_id", str(chat_id)) not in labels_by_key
    assert not any(v.startswith("visitor-") for v in label_values)


def test_redelivered_event_counts_once(app, db, shop):
    from events.registry import Event, registry
    from tasks.broker import _run_group, _run_one

    tenant, agent = shop
    _make_chats(db, tenant.id, n=1)
    row = db.session.scalar(select(OutboxEvent).where(OutboxEvent.topic == "chat.created"))
    spec = registry.handlers["metrics.count"]
    event = Event.from_row(row)
    db.session.commit()
    assert _run_one(spec, event, 0) is True
    assert _run_one(spec, event, 0) is True  # a redelivery: the idempotency record wins
    _run_group("metrics", row.id)  # the whole group message delivered again
    total = db.session.scalar(
        select(func.sum(MetricCounter.value)).where(
            MetricCounter.name == metrics_service.CHATS_CREATED,
            MetricCounter.tenant_id == tenant.id,
        )
    )
    assert total == 1


def test_scrape_needs_token_or_allowlisted_address(app, shop):
    client = app.test_client()
    assert _scrape(client, token=None, addr="192.168.1.5").status_code == 403
    assert _scrape(client, token="wrong", addr="192.168.1.5").status_code == 403
    assert _scrape(client, token=TOKEN, addr="192.168.1.5").status_code == 200
    assert _scrape(client, token=None, addr="10.9.9.9").status_code == 200
    app.config["METRICS_TOKEN"] = None
    assert _scrape(client, token="", addr="192.168.1.5").status_code == 403


def test_scrape_needs_no_login_and_is_not_the_page(app, shop):
    response = _scrape(app.test_client(), token=None, addr="10.0.0.1")
    assert response.status_code == 200
    assert (
        b"# TYPE chats_created_total counter" in response.data or b"chats_created" in response.data
    )


def test_metrics_page_renders_charts_and_range_picker(app, db, shop, factory, worker):
    tenant, _ = shop
    _make_chats(db, tenant.id)
    drain(app)
    user = factory.user(tenant)
    client = app.test_client()
    login(client, user)
    page = client.get("/metrics/dashboard?days=7")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "<svg" in html
    for n in (7, 30, 90):
        assert f"days={n}" in html
    assert 'aria-current="page">7 days' in html
    assert "3 chats" in html
    bogus = client.get("/metrics/dashboard?days=12").get_data(as_text=True)
    assert 'aria-current="page">30 days' in bogus


def test_metrics_page_empty_state(app, shop, factory):
    tenant, _ = shop
    client = app.test_client()
    login(client, factory.user(tenant))
    html = client.get("/metrics/dashboard").get_data(as_text=True)
    assert "No chats in this range yet." in html
    assert client.get("/metrics/dashboard", follow_redirects=False).status_code == 200


def test_metrics_page_requires_login(app):
    response = app.test_client().get("/metrics/dashboard")
    assert response.status_code in (302, 303, 401)


def test_cli_prints_table_and_rejects_bad_days(app, db, shop, worker):
    tenant, _ = shop
    _make_chats(db, tenant.id)
    drain(app)
    runner = app.test_cli_runner()
    result = runner.invoke(metrics_command, ["--days", "7"])
    assert result.exit_code == 0, result.output
    assert "period start" in result.output
    total = [line for line in result.output.splitlines() if line.startswith("total")][0]
    n_chats, n_messages, _ = _db_counts(db, tenant.id)
    visitor = db.session.scalar(
        select(func.count()).select_from(Message).where(Message.sender == "visitor")
    )
    assert total.split()[1:4] == [str(n_chats), str(n_messages), str(visitor)]
    weekly = runner.invoke(
        metrics_command, ["--period", "weekly", "--days", "14", "--tenant", "Shop"]
    )
    assert weekly.exit_code == 0, weekly.output
    bad = runner.invoke(metrics_command, ["--days", "0"])
    assert bad.exit_code != 0
    assert "--days" in bad.output
    missing = runner.invoke(metrics_command, ["--tenant", "Nobody"])
    assert missing.exit_code != 0
    assert "No tenant" in missing.output


@pytest.mark.integration
def test_scrape_matches_database_after_separate_worker_process(prod_app, prod_factory, tmp_path):
    from extensions import db
    from models.events import ProcessedEvent

    cfg = prod_app.config
    cfg["METRICS_TOKEN"] = TOKEN
    env = worker_process_env(prod_app, tmp_path / "worker-instance")
    dramatiq_bin = shutil.which("dramatiq", path=str(Path(sys.executable).parent))
    worker = subprocess.Popen(
        [dramatiq_bin, "tasks.worker", "--processes", "1", "--threads", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        tenant = prod_factory.tenant("Prod shop")
        with prod_app.app_context():
            agent = Agent(tenant_id=tenant.id, name="Helper", is_default=True)
            db.session.add(agent)
            db.session.commit()
            agent_id = agent.id
            _make_chats(db, tenant.id, n=4)
            wanted = db.session.scalars(
                select(OutboxEvent.id).where(
                    OutboxEvent.topic.in_(("chat.created", "message.created"))
                )
            ).all()

            def processed() -> bool:
                db.session.rollback()
                done = db.session.scalar(
                    select(func.count())
                    .select_from(ProcessedEvent)
                    .where(
                        ProcessedEvent.handler == "metrics.count",
                        ProcessedEvent.event_id.in_(wanted),
                    )
                )
                return done == len(wanted)

            ok = wait_for(processed, timeout=45)
            if not ok and worker.poll() is not None:
                pytest.fail(worker.stderr.read().decode(errors="replace")[-2000:])
            assert ok, "the worker process did not count every event"
            # Let any follow-up messages (e.g. assistant replies) settle, then compare.
            wait_for(lambda: False, timeout=2)
            assert wait_for(
                lambda: _counted(db, tenant.id) == _db_counts(db, tenant.id)[:2], timeout=30
            )
            response = _scrape(prod_app.test_client())
            assert response.status_code == 200
            _assert_scrape_matches_db(response.get_data(as_text=True), db, tenant.id, agent_id)
    finally:
        stop_process(worker)


def _counted(db, tenant_id: int) -> tuple[int, int]:
    db.session.rollback()

    def total(name: str) -> int:
        return int(
            db.session.scalar(
                select(func.coalesce(func.sum(MetricCounter.value), 0)).where(
                    MetricCounter.name == name, MetricCounter.tenant_id == tenant_id
                )
            )
        )

    return total(metrics_service.CHATS_CREATED), total(metrics_service.MESSAGES_CREATED)
