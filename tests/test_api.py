"""The JSON API: token auth, tenant scope, exact filters and pagination, and its OpenAPI
document checked by schemathesis against the running app."""

from __future__ import annotations

import re
from datetime import timedelta
from urllib.parse import quote

import pytest

from models.base import utcnow
from models.devices import ActivityLog, Device, Manufacturer
from services.api_tokens import issue_token
from tests.conftest import csrf_token_from, login


@pytest.fixture
def fleet(app, db, factory):
    tenant = factory.tenant("Venue")
    other = factory.tenant("Other venue")
    user = factory.user(tenant)
    maker = Manufacturer(code="shure", name="Shure")
    db.session.add(maker)
    db.session.flush()
    devices = []
    for n in range(3):
        d = Device(
            tenant_id=tenant.id,
            manufacturer_id=maker.id,
            api_device_id=f"RX-{n}",
            name=f"Receiver {n}",
            is_online=n != 2,
            state={"battery_bars": n},
        )
        db.session.add(d)
        devices.append(d)
    foreign = Device(
        tenant_id=other.id,
        manufacturer_id=maker.id,
        api_device_id="RX-0",
        name="Not yours",
        state={},
    )
    db.session.add(foreign)
    db.session.flush()
    now = utcnow()
    for n in range(130):
        db.session.add(
            ActivityLog(
                tenant_id=tenant.id,
                activity_type="status" if n % 2 else "update",
                status=("success", "warning", "error")[n % 3],
                summary=f"event {n}",
                device_id=devices[n % 3].id,
                service_code="shure" if n % 5 else "simulator",
                created_at=now - timedelta(minutes=130 - n),
            )
        )
    db.session.add(
        ActivityLog(
            tenant_id=other.id,
            activity_type="status",
            status="success",
            summary="foreign",
            created_at=now,
        )
    )
    from models.accounts import User

    row = db.session.get(User, user.id)
    token = issue_token(row)
    db.session.commit()
    return {"token": token, "devices": devices, "user": user, "now": now}


def _get(client, url, token):
    return client.get(url, headers={"Authorization": f"Bearer {token}"})


def _all_pages(client, url, token):
    items, pages = [], 0
    while url:
        response = _get(client, url, token)
        assert response.status_code == 200, response.json
        items += response.json["results"]
        url = response.json["next"]
        pages += 1
        assert pages < 50
    return items, pages


def test_token_or_session_required(client, fleet):
    assert client.get("/api/v2/devices/").status_code == 401
    bad = _get(client, "/api/v2/devices/", "sb_nope")
    assert bad.status_code == 401 and bad.json["error"] == "unauthorized"
    assert _get(client, "/api/v2/devices/", fleet["token"]).status_code == 200
    login(client, fleet["user"])
    assert client.get("/api/v2/devices/").status_code == 200  # the session works too


def test_devices_are_scoped_and_filtered(client, fleet):
    token = fleet["token"]
    names = [d["name"] for d in _get(client, "/api/v2/devices/", token).json["results"]]
    assert sorted(names) == ["Receiver 0", "Receiver 1", "Receiver 2"]
    offline = _get(client, "/api/v2/devices/?online=false", token).json["results"]
    assert [d["name"] for d in offline] == ["Receiver 2"]
    assert _get(client, "/api/v2/devices/?manufacturer=sony", token).json["results"] == []


def test_activity_pagination_is_exact_and_stable(client, fleet):
    items, pages = _all_pages(client, "/api/v2/activity-logs/", fleet["token"])
    assert pages == 3  # 50 + 50 + 30
    ids = [i["id"] for i in items]
    assert len(ids) == 130 == len(set(ids)) and ids == sorted(ids, reverse=True)
    assert all(i["summary"] != "foreign" for i in items)


@pytest.mark.parametrize(
    "query, expected",
    [
        ("status=warning", lambda n: n % 3 == 1),
        ("activity_type=status", lambda n: n % 2 == 1),
        ("service=simulator", lambda n: n % 5 == 0),
        ("status=error&activity_type=update", lambda n: n % 3 == 2 and n % 2 == 0),
    ],
)
def test_activity_filters_are_exact(client, fleet, query, expected):
    items, _ = _all_pages(client, f"/api/v2/activity-logs/?{query}&limit=7", fleet["token"])
    got = sorted(int(i["summary"].split()[1]) for i in items)
    assert got == [n for n in range(130) if expected(n)]


def test_device_and_time_filters(client, fleet, db):
    device = fleet["devices"][1]
    items, _ = _all_pages(client, f"/api/v2/activity-logs/?device={device.id}", fleet["token"])
    assert {i["device_id"] for i in items} == {device.id} and len(items) == 43
    since = quote((fleet["now"] - timedelta(minutes=10, seconds=30)).isoformat())
    recent, _ = _all_pages(client, f"/api/v2/activity-logs/?since={since}", fleet["token"])
    assert sorted(int(i["summary"].split()[1]) for i in recent) == list(range(120, 130))


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=abc",
        "limit=999",
        "status=bad",
        "device=-1",
        "since=yesterday",
        "cursor=!!!",
        "cursor=0",
        "online=maybe",
    ],
)
def test_bad_parameters_get_a_clear_400(client, fleet, query):
    path = "/api/v2/devices/" if query.startswith("online") else "/api/v2/activity-logs/"
    response = _get(client, f"{path}?{query}", fleet["token"])
    assert response.status_code == 400
    assert response.json["error"] == "invalid_parameter" and response.json["message"]


def test_account_page_issues_a_token_once(client, fleet, db):
    login(client, fleet["user"])
    token = csrf_token_from(client.get("/account").data)
    page = client.post("/account/token", data={"csrf_token": token}).get_data(as_text=True)
    new = re.search(r'id="api-token"[^>]*>([^<]+)<', page).group(1)
    assert _get(client, "/api/v2/devices/", new).status_code == 200
    assert _get(client, "/api/v2/devices/", fleet["token"]).status_code == 401  # replaced
    assert new not in client.get("/account").get_data(as_text=True)


def _fuzz(operation, token: str, problems: list) -> None:
    from hypothesis import HealthCheck, given, settings

    @settings(
        max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=operation.as_strategy())
    def check(case):
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
        response = case.call()
        if response.status_code >= 500:
            problems.append((case.as_curl_command(), response.status_code))
        case.validate_response(response)  # status codes, content type and body match the doc

    check()


def test_openapi_document_matches_the_api(app, fleet):
    import schemathesis

    schema = schemathesis.openapi.from_wsgi("/api/v2/openapi.json", app)
    problems: list = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 2
    for operation in operations:
        _fuzz(operation, fleet["token"], problems)
    assert problems == []
