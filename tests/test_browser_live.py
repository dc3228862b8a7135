"""In a real browser: the console's live pieces update without a reload."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from playwright.sync_api import expect

from events import emit
from tests.browser import chromium, login_page
from tests.conftest import PASSWORD

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def admin(factory):
    return factory.user(factory.tenant("Browser Co"), role="admin", email="ops@browser.example")


def test_home_feed_shows_a_change_made_by_another_process(
    app, worker, live_server, admin, tmp_path
):
    with chromium() as browser:
        page = login_page(browser, live_server.url, admin.email, PASSWORD)
        page.wait_for_selector("#feed-list")
        page.locator("#live").wait_for(state="attached")
        # Another process (the CLI) commits a change to the same database; the web process's
        # relay picks the event up and the open page shows it without a reload.
        env = dict(
            os.environ,
            DATABASE_URL=app.config["SQLALCHEMY_DATABASE_URI"],
            SECRET_KEY=app.config["SECRET_KEY"],
            SWITCHBOARD_INSTANCE=str(tmp_path / "cli-instance"),
            PYTHONPATH=str(ROOT),
        )
        env.pop("REDIS_URL", None)
        result = subprocess.run(
            [
                sys.executable, "-m", "flask", "--app", "wsgi", "users", "create",
                "--email", "newhire@browser.example", "--tenant", "Browser Co",
                "--role", "agent", "--password", "long enough pw",
            ],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        item = page.locator("#feed-list li", has_text="newhire@browser.example")
        item.wait_for(timeout=15_000)
        assert page.url == live_server.url + "/"  # no navigation happened


def test_bell_count_updates_live(app, worker, live_server, admin):
    with chromium() as browser:
        page = login_page(browser, live_server.url, admin.email, PASSWORD)
        bell = page.locator("#bell .bell-count")
        page.locator("#live").wait_for(state="attached")
        assert bell.inner_text().strip() == ""
        page.wait_for_timeout(300)  # the socket is open and its snapshot applied
        with app.app_context():
            from extensions import db

            for chat_id in (1, 2):
                emit(
                    "escalation.triggered",
                    tenant_id=admin.tenant_id,
                    entity="chat",
                    entity_id=chat_id,
                    payload={"excerpt": "angry visitor"},
                )
            db.session.commit()
        expect(bell).to_have_text("2", timeout=15_000)
        # Reading one from the notifications page brings the count down everywhere.
        other = page.context.new_page()
        other.goto(live_server.url + "/notifications/")
        other.locator("button", has_text="Mark read").first.click()
        other.wait_for_load_state()
        expect(bell).to_have_text("1", timeout=15_000)
