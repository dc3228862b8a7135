"""In Chromium: times shown in the reader's zone, and charts whose values can be read.

The browser runs in São Paulo (UTC-3, no daylight saving time since 2019) while the server
keeps UTC, so every time on the page must move by three hours.
"""

from __future__ import annotations

import re
from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from tests.browser import chromium
from tests.conftest import LiveServer, make_app

pytestmark = pytest.mark.browser

ZONE = "America/Sao_Paulo"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from extensions import db
    from models.accounts import User
    from models.base import utcnow
    from models.notifications import Notification
    from services.demo import load_demo

    app = make_app(tmp_path_factory.mktemp("charts"))
    with app.app_context():
        db.create_all()
        demo = load_demo()
        db.session.commit()
        admin = db.session.scalar(select(User).where(User.email == demo.email))
        now = utcnow().replace(microsecond=0)
        # One from a few minutes ago and one from two days ago, two hours past UTC midnight
        # (the evening before in São Paulo: the day differs between the zones).
        recent = now - timedelta(minutes=5)
        older = (now - timedelta(days=2)).replace(hour=2, minute=7, second=0)
        for title, at in (("Recent alert", recent), ("Older alert", older)):
            db.session.add(
                Notification(
                    tenant_id=admin.tenant_id,
                    recipient_id=admin.id,
                    type="device.offline",
                    title=title,
                    body="",
                    link="/devices/",
                    created_at=at,
                )
            )
        db.session.commit()
    server = LiveServer(app).start()
    try:
        with chromium() as browser:
            yield {
                "url": server.url,
                "browser": browser,
                "demo": (demo.email, demo.password),
                "recent": recent,
                "older": older,
            }
    finally:
        server.stop()
        app.extensions["switchboard.tasks"].stop()
        with app.app_context():
            db.engine.dispose()


def _signed_in(site, who, **context_options):
    context = site["browser"].new_context(**context_options)
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.goto(site["url"] + "/login")
    email, password = site[who]
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(site["url"] + "/")
    return context, page


def test_times_are_shown_in_the_browsers_zone(site):
    context, page = _signed_in(site, "demo", timezone_id=ZONE, locale="en-US")
    try:
        page.goto(site["url"] + "/notifications/")
        zone = ZoneInfo(ZONE)
        local_recent = site["recent"].astimezone(zone)
        local_older = site["older"].astimezone(zone)
        recent = page.locator("main li", has_text="Recent alert").locator("time")
        older = page.locator("main li", has_text="Older alert").locator("time")
        # Today's row: the local time of day only (12-hour clock in en-US).
        expect(recent).to_have_text(re.compile(rf"^{local_recent:%I:%M} [AP]M$"))
        # Another day: the local date too, which here is the day before the UTC date.
        expect(older).to_have_text(
            re.compile(rf"^{local_older:%b} {local_older.day}, {local_older:%I:%M} [AP]M$")
        )
        assert local_older.day != site["older"].day
        title = older.get_attribute("title")
        assert ZONE in title and f"{site['older']:%Y-%m-%d %H:%M}" in title and "UTC" in title
        # Content that arrives later (an htmx swap, a live frame) is localised as it lands.
        page.evaluate(
            """(at) => {
                const time = document.createElement("time");
                time.id = "late"; time.setAttribute("datetime", at); time.textContent = "raw";
                document.querySelector("main").append(time);
            }""",
            f"{site['older']:%Y-%m-%dT%H:%M:%SZ}",
        )
        expect(page.locator("#late")).to_have_text(older.text_content())
    finally:
        context.close()


def test_chart_bars_answer_hover_with_their_value(site):
    context, page = _signed_in(site, "demo", viewport={"width": 390, "height": 844})
    try:
        frames: list = []
        page.on("websocket", lambda ws: ws.on("framereceived", lambda data: frames.append(data)))
        page.goto(site["url"] + "/metrics/dashboard?days=30")
        # The live socket's snapshot replaces the chart: an element found before it came is
        # gone from the page by the time it is hovered.
        for _ in range(200):
            if frames:
                break
            page.wait_for_timeout(50)
        assert frames, "the page's live socket sent no snapshot"
        page.wait_for_timeout(50)  # and htmx has swapped it in
        chart = page.locator('svg[aria-label="Chats per day"]')
        expect(chart).to_be_visible()
        assert chart.locator("text.tick").count() >= 2
        # The pointer over an empty-looking spot of a day's column finds that day's title.
        chart.scroll_into_view_if_needed()
        box = chart.bounding_box()
        found = page.evaluate(
            """([x, y]) => {
                const hit = document.elementFromPoint(x, y);
                const group = hit && hit.closest("g");
                const title = group && group.querySelector("title");
                return title ? title.textContent : null;
            }""",
            [box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.2],
        )
        assert found and re.fullmatch(r"\d{4}-\d\d-\d\d: \d+ chats", found), found
        width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1]
        page.get_by_role("link", name="7 days").click()
        expect(page.get_by_role("link", name="7 days")).to_have_attribute("aria-current", "page")
        expect(page.locator('svg[aria-label="Chats per day"] title')).to_have_count(7)
    finally:
        context.close()
