"""In a real browser: meters move live and a pushed change shows without a poll (issue 20, §2).

A simulated receiver pushes SAMPLE lines ten times a second and a REP when its battery
changes; the devices page is never reloaded and no poll runs after the first one.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.browser import chromium, login_page
from tests.conftest import PASSWORD
from tests.test_device_meters import app, mic, stage, worker  # noqa: F401 - fixtures

pytestmark = pytest.mark.browser


def test_meters_move_and_a_pushed_battery_change_shows_without_a_poll(
    app,  # noqa: F811
    db,
    stage,  # noqa: F811
    live_server,
):
    tenant, admin, receiver = stage
    device = mic(db, tenant.id, 1)
    with chromium() as browser:
        page = login_page(browser, live_server.url, admin.email, PASSWORD)
        page.goto(live_server.url + "/devices/")
        page.locator("#live").wait_for(state="attached")
        rf = page.locator(f"#rf-meter-{device.id} meter")
        expect(rf).not_to_have_attribute("value", "0")  # the first meter frame arrived
        seen = set()
        for _ in range(10):
            seen.add(rf.get_attribute("title"))
            page.wait_for_timeout(150)
        assert len(seen) >= 3, seen  # it moves: RF drifts and jitters between frames

        card = page.locator(f"#device-card-{device.id}")
        expect(card.locator(".battery")).to_have_attribute("title", "5 of 5 bars")
        receiver.set_battery(1, 1, 42)
        expect(card.locator(".battery")).to_have_attribute("title", "1 of 5 bars", timeout=3000)
        expect(rf).not_to_have_attribute("value", "0")  # the swapped card keeps its meters
