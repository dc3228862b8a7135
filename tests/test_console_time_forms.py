"""Issue 22 §3, §5, §6: timestamps a browser can localise, forms that keep what was typed,
settings validated field by field, a confirmation before deleting, charts with values, a demo
with a month of history, and a `make run` that says the login once and keeps its receivers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from models.base import utcnow
from tests.conftest import csrf_token_from, drain, free_port, login

ROOT = Path(__file__).resolve().parent.parent
TIME_TAG = re.compile(r"<time\b[^>]*>")


@pytest.fixture
def demo(app, db, worker):
    """The demo tenant with a notification and a webhook delivery, events handled."""
    from models.accounts import User
    from models.notifications import Notification
    from models.webhooks import WebhookDelivery, WebhookEndpoint
    from services.demo import load_demo

    result = load_demo()
    db.session.commit()
    admin = db.session.scalar(select(User).where(User.email == result.email))
    endpoint = WebhookEndpoint(
        tenant_id=admin.tenant_id, url="https://hooks.example.com/x", topics=["test.nothing"]
    )
    db.session.add(endpoint)
    db.session.flush()
    db.session.add(
        WebhookDelivery(
            tenant_id=admin.tenant_id,
            endpoint_id=endpoint.id,
            event_pk=1,
            event_id=uuid.uuid4(),
            topic="device_record.updated",
            webhook_id=f"msg_{uuid.uuid4().hex}",
            attempt=1,
            status_code=200,
            latency_ms=5,
            succeeded=True,
        )
    )
    db.session.add(
        Notification(
            tenant_id=admin.tenant_id,
            recipient_id=admin.id,
            type="device.offline",
            title="FOH went offline",
            body="",
            link="/devices/",
        )
    )
    db.session.commit()
    drain(app)
    client = app.test_client()
    login(client, admin, result.password)
    return {"client": client, "admin": admin, "endpoint_id": endpoint.id}


# ------------------------------------------------------------------ §3 time


def test_every_timestamp_names_its_utc_instant_for_the_browser(demo, db):
    from models.projects import Project

    project_id = db.session.scalar(select(Project.id))
    client = demo["client"]
    pages = [
        "/",
        "/notifications/",
        "/projects/",
        f"/projects/{project_id}",
        "/audit/",
        f"/webhooks/{demo['endpoint_id']}",
    ]
    seen = 0
    for path in pages:
        html = client.get(path).get_data(as_text=True)
        tags = TIME_TAG.findall(html)
        assert tags, f"{path} shows no time"
        for tag in tags:
            seen += 1
            # An instant the browser can parse without guessing the zone, and the zone on hover.
            assert re.search(r'datetime="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"', tag), (path, tag)
            assert re.search(r'title="\d{4}-\d\d-\d\d \d\d:\d\d(:\d\d)? UTC"', tag), (path, tag)
    assert seen >= len(pages)
    # The script that shows them in the browser's zone is the app's own file (CSP 'self').
    html = client.get("/").get_data(as_text=True)
    assert '<script src="/static/js/console.js" defer></script>' in html
    script = client.get("/static/js/console.js")
    assert script.status_code == 200 and b"htmx:after:settle" in script.data
    script.close()


# ------------------------------------------------------------------ §3 forms


def test_project_create_form_keeps_what_was_typed(app, db, factory):
    from models.projects import Project

    client = app.test_client()
    login(client, factory.user())
    token = csrf_token_from(client.get("/projects/").data)
    typed = "Our <b>billing</b> service, version two"
    response = client.post(
        "/projects/", data={"csrf_token": token, "name": "", "description": typed}
    )
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert "Our &lt;b&gt;billing&lt;/b&gt; service, version two" in html
    assert 'class="field-error"' in html and "Enter a name" in html
    long_name = "N" * 121
    response = client.post(
        "/projects/", data={"csrf_token": token, "name": long_name, "description": ""}
    )
    assert response.status_code == 422
    assert f'value="{long_name}"' in response.get_data(as_text=True)
    assert db.session.scalar(select(func.count()).select_from(Project)) == 0


def test_generate_form_keeps_the_prompt(app, db, factory):
    from models.projects import GeneratedProject
    from services.projects import create_project

    user = factory.user()
    project = create_project(user.tenant_id, "API", "")
    db.session.commit()
    client = app.test_client()
    login(client, user)
    token = csrf_token_from(client.get(f"/projects/{project.id}").data)
    prompt = "A todo API " + "with tests " * 400  # past the 4000-character limit
    response = client.post(
        f"/projects/{project.id}/generate", data={"csrf_token": token, "prompt": prompt}
    )
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert prompt.strip() in html
    assert 'class="field-error"' in html and "4000" in html
    empty = client.post(f"/projects/{project.id}/generate", data={"csrf_token": token})
    assert empty.status_code == 422 and "Describe the project" in empty.get_data(as_text=True)
    assert db.session.scalar(select(func.count()).select_from(GeneratedProject)) == 0


@pytest.mark.parametrize(
    "topics",
    ["not a valid pattern!!", "chat.", "..", "chat.[created", "Chat.Created", "chat!.created"],
)
def test_webhook_topic_patterns_are_validated(app, db, factory, topics):
    from models.webhooks import WebhookEndpoint

    client = app.test_client()
    login(client, factory.user(role="admin"))
    token = csrf_token_from(client.get("/webhooks/").data)
    response = client.post(
        "/webhooks/",
        data={"csrf_token": token, "url": "https://93.184.215.14/in", "topics": topics},
    )
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert re.search(r'name="topics" value="[^"]*"', html)
    assert 'class="field-error"' in html and "topic pattern" in html
    assert db.session.scalar(select(func.count()).select_from(WebhookEndpoint)) == 0


def test_webhook_topic_patterns_that_name_events_are_saved(app, db, factory):
    from models.webhooks import WebhookEndpoint

    client = app.test_client()
    login(client, factory.user(role="admin"))
    token = csrf_token_from(client.get("/webhooks/").data)
    response = client.post(
        "/webhooks/",
        data={
            "csrf_token": token,
            "url": "https://93.184.215.14/in",
            "topics": "chat.*, device_record.updated *.deleted project.generation_[cf]*",
        },
    )
    assert response.status_code == 303
    endpoint = db.session.scalar(select(WebhookEndpoint))
    assert endpoint.topics == [
        "chat.*",
        "device_record.updated",
        "*.deleted",
        "project.generation_[cf]*",
    ]


def test_deleting_a_webhook_asks_first(app, db, factory):
    from models.webhooks import WebhookEndpoint

    user = factory.user(role="admin")
    endpoint = WebhookEndpoint(
        tenant_id=user.tenant_id, url="https://hooks.example.com/keep", topics=["*"]
    )
    db.session.add(endpoint)
    db.session.commit()
    endpoint_id = endpoint.id
    client = app.test_client()
    login(client, user)
    detail = client.get(f"/webhooks/{endpoint_id}").get_data(as_text=True)
    token = csrf_token_from(detail.encode())
    # The endpoint page's button leads to a question, not straight to the deletion.
    assert f'href="/webhooks/{endpoint_id}/delete"' in detail
    question = client.get(f"/webhooks/{endpoint_id}/delete")
    assert question.status_code == 200
    html = question.get_data(as_text=True)
    assert "https://hooks.example.com/keep" in html and 'name="confirm"' in html
    # A post without the answer (an old form, a stray request) deletes nothing.
    unconfirmed = client.post(f"/webhooks/{endpoint_id}/delete", data={"csrf_token": token})
    assert unconfirmed.status_code == 200
    db.session.expire_all()
    assert db.session.get(WebhookEndpoint, endpoint_id) is not None
    confirmed = client.post(
        f"/webhooks/{endpoint_id}/delete", data={"csrf_token": token, "confirm": "delete"}
    )
    assert confirmed.status_code == 303
    db.session.expire_all()
    assert db.session.get(WebhookEndpoint, endpoint_id) is None


def test_receiver_host_and_port_get_field_errors(app, db, factory):
    from services.demo import load_demo

    load_demo()
    db.session.commit()
    user = factory.user(role="admin")
    client = app.test_client()
    login(client, user)
    page = client.get("/devices/settings").get_data(as_text=True)
    token = csrf_token_from(page.encode())
    manufacturer = re.search(r'name="ep-manufacturer_id"[^>]*>\s*<option[^>]*value="(\d+)"', page)
    response = client.post(
        "/devices/settings",
        data={
            "csrf_token": token,
            "action": "endpoint",
            "ep-manufacturer_id": manufacturer.group(1),
            "ep-host": "not a host!!",
            "ep-port": "70000",
            "ep-location_id": "0",
        },
    )
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    errors = re.findall(r'<p class="field-error">([^<]+)</p>', html)
    assert any("between 1 and 65535" in e for e in errors), errors
    assert len(errors) >= 2, errors
    assert 'value="not a host!!"' in html


# ------------------------------------------------------------------ §5 charts


def test_metric_charts_have_axis_values_and_hover_values(app, db, factory):
    from services import metrics

    user = factory.user()
    today = metrics.today()
    for days_ago, chats in ((0, 4), (3, 12), (9, 7)):
        metrics.increment(
            metrics.CHATS_CREATED, user.tenant_id, today - timedelta(days=days_ago), None, chats
        )
    db.session.commit()
    client = app.test_client()
    login(client, user)
    html = client.get("/metrics/dashboard?days=30").get_data(as_text=True)
    chats_svg = re.search(r'<svg[^>]*aria-label="Chats per day".*?</svg>', html, re.S).group(0)
    # Y-axis ticks: 0 and the top of the scale at least, written as numbers on the axis.
    ticks = re.findall(r'<text[^>]*class="tick"[^>]*>([^<]+)</text>', chats_svg)
    assert "0" in ticks and any(float(t) >= 12 for t in ticks), ticks
    # A hover value per day, including the empty ones.
    titles = re.findall(r"<title>([^<]+)</title>", chats_svg)
    assert len(titles) == 30
    day = (today - timedelta(days=3)).isoformat()
    assert f"{day}: 12 chats" in titles
    # The range selector says which range is shown.
    assert re.search(r'<a [^>]*aria-current="page"[^>]*>\s*30 days', html)
    for n in (7, 90):
        assert f'href="/metrics/dashboard?days={n}"' in html


def test_chart_labels_are_escaped(app):
    from services.charts import Series, line_chart
    from services.metrics import share_bar

    with app.test_request_context():
        share = str(share_bar([("<script>x</script>", 3)], "Mix"))
        line = str(line_chart([Series('"><img src=x>', [(utcnow(), 1.0)], "#123456", 10)]))
    assert "<script>x</script>" not in share and "&lt;script&gt;" in share
    assert "<img" not in line and "&lt;img" in line


def test_device_chart_has_each_scale_and_point_values(app):
    """The device page's chart: battery bars (0-5) on the left, RF % (0-100) on the right."""
    from services.charts import Series, line_chart

    now = utcnow().replace(second=0, microsecond=0)
    readings = [(now - timedelta(minutes=10 * i), i % 6) for i in range(12)]
    with app.test_request_context():
        svg = str(
            line_chart(
                [
                    Series("Battery bars", readings, "#1a7f46", 5),
                    Series("RF strength", [(t, 20.0 * v) for t, v in readings], "#2f5bea", 100),
                ]
            )
        )
    left = re.findall(r'<text class="tick"[^>]*text-anchor="end">([^<]+)</text>', svg)
    right = re.findall(
        r'<text class="tick" x="\d+" y="[\d.]+" font-size="11" fill="#2f5bea">([^<]+)<', svg
    )
    assert left[0] == "0" and left[-1] == "5", left
    assert right[0] == "0" and right[-1] == "100", right
    assert f"<title>RF strength, {now:%Y-%m-%d %H:%M} UTC: 0</title>" in svg
    assert svg.count("<title>Battery bars, ") == 12


# ------------------------------------------------------------------ §6 first run


def test_demo_has_a_month_of_metrics_once(app, db):
    from services import metrics
    from services.demo import DEMO_TENANT, load_demo

    load_demo()
    db.session.commit()
    load_demo()
    db.session.commit()
    from models.accounts import Tenant

    tenant_id = db.session.scalar(select(Tenant.id).where(Tenant.name == DEMO_TENANT))
    first = metrics.dashboard(tenant_id, 30)
    end = metrics.today()
    series = metrics.daily_series(metrics.CHATS_CREATED, tenant_id, end - timedelta(days=29), end)
    assert len([d for d, v in series.items() if sum(v.values()) > 0]) >= 20
    assert first["totals"]["messages"] > first["totals"]["chats"] > 30
    # Loading again (every `make run`) adds no second history.
    load_demo()
    db.session.commit()
    assert metrics.dashboard(tenant_id, 30)["totals"] == first["totals"]


def _make_run_commands(port: int) -> str:
    """The shell commands of `make run` (without the install step)."""
    out = subprocess.run(
        ["make", "-s", "-n", "-o", ".venv/.installed", "run", f"PORT={port}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "pip install" not in out
    return out


def _run_until_serving(commands: str, env: dict[str, str]) -> str:
    """Run `make run`'s commands until the server listens, then stop it; the output."""
    process = subprocess.Popen(
        ["bash", "-ec", commands],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if "Running on http" in line:
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert serving.wait(90), "".join(lines)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        reader.join(5)
        process.stdout.close()
    return "".join(lines)


def test_make_run_says_the_login_once_and_keeps_the_receivers(tmp_path):
    port = free_port()
    commands = _make_run_commands(port)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "FLASK_APP")
    }
    env["SWITCHBOARD_INSTANCE"] = str(tmp_path)
    first = _run_until_serving(commands, env)
    assert first.count("Log in as admin@demo.example / switchboard-demo") == 1, first
    assert f"Switchboard on http://127.0.0.1:{port}/" in first
    receivers = re.search(r"simulated Shure receivers[^:]*: (.+)", first).group(1)
    second = _run_until_serving(commands, env)
    assert second.count("Log in as admin@demo.example") == 1, second
    assert re.search(r"simulated Shure receivers[^:]*: (.+)", second).group(1) == receivers

    # Nothing piles up on Device settings: the second run reused the first run's endpoints.
    import sqlite3

    with sqlite3.connect(tmp_path / "switchboard.db") as conn:
        rows = conn.execute("select host, port, enabled from device_endpoints").fetchall()
    assert len(rows) == 4 and all(enabled for _, _, enabled in rows), rows
