"""The ground everything stands on: start-up configuration, login everywhere, CSRF, cookies,
health, the vendored front-end files and the account CLI."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select

from models.accounts import User
from tests.conftest import csrf_token_from, login

ROOT = Path(__file__).resolve().parent.parent


def _flask(args: list[str], env: dict[str, str], cwd: Path, stdin: str | None = None):
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": str(cwd)}
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", *args],
        cwd=ROOT,
        env={**base, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_production_mode_refuses_to_start_without_a_secret_key(tmp_path):
    result = _flask(
        ["routes"],
        {
            "REDIS_URL": "redis://127.0.0.1:6379/0",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
            "SWITCHBOARD_INSTANCE": str(tmp_path / "instance"),
        },
        tmp_path,
    )
    assert result.returncode == 1
    assert "SECRET_KEY is not set" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_setting_is_named_not_a_traceback(tmp_path):
    result = _flask(
        ["routes"],
        {"FEED_PAGE_SIZE": "lots", "SWITCHBOARD_INSTANCE": str(tmp_path / "instance")},
        tmp_path,
    )
    assert result.returncode == 1
    assert "FEED_PAGE_SIZE must be a whole number" in result.stderr
    assert "Traceback" not in result.stderr


def test_embedded_mode_generates_a_secret_key_once_and_keeps_it(tmp_path):
    instance = tmp_path / "instance"
    env = {"SWITCHBOARD_INSTANCE": str(instance)}
    code = "from app import create_app; print(create_app().config['SECRET_KEY'])"
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    keys = [
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        for _ in range(2)
    ]
    assert len(keys[0]) >= 32 and keys[0] == keys[1]
    stored = [p for p in instance.iterdir() if p.read_text().strip() == keys[0]]
    assert stored and oct(stored[0].stat().st_mode & 0o777) == "0o600"


def test_every_page_but_login_requires_a_user(app, client):
    open_paths = {"/login", "/healthz", "/metrics", "/static/<path:filename>"}
    checked = 0
    for rule in app.url_map.iter_rules():
        if "GET" not in rule.methods or rule.arguments or rule.rule in open_paths:
            continue
        if rule.rule.startswith("/ws/") or rule.rule.startswith("/api/"):
            continue  # sockets refuse with 1008; the API answers 401 (tested in test_api)
        response = client.get(rule.rule)
        assert response.status_code in (302, 303), rule.rule
        assert "/login" in response.headers["Location"], rule.rule
        checked += 1
    assert checked >= 10


def test_login_logout_and_wrong_password(app, client, factory):
    user = factory.user(email="sam@example.com")
    page = client.get("/login")
    response = client.post(
        "/login",
        data={
            "email": "sam@example.com",
            "password": "not the password",
            "csrf_token": csrf_token_from(page.data),
        },
    )
    assert response.status_code == 401 and b"Wrong email or password." in response.data
    login(client, user)
    assert client.get("/").status_code == 200
    home = client.get("/")
    response = client.post("/logout", data={"csrf_token": csrf_token_from(home.data)})
    assert response.status_code == 303
    assert client.get("/").status_code in (302, 303)


def test_csrf_is_required_on_forms_and_htmx_requests(app, client, factory):
    user = factory.user()
    login(client, user)
    home = client.get("/")
    token = csrf_token_from(home.data)
    # The token is configured once in base.html as an htmx request header.
    assert b"X-CSRFToken" in home.data
    assert client.post("/notifications/read-all").status_code == 400
    refused = client.post("/notifications/read-all", headers={"HX-Request": "true"})
    assert refused.status_code == 400 and b"Traceback" not in refused.data
    accepted = client.post(
        "/notifications/read-all", headers={"HX-Request": "true", "X-CSRFToken": token}
    )
    assert accepted.status_code in (200, 204, 303)


def test_session_cookie_is_secure_unless_debugging(tmp_path, monkeypatch):
    from config import Config

    monkeypatch.setenv("SWITCHBOARD_INSTANCE", str(tmp_path))
    monkeypatch.delenv("SESSION_COOKIE_SECURE", raising=False)
    monkeypatch.delenv("FLASK_DEBUG", raising=False)
    config = Config()
    assert config.SESSION_COOKIE_SECURE is True and config.SESSION_COOKIE_HTTPONLY is True
    assert config.SESSION_COOKIE_SAMESITE == "Lax"
    monkeypatch.setenv("FLASK_DEBUG", "1")
    assert Config().SESSION_COOKIE_SECURE is False


def test_healthz_reports_database_broker_and_live_bus(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "broker", "live_bus"}
    assert body["checks"]["database"]["backend"] == "sqlite"


def test_vendored_files_match_their_recorded_checksums():
    vendor = ROOT / "static" / "vendor"
    rows = [
        line.split()
        for line in (vendor / "VERSIONS").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {row[0] for row in rows} >= {"htmx-4.0.1.min.js", "hx-ws-4.0.1.min.js"}
    for name, *_, digest in rows:
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name


def test_users_create_prompts_for_the_password_and_demo_load_is_idempotent(app, db, runner):
    result = runner.invoke(
        args=["users", "create", "--email", "new@example.com", "--tenant", "Acme", "--role",
              "admin"],
        input="a long password\na long password\n",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    user = db.session.scalar(select(User).where(User.email == "new@example.com"))
    assert user.role == "admin" and user.check_password("a long password")
    duplicate = runner.invoke(
        args=["users", "create", "--email", "new@example.com", "--tenant", "Acme"],
        input="a long password\na long password\n",
    )
    assert duplicate.exit_code != 0 and "Traceback" not in duplicate.output

    counts = []
    for _ in range(2):
        result = runner.invoke(args=["demo", "load"])
        assert result.exit_code == 0, result.output
        db.session.expire_all()
        counts.append(
            {
                table.name: db.session.scalar(select(func.count()).select_from(table))
                for table in db.metadata.sorted_tables
                if table.name not in ("outbox", "processed_events", "audit_logs")
            }
        )
    assert counts[0] == counts[1]  # a second load adds nothing
    assert counts[0]["devices"] > 0 and counts[0]["chats"] > 0 and counts[0]["projects"] > 0


def test_other_tenants_objects_are_404_by_url(app, db, client, runner, factory):
    from models.chats import Chat
    from models.devices import Device
    from models.projects import Project, ProjectFile

    assert runner.invoke(args=["demo", "load"]).exit_code == 0
    demo = [
        f"/chats/{db.session.scalar(select(Chat.id).limit(1))}",
        f"/devices/{db.session.scalar(select(Device.id).limit(1))}",
        f"/projects/{db.session.scalar(select(Project.id).limit(1))}",
    ]
    file_id = db.session.scalar(select(ProjectFile.id).limit(1))
    if file_id:
        demo.append(f"/projects/files/{file_id}")
    login(client, factory.user(factory.tenant("Outsider")))
    for path in demo:
        assert client.get(path).status_code == 404, path
