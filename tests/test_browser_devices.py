"""In a real browser: a receiver that stops answering turns offline on the dashboard, live.

The whole path is real: a simulated Shure receiver on a loopback port, the Shure client
polling it over TCP, the lifecycle events through the spine, the frame over /ws/live.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from models.devices import Device
from services.manufacturers.simulator import SimulatedReceiver, attach_endpoints
from tests.browser import chromium, login_page
from tests.conftest import PASSWORD
from tests.test_shure import app, poll, venue, worker  # noqa: F401 - fixtures

pytestmark = pytest.mark.browser


def test_dashboard_shows_a_receiver_going_offline_without_a_reload(
    app,  # noqa: F811
    db,
    worker,  # noqa: F811
    venue,  # noqa: F811
    live_server,
):
    tenant, admin, stage = venue
    receiver = SimulatedReceiver("ULXD4D", device_id="FOH-RACK-1", seed=3)
    newcomer = SimulatedReceiver("QLXD4", device_id="BACKSTAGE-7", seed=4)
    try:
        attach_endpoints(tenant.id, [receiver.address], location_id=stage.id)
        db.session.commit()
        poll(app, db, tenant.id)  # discovery: the receiver and its transmitters appear
        device = db.session.scalar(select(Device).where(Device.api_device_id == "FOH-RACK-1"))
        assert device is not None and device.is_online

        with chromium() as browser:
            page = login_page(browser, live_server.url, admin.email, PASSWORD)
            page.goto(live_server.url + "/devices/")
            page.locator("#live").wait_for(state="attached")
            card = page.locator(f"#device-card-{device.id}")
            expect(card).to_have_attribute("data-online", "true")
            expect(card.locator(".badge")).to_have_text("online")
            loads = []
            page.on("load", lambda _: loads.append(page.url))

            receiver.drop()
            poll(app, db, tenant.id)  # one missed poll: not offline yet (no flapping)
            page.wait_for_timeout(500)
            expect(card).to_have_attribute("data-online", "true")
            poll(app, db, tenant.id)  # the second: offline

            expect(card).to_have_attribute("data-online", "false")
            expect(card.locator(".badge")).to_have_text("offline")

            # A receiver discovered while the page is open: the page says so, with a link.
            attach_endpoints(tenant.id, [receiver.address, newcomer.address], location_id=stage.id)
            db.session.commit()
            poll(app, db, tenant.id)
            expect(page.locator("#devices-new")).to_contain_text("New devices were discovered")
            assert loads == []
            page.locator("#devices-new a").click()
            expect(page.locator("#device-grid")).to_contain_text("BACKSTAGE")
    finally:
        receiver.stop()
        newcomer.stop()
