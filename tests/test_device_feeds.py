"""Feeds that stay readable (issue 20, section 4): the activity page and its API."""

from __future__ import annotations

import re
import time

import pytest
from itsdangerous import URLSafeTimedSerializer
from sqlalchemy import select

from models.accounts import User
from models.devices import ActivityLog
from services.api_tokens import issue_token
from tests.conftest import drain, login


@pytest.fixture
def feed(app, db, factory):
    tenant = factory.tenant("Venue")
    admin = factory.user(tenant, role="admin")
    for n in range(30):  # a poll every 10 s: bookkeeping between what matters
        db.session.add(
            ActivityLog(tenant_id=tenant.id, activity_type="sync", summary=f"shure sync {n}")
        )
        if n % 10 == 0:
            db.session.add(
                ActivityLog(
                    tenant_id=tenant.id,
                    activity_type="status",
                    status="warning",
                    summary=f"RACK-{n} is offline",
                )
            )
    token = issue_token(db.session.get(User, admin.id))
    db.session.commit()
    return tenant, admin, token


def _live_topics(app, html: str) -> list[str]:
    match = re.search(r"topics=([^\"&]+)\"", html)
    if match is None:
        return []
    serializer = URLSafeTimedSerializer(app.config["SECRET_KEY"], salt="live-topics")
    return serializer.loads(match.group(1))["t"]


def test_the_main_feed_leaves_sync_bookkeeping_to_its_filter(app, client, feed):
    tenant, admin, _ = feed
    login(client, admin)
    page = client.get("/devices/activity").get_data(as_text=True)
    assert "RACK-0 is offline" in page and "shure sync" not in page
    synced = client.get("/devices/activity?type=sync").get_data(as_text=True)
    assert "shure sync 29" in synced and "RACK-0 is offline" not in synced


def test_a_filtered_page_takes_only_its_own_live_rows(app, client, feed):
    tenant, admin, _ = feed
    login(client, admin)
    main = _live_topics(app, client.get("/devices/activity").get_data(as_text=True))
    assert f"t{tenant.id}:activity" in main
    status = _live_topics(app, client.get("/devices/activity?type=status").get_data(as_text=True))
    assert f"t{tenant.id}:activity" not in status
    assert f"t{tenant.id}:activity-type-status" in status
    # An older page, or filters no live topic matches, takes none (it would only grow).
    older = client.get("/devices/activity?type=status&status=warning").get_data(as_text=True)
    assert not any(t.startswith(f"t{tenant.id}:activity") for t in _live_topics(app, older))

    from services.devices import activity_topics

    assert activity_topics("sync") == ["activity-type-sync"]
    assert activity_topics("status") == ["activity", "activity-type-status"]


def test_the_api_takes_the_pages_type_name_and_links_both_ways(client, feed):
    _, _, token = feed
    headers = {"Authorization": f"Bearer {token}"}
    by_type = client.get("/api/v2/activity-logs/?type=status", headers=headers).get_json()
    assert [r["summary"] for r in by_type["results"]] == [
        "RACK-20 is offline",
        "RACK-10 is offline",
        "RACK-0 is offline",
    ]
    first = client.get("/api/v2/activity-logs/?limit=10", headers=headers).get_json()
    assert first["previous"] is None and first["next"]
    second = client.get(first["next"], headers=headers).get_json()
    assert second["previous"]
    back = client.get(second["previous"], headers=headers).get_json()
    assert [r["id"] for r in back["results"]] == [r["id"] for r in first["results"]]
    assert back["previous"] is None


def test_live_rows_go_only_to_pages_they_match_and_keep_the_list_its_size(app, db, worker, feed):
    from events import emit
    from services.live import hub, tenant_topic

    tenant, _, _ = feed
    main, status = (
        tenant_topic(tenant.id, "activity"),
        tenant_topic(tenant.id, "activity-type-status"),
    )
    with (
        hub().subscribe([main], watch=True) as main_page,
        hub().subscribe([status], watch=True) as status_page,
    ):
        emit(
            "device.synced",
            tenant_id=tenant.id,
            entity="device",
            payload={"service_code": "shure", "status": "success", "device_count": 4},
        )
        for n in range(50):  # offline events about a device the tenant does not have
            emit(
                "device.offline",
                tenant_id=tenant.id,
                entity="device",
                payload={"service_code": "shure", "device_id": f"GONE-{n}"},
            )
        db.session.commit()
        drain(app)
        time.sleep(0.3)
        main_frames = list(main_page.drain().values())
        status_frames = list(status_page.drain().values())
    # The sync row reaches neither page: not the main feed's, not the status filter's.
    assert not any("sync" in (f.html or "") for f in main_frames + status_frames)
    # The offline rows are "offline" rows: the status page takes none of them.
    assert len(main_frames) == 50 and status_frames == []
    # The page held the 3 status rows (sync rows are not on it) and now takes 50 more: the
    # last frames each drop the row that falls below the page's 50.
    ids = sorted(
        db.session.scalars(
            select(ActivityLog.id).where(
                ActivityLog.tenant_id == tenant.id, ActivityLog.activity_type != "sync"
            )
        )
    )
    assert len(ids) == 53
    dropped = [
        int(m)
        for f in main_frames
        for m in re.findall(r'id="activity-(\d+)" hx-swap-oob="delete"', f.html)
    ]
    assert sorted(dropped) == ids[:3]


def test_an_unknown_device_is_logged_once_and_listed_to_add(app, db, worker, factory, client):
    from models.devices import Device, Location
    from services import devices as device_service
    from services.manufacturers.endpoints import manufacturer_for
    from services.manufacturers.shure import ShureSettings
    from services.manufacturers.shure import service as shure_service
    from services.manufacturers.simulator import SimulatedReceiver, attach_endpoints

    assert app.config["DEVICES_AUTO_PROVISION"] is False
    app.config.update(DEVICES_POLL_TIMEOUT=1.5, DEVICES_SHURE_METER_RATE_MS=100)
    tenant = factory.tenant("Venue")
    admin = factory.user(tenant, role="admin")
    manufacturer_for("shure")
    stage = Location(tenant_id=tenant.id, name="Stage")
    db.session.add(stage)
    db.session.commit()
    try:
        with SimulatedReceiver("QLXD4", device_id="NEW-RX", channel_names=["Lectern"]) as rx:
            attach_endpoints(tenant.id, [rx.address], location_id=stage.id)
            db.session.commit()
            for _ in range(4):
                device_service.poll_service(tenant.id, "shure")
                drain(app)
            db.session.expire_all()
            logged = db.session.scalars(
                select(ActivityLog.summary).where(ActivityLog.activity_type == "discovery")
            ).all()
            assert sorted(logged) == sorted(
                [
                    "Discovered unknown receiver NEW-RX (QLXD4), not added: "
                    "auto-provisioning is off",
                    "Discovered unknown transmitter NEW-RX/ch1 (QLXD2), not added: "
                    "auto-provisioning is off",
                ]
            )
            login(client, admin)
            board = client.get("/devices/").get_data(as_text=True)
            assert "Discovered, not added" in board and "NEW-RX" in board
            receiver_row = re.search(r'<li id="discovered-\d+">receiver .*?</li>', board, re.S)
            action = re.search(r'action="(/devices/discovered/\d+/add)"', receiver_row.group(0))
            action = action.group(1)
            from tests.conftest import csrf_token_from

            token = csrf_token_from(board.encode())
            added = client.post(action, data={"csrf_token": token})
            assert added.status_code == 303
            db.session.commit()  # a fresh read
            device = db.session.scalar(select(Device).where(Device.api_device_id == "NEW-RX"))
            assert device is not None and device.location_id == stage.id
            device_service.poll_service(tenant.id, "shure")
            drain(app)
            db.session.expire_all()
            assert db.session.get(Device, device.id).is_online
            board = client.get("/devices/").get_data(as_text=True)
            assert "NEW-RX/ch1" in board and action not in board
    finally:
        shure_service.shutdown()
        shure_service.settings = ShureSettings()
