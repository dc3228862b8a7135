"""In a real browser: a generation started from the project page finishes on screen, live."""

from __future__ import annotations

import json

import pytest
from playwright.sync_api import expect

from models.projects import Project
from services import projects
from services.live import publish, render_fragment, tenant_topic
from tests.browser import chromium, login_page
from tests.conftest import PASSWORD, drain
from tests.fake_openai import FakeOpenAI, Script

pytestmark = pytest.mark.browser

FILES = {
    "files": [
        {"path": "app.py", "content": "from flask import Flask\napp = Flask(__name__)\n"},
        {"path": "tests/test_app.py", "content": "def test_ok():\n    assert True\n"},
    ]
}


@pytest.fixture
def slow_model(app):
    # The model takes a moment, so the page is seen before the generation completes.
    fake = FakeOpenAI(Script(json_reply=json.dumps(FILES), stall_seconds=2.0)).start()
    app.config.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="test-key")
    yield fake
    fake.stop()


def test_generation_moves_to_completed_without_a_reload(
    app, db, worker, live_server, factory, slow_model
):
    user = factory.user(factory.tenant("Makers"), email="maker@example.com")
    project = Project(tenant_id=user.tenant_id, name="Todo API")
    db.session.add(project)
    db.session.commit()
    with chromium() as browser:
        page = login_page(browser, live_server.url, user.email, PASSWORD)
        page.goto(f"{live_server.url}/projects/{project.id}")
        page.fill("textarea[name=prompt]", "A Flask todo API with tests")
        page.click("button:has-text('Generate')")
        page.wait_for_url(f"{live_server.url}/projects/{project.id}")
        page.locator("#live").wait_for(state="attached")
        badge = page.locator(".generation .badge").first
        expect(badge).to_have_text("generating")
        loads = []
        page.on("load", lambda _: loads.append(page.url))
        expect(badge).to_have_text("completed")
        # The files appeared in the tree, and the page never reloaded to show them.
        expect(page.locator(".generation")).to_contain_text("test_app.py")
        assert loads == []
        # The export buttons arrived in that pushed fragment; their form is accepted (the
        # page's CSRF token goes with it) and the export is built.
        page.click("button:has-text('Export as zip')")
        page.wait_for_url(f"{live_server.url}/projects/{project.id}")
        expect(page.locator(".exports li").first).to_contain_text("zip")
        expect(page.locator(".exports li a:has-text('Download')").first).to_be_visible()


def test_a_late_created_frame_does_not_show_a_generation_twice(
    app, db, worker, live_server, factory
):
    """The page's snapshot already shows a generation when the frame announcing it arrives
    (its handler ran late, on a busy machine): the card is shown once, not twice."""
    user = factory.user(factory.tenant("Makers"), email="maker@example.com")
    project = Project(tenant_id=user.tenant_id, name="Todo API")
    db.session.add(project)
    db.session.commit()
    generated = projects.start_generation(project, "A Flask todo API")
    db.session.commit()
    drain(app)  # its own `created` frame went out before the page opened
    with chromium() as browser:
        page = login_page(browser, live_server.url, user.email, PASSWORD)
        frames: list = []
        page.on("websocket", lambda ws: ws.on("framereceived", lambda data: frames.append(data)))
        page.goto(f"{live_server.url}/projects/{project.id}")
        while not frames:  # the live snapshot: from here on the page follows the project
            page.wait_for_timeout(50)
        cards = page.locator(f"article#generation-{generated.id}")
        expect(cards).to_have_count(1)
        generated.status = "generating"
        db.session.commit()
        html = render_fragment(
            "projects/_live_push.html",
            item=projects.generation_panel(generated),
            project_id=project.id,
            created=True,
        )
        publish(tenant_topic(project.tenant_id, f"project:{project.id}"), "late", html=html)
        expect(cards.first.locator(".badge")).to_have_text("generating")
        expect(cards).to_have_count(1)
