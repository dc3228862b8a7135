"""Hostile input gets a clear 4xx, never a 500: ids and cursors beyond the database's integer
range on every route, the API fuzzed against its OpenAPI document, free-text filters bound to
integers, error pages for htmx, open redirects, caching and HSTS headers, and start-up refusals
(gunicorn without SECRET_KEY, `flask demo load` in production)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PASSWORD, csrf_token_from, free_port, login

ROOT = Path(__file__).resolve().parent.parent

# Beyond PostgreSQL's INTEGER, beyond BIGINT (and SQLite's 64-bit integers), and negative.
HOSTILE_NUMBERS = ["2147483648", "9223372036854775806", "99999999999999999999", "-1"]
# Query arguments some list page or the API reads as an integer.
INTEGER_QUERY_ARGS = [
    "after",
    "before",
    "actor",
    "agent",
    "device",
    "cursor",
    "location",
    "manufacturer",
    "limit",
]


def _integer_like_rules(app):
    """Every (rule, method) of the URL map whose path has a numeric argument, and every GET
    page (its query string is attacked instead)."""
    for rule in app.url_map.iter_rules():
        if getattr(rule, "websocket", False) or rule.endpoint == "static":
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            yield rule, method


def _fill(rule, value: str) -> str | None:
    """The rule's path with `value` in each integer argument (None if it has other kinds)."""
    path = rule.rule
    for name, converter in rule._converters.items():
        kind = type(converter).__name__
        if kind not in ("IntegerConverter", "DatabaseIdConverter"):
            return None
        path = re.sub(rf"<[^:>]+:{name}>", value, path)
    return path


def _attack_every_route(app, client, user) -> list[tuple[str, str, object]]:
    login(client, user)
    token = csrf_token_from(client.get("/account").data)
    headers = {"X-CSRFToken": token}
    failures = []
    for rule, method in _integer_like_rules(app):
        targets = []
        if rule.arguments:
            for value in HOSTILE_NUMBERS:
                path = _fill(rule, value)
                if path is not None:
                    targets.append(path)
        elif method == "GET":
            for value in HOSTILE_NUMBERS:
                query = "&".join(f"{arg}={value}" for arg in INTEGER_QUERY_ARGS)
                targets.append(f"{rule.rule}?{query}")
                for arg in INTEGER_QUERY_ARGS:  # alone, so one refusal hides no other
                    targets.append(f"{rule.rule}?{arg}={value}")
        for target in targets:
            try:  # TESTING propagates what would be a 500 in production
                status = client.open(target, method=method, headers=headers).status_code
            except Exception as exc:  # noqa: BLE001
                status = f"500 ({type(exc).__name__})"
            if not isinstance(status, int) or status >= 500:
                failures.append((method, target, status))
    return failures


def test_no_route_answers_500_to_out_of_range_ids_embedded(app, client, factory):
    failures = _attack_every_route(app, client, factory.user(role="admin"))
    assert not failures, "\n".join(map(str, failures))


def test_no_route_answers_500_to_out_of_range_ids_postgresql(prod_app, prod_factory):
    client = prod_app.test_client()
    failures = _attack_every_route(prod_app, client, prod_factory.user(role="admin"))
    assert not failures, "\n".join(map(str, failures))


# ---------------------------------------------------------------- the API against its document


@pytest.fixture
def api_token(app, db, factory):
    from models.accounts import User
    from models.base import utcnow
    from models.devices import ActivityLog, Device, Manufacturer
    from services.api_tokens import issue_token

    user = factory.user(role="admin")
    maker = Manufacturer(code="shure", name="Shure")
    db.session.add(maker)
    db.session.flush()
    device = Device(
        tenant_id=user.tenant_id,
        manufacturer_id=maker.id,
        api_device_id="RX-1",
        name="Receiver",
        state={},
    )
    db.session.add(device)
    db.session.flush()
    for n in range(5):
        db.session.add(
            ActivityLog(
                tenant_id=user.tenant_id,
                activity_type="status",
                status="success",
                summary=f"event {n}",
                device_id=device.id,
                created_at=utcnow(),
            )
        )
    token = issue_token(db.session.get(User, user.id))
    db.session.commit()
    return token


API_CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "negative_data_rejection",  # an invalid parameter is answered 4xx, never 2xx
        "positive_data_acceptance",  # a valid request is answered 2xx
    ]
)


def test_api_rejects_what_its_document_forbids_and_never_fails(live_server, api_token, tmp_path):
    """schemathesis, as its CLI runs it: the schema's examples, the coverage phase (each
    parameter's edges: empty, out of range, wrong type) and random valid and invalid requests,
    bounded. Valid requests get 2xx, invalid ones 4xx, never a 5xx, and every response matches
    the document."""
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{live_server.url}/api/v2/openapi.json",
        "--phases=examples,coverage,fuzzing",
        f"--checks={API_CHECKS}",
        "--max-examples=30",
        "--generation-database=none",
        "--no-color",
        "--header",
        f"Authorization: Bearer {api_token}",
    ]
    run = subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


# ---------------------------------------------------------------- filters and error pages

HTMX = {"HX-Request": "true"}


@pytest.mark.parametrize(
    "query, complaint",
    [
        ("device=abc", "“abc” is not a device number"),
        ("device=99999999999999999999", "is not a device number"),
        ("device=-3", "“-3” is not a device number"),
    ],
)
def test_activity_filter_with_a_bad_value_answers_with_a_form_error(
    client, factory, query, complaint
):
    login(client, factory.user())
    page = client.get(f"/devices/activity?{query}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert complaint in html and 'role="alert"' in html
    assert 'name="device"' in html  # the filter form is still there to correct it
    # As htmx asks when the field changes: the list's fragment, carrying the error.
    fragment = client.get(f"/devices/activity?{query}", headers=HTMX)
    assert fragment.status_code == 200
    text = fragment.get_data(as_text=True)
    assert complaint in text and 'id="activity-rows"' in text and "<html" not in text


def test_a_bad_request_gets_the_apps_error_page_or_an_htmx_fragment(client, factory):
    login(client, factory.user())
    page = client.get("/chats/?before=abc")
    assert page.status_code == 400
    html = page.get_data(as_text=True)
    assert "<html" in html and "Back to the console" in html
    assert "“before” must be a whole number" in html
    fragment = client.get("/chats/?before=abc", headers=HTMX)
    assert fragment.status_code == 400
    text = fragment.get_data(as_text=True)
    assert "“before” must be a whole number" in text and 'role="alert"' in text
    assert "<html" not in text and "<body" not in text and len(text) < 400
    assert "HX-Request" in fragment.headers.get("Vary", "")
    # Put before the list that asked rather than in its place, so the list is still there
    # for the corrected request.
    assert fragment.headers["HX-Reswap"] == "beforebegin"


def test_other_client_errors_get_the_apps_page_with_their_headers(client, factory):
    login(client, factory.user())
    wrong_method = client.get("/notifications/read-all")
    assert wrong_method.status_code == 405
    assert "POST" in wrong_method.headers["Allow"]
    assert "Back to the console" in wrong_method.get_data(as_text=True)
    fragment = client.get("/notifications/read-all", headers=HTMX)
    assert fragment.status_code == 405 and "<html" not in fragment.get_data(as_text=True)
    # More form fields than Flask parses (MAX_FORM_PARTS, 1000).
    too_large = client.post(
        "/login",
        data={f"field{n}": "x" for n in range(1500)},
        content_type="multipart/form-data",
    )
    assert too_large.status_code == 413
    assert "Back to the console" in too_large.get_data(as_text=True)
    api = client.post("/api/v2/devices/")
    assert api.status_code == 405 and api.json["error"] == "method_not_allowed"


def test_a_value_the_database_refuses_is_a_400_not_a_500(prod_app, prod_factory):
    """The net under the range checks: should a route ever pass an out-of-range number to
    PostgreSQL, the request is refused and the connection stays usable."""
    from extensions import db
    from models.chats import Chat

    @prod_app.get("/probe/chat-by-raw-id/<raw>")
    def probe(raw):
        db.session.get(Chat, int(raw))
        return "found"

    client = prod_app.test_client()
    login(client, prod_factory.user())
    page = client.get("/probe/chat-by-raw-id/2147483648")
    assert page.status_code == 400
    assert "out of range" in page.get_data(as_text=True)
    assert client.get("/probe/chat-by-raw-id/1").status_code == 200  # session rolled back


# ---------------------------------------------------------------- open redirects

OFF_SITE = [
    "//evil.example/x",
    "/\\evil.example/x",
    "\\\\evil.example/x",
    "https://evil.example/x",
    "/\t/evil.example/x",
    " //evil.example/x",
    "http://localhost.evil.example/",
    "javascript:alert(1)",
]


def _stays_on_site(location: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(location)
    return (
        parts.netloc in ("", "localhost")
        and location.startswith(("/", "http://localhost/"))
        and not location.startswith("//")
        and "\\" not in location
        and not any(ord(c) < 32 for c in location)
    )


@pytest.fixture
def notification_ids(app, db, factory):
    from models.notifications import Notification

    user = factory.user()
    rows = [
        Notification(tenant_id=user.tenant_id, recipient_id=user.id, type="test", title=f"n{n}")
        for n in range(2 * len(OFF_SITE) + 1)
    ]
    db.session.add_all(rows)
    db.session.commit()
    return user, [row.id for row in rows]


def test_marking_read_never_redirects_off_site(client, notification_ids):
    user, ids = notification_ids
    login(client, user)
    token = csrf_token_from(client.get("/notifications/").data)
    for target, notification_id in zip(OFF_SITE, ids, strict=False):
        by_field = client.post(
            f"/notifications/{notification_id}/read", data={"csrf_token": token, "next": target}
        )
        assert by_field.status_code == 303
        assert _stays_on_site(by_field.headers["Location"]), (target, by_field.headers)
    for target, notification_id in zip(OFF_SITE, ids[len(OFF_SITE) :], strict=False):
        by_referer = client.post(
            f"/notifications/{notification_id}/read",
            data={"csrf_token": token},
            headers={"Referer": target},
        )
        assert by_referer.status_code == 303
        assert _stays_on_site(by_referer.headers["Location"]), (target, by_referer.headers)
    back = client.post(
        f"/notifications/{ids[-1]}/read", data={"csrf_token": token, "next": "/chats/?x=1"}
    )
    assert back.headers["Location"] == "/chats/?x=1"  # a same-site path is honoured


def test_login_never_redirects_off_site(client, factory):
    import re as regex

    user = factory.user()
    for target in OFF_SITE:
        page = client.get("/login")
        token = regex.search(rb'name="csrf_token" type="hidden" value="([^"]+)"', page.data)
        from urllib.parse import quote

        response = client.post(
            f"/login?next={quote(target)}",
            data={"email": user.email, "password": PASSWORD, "csrf_token": token.group(1)},
        )
        assert response.status_code == 303
        assert _stays_on_site(response.headers["Location"]), (target, response.headers)
        client.post("/logout", data={"csrf_token": csrf_token_from(client.get("/").data)})


# ---------------------------------------------------------------- caching, HSTS, demo data


def test_logged_in_pages_and_api_answers_are_not_stored(client, factory, api_token):
    login(client, factory.user())
    for path in ("/account", "/webhooks/", "/", "/notifications/"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert "no-store" in response.headers.get("Cache-Control", ""), path
    api = client.get("/api/v2/devices/", headers={"Authorization": f"Bearer {api_token}"})
    assert api.status_code == 200 and "no-store" in api.headers.get("Cache-Control", "")
    static = client.get("/static/css/app.css")
    assert static.status_code == 200
    assert "no-store" not in static.headers.get("Cache-Control", "")
    static.close()


def test_hsts_is_sent_when_cookies_are_secure(tmp_path):
    from tests.conftest import make_app

    secure = make_app(tmp_path, SESSION_COOKIE_SECURE=True)
    response = secure.test_client().get("/login", base_url="https://localhost")
    assert response.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
    secure.extensions["switchboard.tasks"].stop()
    plain = make_app(tmp_path)  # SESSION_COOKIE_SECURE off, as `make run` over http
    assert "Strict-Transport-Security" not in plain.test_client().get("/login").headers
    plain.extensions["switchboard.tasks"].stop()


def test_demo_data_is_refused_in_production_unless_forced(prod_app):
    from sqlalchemy import select

    from extensions import db
    from models.accounts import User

    runner = prod_app.test_cli_runner()
    refused = runner.invoke(args=["demo", "load"])
    assert refused.exit_code != 0
    assert "production" in refused.output and "--force" in refused.output
    with prod_app.app_context():
        email = prod_app.config["DEMO_EMAIL"]
        assert db.session.scalar(select(User).where(User.email == email)) is None
    forced = runner.invoke(args=["demo", "load", "--force"])
    assert forced.exit_code == 0, forced.output
    with prod_app.app_context():
        assert db.session.scalar(select(User).where(User.email == email)) is not None


def test_demo_data_loads_in_embedded_mode(app, runner):
    result = runner.invoke(args=["demo", "load"])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- start-up refusals


def _procfile_command(name: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} process in the Procfile")


def _start_web(tmp_path, **settings: str) -> tuple[subprocess.Popen, dict]:
    """The Procfile's web process, in production mode (REDIS_URL set) with SQLite."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("SECRET_KEY", "DATABASE_URL", "PYTHONWARNINGS")
    }
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        REDIS_URL="redis://127.0.0.1:6379/15",
        PORT=str(free_port()),
        WEB_CONCURRENCY="2",
        WEB_THREADS="4",
        SWITCHBOARD_INSTANCE=str(tmp_path),
    )
    env.update(settings)
    server = subprocess.Popen(
        ["sh", "-c", "exec " + _procfile_command("web")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return server, env


def test_gunicorn_without_a_secret_key_stops_at_once_with_the_reason(tmp_path):
    """Production mode without SECRET_KEY: the Procfile's web server exits non-zero within
    seconds, saying why, instead of replacing crashing workers for ever."""
    server, env = _start_web(tmp_path)
    started = time.monotonic()
    try:
        stdout, stderr = server.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        stdout, stderr = server.communicate()
        pytest.fail(f"gunicorn still running after 15 s:\n{stderr[-3000:]}")
    elapsed = time.monotonic() - started
    assert server.returncode != 0
    assert elapsed < 10
    assert "SECRET_KEY is not set" in stderr
    assert stderr.count("Booting worker") <= int(env["WEB_CONCURRENCY"]), stderr[-3000:]


def test_gunicorn_with_its_configuration_serves(tmp_path, redis_url):
    import requests

    server, env = _start_web(
        tmp_path, SECRET_KEY="a-secret-for-this-test-only", REDIS_URL=redis_url
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert server.poll() is None, server.communicate()[1][-3000:]
            try:
                health = requests.get(f"http://127.0.0.1:{env['PORT']}/healthz", timeout=5)
                break
            except (requests.ConnectionError, requests.Timeout):  # still booting
                time.sleep(0.2)
        else:
            pytest.fail("gunicorn did not answer within 20 s")
        assert health.status_code == 200, health.text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.communicate(timeout=30)


@pytest.mark.parametrize(
    "path",
    [
        "/devices/activity?to=9999-12-31",
        "/devices/activity?from=0001-01-01&to=0001-01-01",
        "/audit/?until=9999-12-31",
        "/audit/?since=0001-01-01",
        "/audit/export.csv?until=9999-12-31",
        "/chats/?to=9999-12-31",
        "/chats/?from=0001-01-01",
    ],
)
def test_dates_at_the_calendars_edges_are_no_server_error(client, factory, path):
    login(client, factory.user())
    response = client.get(path)
    assert response.status_code in (200, 400), response.status_code


@pytest.mark.browser
def test_in_the_browser_a_bad_device_number_is_explained_and_the_list_stays(
    app, db, live_server, factory
):
    from playwright.sync_api import expect

    from models.devices import ActivityLog
    from tests.browser import chromium, login_page

    user = factory.user()
    db.session.add(
        ActivityLog(tenant_id=user.tenant_id, activity_type="status", summary="Rack online")
    )
    db.session.commit()
    with chromium() as browser:
        page = login_page(browser, live_server.url, user.email, PASSWORD)
        page.goto(live_server.url + "/devices/activity")
        expect(page.locator("#activity-list")).to_contain_text("Rack online")
        page.fill("input[name=device]", "abc")
        page.press("input[name=device]", "Enter")
        expect(page.get_by_role("alert")).to_contain_text("“abc” is not a device number")
        expect(page.locator("#activity-list")).to_contain_text("Rack online")
        # A hand-made request the server refuses (400): the notice goes before the list,
        # which stays for the next request.
        page.evaluate(
            "htmx.ajax('GET', '/devices/activity?from=bad',"
            " {target: '#activity-rows', swap: 'outerHTML'})"
        )
        expect(page.locator("[data-status='400']")).to_contain_text("“from” must be a date")
        expect(page.locator("#activity-rows")).to_have_count(1)
        page.fill("input[name=device]", "")
        page.press("input[name=device]", "Enter")
        expect(page.locator("#activity-rows [role=alert]")).to_have_count(0)
        expect(page.locator("#activity-list")).to_contain_text("Rack online")
