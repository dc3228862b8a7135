"""Sessions end when the user (or an admin) says so, logins and the API are throttled, and
`flask users create` and the login form agree on what an email address is.

Each test replays what an attacker holding an old cookie, a stolen CSRF token or a password
list would do, through the real login form, the real CLI and the real limiter storage
(memory embedded, Redis in production)."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import pytest
from sqlalchemy import select

from config import Config
from models.events import OutboxEvent
from services.api_tokens import issue_token
from tests.conftest import (
    PASSWORD,
    Factory,
    csrf_token_from,
    make_app,
    prod_overrides,
    shut_down_app,
)

# The defaults, spelled out so the tests exercise the limits users get (TestConfig relaxes
# them for the rest of the suite, which signs many users in from 127.0.0.1).
LOGIN_LIMITS = {"LOGIN_LIMIT_PER_IP": (5, 300), "LOGIN_LIMIT_PER_EMAIL": (10, 900)}


def _sign_in(client, email: str, password: str = PASSWORD, *, remember=False, ip="127.0.0.1"):
    page = client.get("/login", environ_base={"REMOTE_ADDR": ip})
    data = {"email": email, "password": password, "csrf_token": csrf_token_from(page.data)}
    if remember:
        data["remember"] = "y"
    return client.post("/login", data=data, environ_base={"REMOTE_ADDR": ip})


def _signed_in(client) -> bool:
    response = client.get("/account")
    if response.status_code == 200:
        return True
    assert response.status_code == 302 and "/login" in response.headers["Location"]
    return False


def _log_out(client) -> None:
    response = client.post("/logout", data={"csrf_token": csrf_token_from(client.get("/").data)})
    assert response.status_code == 303


def _client_with_cookie(app, name: str, value: str):
    other = app.test_client()
    other.set_cookie(name, value)
    return other


def _set_cookie_header(response, name: str) -> str:
    headers = [h for h in response.headers.getlist("Set-Cookie") if h.startswith(name + "=")]
    assert headers, f"no {name} cookie set"
    return headers[0]


@pytest.fixture
def agent(factory):
    return factory.user(role="agent", email="agent@venue.example")


# ---------------------------------------------------------------- logout is server-side


def test_session_cookie_saved_before_logout_no_longer_works(client, agent):
    assert _sign_in(client, agent.email).status_code == 303
    saved = client.get_cookie("session").value
    _log_out(client)
    client.set_cookie("session", saved)  # the attacker replays the copy taken earlier
    assert not _signed_in(client)


def test_remember_cookie_saved_before_logout_no_longer_works(app, client, agent):
    assert _sign_in(client, agent.email, remember=True).status_code == 303
    saved = client.get_cookie("remember_token").value
    assert _signed_in(_client_with_cookie(app, "remember_token", saved))  # it does work…
    _log_out(client)
    assert not _signed_in(_client_with_cookie(app, "remember_token", saved))  # …until logout


def test_remember_token_differs_per_login_is_lax_and_short_lived(app, agent):
    first, second = app.test_client(), app.test_client()
    one = _sign_in(first, agent.email, remember=True)
    two = _sign_in(second, agent.email, remember=True)
    token_one = first.get_cookie("remember_token").value
    token_two = second.get_cookie("remember_token").value
    assert token_one != token_two
    # Signing in on a second device keeps the first one signed in.
    assert _signed_in(_client_with_cookie(app, "remember_token", token_one))
    header = _set_cookie_header(two, "remember_token")
    assert "SameSite=Lax" in header
    expires = parsedate_to_datetime(re.search(r"Expires=([^;]+)", header).group(1))
    lifetime = expires - datetime.now(UTC)
    assert timedelta(days=13) < lifetime <= timedelta(days=14, minutes=1)
    assert _set_cookie_header(one, "remember_token")


def test_remember_cookie_expires_on_the_server_too(tmp_path):
    # A cookie copied out of the browser must not outlive REMEMBER_COOKIE_DAYS just because
    # the copy carries no expiry date.
    app = make_app(tmp_path, REMEMBER_COOKIE_DURATION=timedelta(seconds=2))
    from extensions import db

    with app.app_context():
        db.create_all()
    agent = Factory(app).user(email="short@venue.example")
    client = app.test_client()
    assert _sign_in(client, agent.email, remember=True).status_code == 303
    saved_remember = client.get_cookie("remember_token").value
    saved_session = client.get_cookie("session").value
    time.sleep(3)
    assert not _signed_in(_client_with_cookie(app, "remember_token", saved_remember))
    assert not _signed_in(_client_with_cookie(app, "session", saved_session))
    app.extensions["switchboard.tasks"].stop()


def test_admin_can_log_a_user_out_everywhere(app, runner, agent):
    laptop, phone = app.test_client(), app.test_client()
    _sign_in(laptop, agent.email)
    _sign_in(phone, agent.email, remember=True)
    remember = phone.get_cookie("remember_token").value
    result = runner.invoke(args=["users", "logout-everywhere", agent.email])
    assert result.exit_code == 0, result.output
    assert agent.email in result.output
    assert not _signed_in(laptop)
    assert not _signed_in(phone)
    assert not _signed_in(_client_with_cookie(app, "remember_token", remember))


def test_deactivation_revokes_cookies_for_good(app, runner, agent):
    client = app.test_client()
    _sign_in(client, agent.email, remember=True)
    session_cookie = client.get_cookie("session").value
    remember = client.get_cookie("remember_token").value
    assert runner.invoke(args=["users", "deactivate", agent.email]).exit_code == 0
    assert not _signed_in(client)
    # Turning the account back on does not bring the old cookies back to life.
    assert runner.invoke(args=["users", "activate", agent.email]).exit_code == 0
    assert not _signed_in(_client_with_cookie(app, "session", session_cookie))
    assert not _signed_in(_client_with_cookie(app, "remember_token", remember))
    # The account itself works again with its password.
    assert _sign_in(app.test_client(), agent.email).status_code == 303


def test_sign_out_everywhere_from_the_account_page(app, agent):
    here, elsewhere = app.test_client(), app.test_client()
    _sign_in(here, agent.email)
    _sign_in(elsewhere, agent.email, remember=True)
    remember = elsewhere.get_cookie("remember_token").value
    page = here.get("/account")
    assert b"Sign out everywhere" in page.data
    response = here.post(
        "/account/sign-out-everywhere", data={"csrf_token": csrf_token_from(page.data)}
    )
    assert response.status_code == 303
    assert not _signed_in(here)
    assert not _signed_in(elsewhere)
    assert not _signed_in(_client_with_cookie(app, "remember_token", remember))


def test_csrf_token_from_before_login_is_refused_after_login(client, agent):
    page = client.get("/login")
    pre_login_token = csrf_token_from(page.data)
    response = client.post(
        "/login",
        data={"email": agent.email, "password": PASSWORD, "csrf_token": pre_login_token},
    )
    assert response.status_code == 303
    # A token planted or read before login (e.g. on a shared machine) must not sign requests.
    stale = client.post("/account/token", data={"csrf_token": pre_login_token})
    assert stale.status_code == 400
    fresh = client.post(
        "/account/token", data={"csrf_token": csrf_token_from(client.get("/account").data)}
    )
    assert fresh.status_code == 200


# ---------------------------------------------------------------- login throttling


def test_login_limit_defaults_follow_chatwoot():
    config = Config()
    assert config.LOGIN_LIMIT_PER_IP == (5, 300)
    assert config.LOGIN_LIMIT_PER_EMAIL == (10, 900)
    assert config.REMEMBER_COOKIE_DURATION == timedelta(days=14)
    assert config.REMEMBER_COOKIE_SAMESITE == "Lax"


def _throttled_app(tmp_path, **overrides):
    app = make_app(tmp_path, **LOGIN_LIMITS, **overrides)
    from extensions import db

    with app.app_context():
        db.drop_all()
        db.create_all()
    return app


def _assert_too_many(response) -> None:
    assert response.status_code == 429
    assert b"Too many sign-in attempts" in response.data
    assert 1 <= int(response.headers["Retry-After"]) <= 900


def _attack_one_ip(app) -> None:
    factory = Factory(app)
    victim = factory.user(email="victim@venue.example")
    client = app.test_client()
    for n in range(5):  # a password list against several accounts, from one address
        response = _sign_in(client, f"guess{n}@venue.example" if n else victim.email, "nope1234")
        assert response.status_code == 401
    # Even the right password is refused now: the attacker cannot tell it was right.
    _assert_too_many(_sign_in(client, victim.email))
    # Another address is not affected.
    assert _sign_in(app.test_client(), victim.email, ip="198.51.100.7").status_code == 303
    with app.app_context():
        from extensions import db

        failed = db.session.scalars(
            select(OutboxEvent).where(OutboxEvent.topic == "user.login_failed")
        ).all()
        assert len(failed) == 1  # the one failure against a real account stays audited


def _attack_one_email(app) -> None:
    factory = Factory(app)
    victim = factory.user(email="target@venue.example")
    for n in range(10):  # a botnet: every guess from another address
        response = _sign_in(app.test_client(), victim.email, "nope1234", ip=f"203.0.113.{n}")
        assert response.status_code == 401
    _assert_too_many(_sign_in(app.test_client(), victim.email, ip="203.0.113.99"))
    # Other accounts still sign in from those addresses.
    other = factory.user(email="bystander@venue.example")
    assert _sign_in(app.test_client(), other.email, ip="203.0.113.1").status_code == 303


def test_login_throttled_per_ip_embedded(tmp_path):
    app = _throttled_app(tmp_path)
    try:
        _attack_one_ip(app)
    finally:
        app.extensions["switchboard.tasks"].stop()


def test_login_throttled_per_email_embedded(tmp_path):
    app = _throttled_app(tmp_path)
    try:
        _attack_one_email(app)
    finally:
        app.extensions["switchboard.tasks"].stop()


@pytest.mark.integration
def test_login_throttled_per_ip_and_email_in_redis(tmp_path, pg_database_url, redis_url):
    import redis

    overrides = prod_overrides(pg_database_url, redis_url)
    app = _throttled_app(tmp_path, **overrides)
    try:
        _attack_one_ip(app)
        prefix = app.config["REDIS_PREFIX"]
        keys = list(redis.Redis.from_url(redis_url).scan_iter(match=prefix + "*"))
        assert any(b"login" in key for key in keys), keys  # counted in Redis, under the prefix
        # A second web process (another app on the same Redis) sees the same counts.
        twin = make_app(tmp_path, **LOGIN_LIMITS, **overrides)
        try:
            _assert_too_many(_sign_in(twin.test_client(), "victim@venue.example"))
        finally:
            shut_down_app(twin)
    finally:
        shut_down_app(app, redis_url)
    app = _throttled_app(tmp_path, **prod_overrides(pg_database_url, redis_url))
    try:
        _attack_one_email(app)
    finally:
        shut_down_app(app, redis_url)


# ---------------------------------------------------------------- the API limiter


def _api_app(tmp_path, **overrides):
    app = make_app(
        tmp_path, API_RATE_LIMIT_PER_TOKEN=(3, 60), API_RATE_LIMIT_PER_IP=(5, 60), **overrides
    )
    from extensions import db

    with app.app_context():
        db.drop_all()
        db.create_all()
    return app


def _attack_the_api(app) -> None:
    factory = Factory(app)
    user = factory.user()
    with app.app_context():
        from extensions import db
        from models.accounts import User

        token = issue_token(db.session.get(User, user.id))
        db.session.commit()
    client = app.test_client()
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(3):
        assert client.get("/api/v2/devices/", headers=headers).status_code == 200
    # One token from another address is still one token.
    limited = client.get("/api/v2/devices/", headers=headers, environ_base={"REMOTE_ADDR": "::2"})
    assert limited.status_code == 429
    assert limited.get_json()["error"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    # Guessing tokens from one address runs into the per-address limit (5: 4 here, 1 above).
    guesses = [
        client.get("/api/v2/devices/", headers={"Authorization": f"Bearer sb_guess{n}"})
        for n in range(3)
    ]
    assert [r.status_code for r in guesses] == [401, 401, 429]
    assert guesses[-1].get_json()["error"] == "rate_limited"


def test_api_limited_per_token_and_per_ip_embedded(tmp_path):
    app = _api_app(tmp_path)
    try:
        _attack_the_api(app)
    finally:
        app.extensions["switchboard.tasks"].stop()


@pytest.mark.integration
def test_api_limited_per_token_and_per_ip_in_redis(tmp_path, pg_database_url, redis_url):
    app = _api_app(tmp_path, **prod_overrides(pg_database_url, redis_url))
    try:
        _attack_the_api(app)
    finally:
        shut_down_app(app, redis_url)


@pytest.mark.integration
def test_shared_limiter_keeps_its_interface_in_redis(tmp_path, pg_database_url, redis_url):
    import redis

    app = _api_app(tmp_path, **prod_overrides(pg_database_url, redis_url))
    try:
        from services.kv import kv

        with app.app_context():
            decisions = [kv().hit("probe", 2, 30) for _ in range(3)]
        assert [d.allowed for d in decisions] == [True, True, False]
        assert 1 <= decisions[-1].retry_after <= 30
        keys = list(redis.Redis.from_url(redis_url).scan_iter(match="*probe*"))
        assert keys and all(k.startswith(app.config["REDIS_PREFIX"].encode()) for k in keys)
    finally:
        shut_down_app(app, redis_url)


# ---------------------------------------------------------------- one idea of an email


def test_cli_created_test_domain_user_can_sign_in(app, runner, client):
    result = runner.invoke(
        args=["users", "create", "--email", "admin@example.test", "--tenant", "Ops"],
        input=f"{PASSWORD}\n{PASSWORD}\n",
    )
    assert result.exit_code == 0, result.output
    assert _sign_in(client, "Admin@Example.TEST").status_code == 303


@pytest.mark.parametrize("email", ["not-an-email", "admin@host.local", "a@b", "a b@example.com"])
def test_garbage_is_refused_by_cli_and_form_alike(app, runner, client, email):
    result = runner.invoke(
        args=["users", "create", "--email", email, "--tenant", "Ops", "--password", PASSWORD]
    )
    assert result.exit_code != 0
    assert "not a valid email address" in result.output
    response = _sign_in(client, email)
    assert response.status_code == 200
    assert b"not a valid email address" in response.data
