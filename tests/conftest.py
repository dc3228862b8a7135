"""Fixtures: apps in both modes, clients, a live server, and model factories.

Integration fixtures use the real PostgreSQL and Redis named by SWITCHBOARD_TEST_DATABASE_URL
(default postgresql://postgres@127.0.0.1:5432/test) and SWITCHBOARD_TEST_REDIS_URL (default
redis://127.0.0.1:6379/0). Each test session gets its own PostgreSQL database and each test its
own Redis key prefix. When they are unreachable the tests skip — except under CI, where they fail.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
from flask.testing import FlaskClient
from werkzeug.serving import make_server

from config import TestConfig

PG_URL = os.environ.get(
    "SWITCHBOARD_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("SWITCHBOARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PASSWORD = "correct horse battery"


def _unavailable(what: str, exc: Exception):
    message = f"{what} unavailable: {exc}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# ---------------------------------------------------------------- apps


class IsolatedClient(FlaskClient):
    """A test client whose requests never see another client's login.

    Tests often hold an app context open (the `db` fixture); requests then share it and its
    `g`, where Flask-Login caches the current user and Flask-WTF the CSRF token. Each
    request starts without them, as it would in its own app context in production."""

    def open(self, *args, **kwargs):
        from flask import g, has_app_context

        def forget() -> None:
            if has_app_context():
                for key in ("_login_user", "csrf_token"):  # Flask-Login's, Flask-WTF's
                    g.pop(key, None)

        forget()
        try:
            return super().open(*args, **kwargs)
        finally:
            forget()


def make_app(tmp_path, **overrides):
    from app import create_app

    overrides.setdefault("SQLALCHEMY_DATABASE_URI", f"sqlite:///{tmp_path / 'test.db'}")
    overrides.setdefault("REDIS_URL", None)
    # Each app its own export folder: a stale export-1.zip of another test is not this one's.
    overrides.setdefault("EXPORTS_DIR", str(tmp_path / "exports"))
    application = create_app(TestConfig(**overrides))
    application.test_client_class = IsolatedClient
    return application


def _create_schema(app) -> None:
    from extensions import db

    with app.app_context():
        db.create_all()


@pytest.fixture
def app(tmp_path):
    """Embedded mode: SQLite file, StubBroker (worker not started), in-process live bus."""
    application = make_app(tmp_path)
    _create_schema(application)
    yield application
    application.extensions["switchboard.tasks"].stop()
    from extensions import db

    with application.app_context():
        db.engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def db(app):
    from extensions import db as database

    with app.app_context():
        yield database
        database.session.remove()


@pytest.fixture
def worker(app):
    """Start the embedded Dramatiq worker threads (and scheduler) inside the test process."""
    state = app.extensions["switchboard.tasks"]
    state.start_embedded_worker()
    yield state
    state.stop()


def drain(app, timeout_ms: int = 20_000) -> None:
    """Wait until every queued message of the app's broker has been processed."""
    state = app.extensions["switchboard.tasks"]
    for queue_name in state.broker.get_declared_queues():
        state.broker.join(queue_name, timeout=timeout_ms)
    if state.worker is not None:
        state.worker.join()


# ---------------------------------------------------------------- PostgreSQL + Redis


@contextlib.contextmanager
def new_pg_database(label: str = "test") -> Iterator[str]:
    """Create an empty PostgreSQL database, yield its URL, drop it afterwards."""
    import psycopg

    name = f"sb_{label}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except Exception as exc:  # noqa: BLE001
        _unavailable("PostgreSQL", exc)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(PG_URL)
    try:
        yield urlunsplit(parts._replace(path="/" + name))
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    with new_pg_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        _unavailable("Redis", exc)
    return REDIS_URL


_prefixes = itertools.count()


def redis_prefix() -> str:
    return f"sbtest:{os.getpid()}:{next(_prefixes)}:"


def shut_down_app(app, redis_url: str | None = None) -> None:
    """Stop an app's worker threads and live hub, close its database connections and, given
    the Redis it used, delete its keys there."""
    from extensions import db
    from services.manufacturers.shure import service as shure_service

    app.extensions["switchboard.tasks"].stop()
    app.extensions["switchboard.live"].hub.stop()
    # The Shure client belongs to the process: its meter pump would go on writing through this
    # app's engine after the dispose below, leaving a connection for the garbage collector.
    if shure_service.pump.app is app:
        shure_service.shutdown()
    with app.app_context():
        db.session.remove()
        db.engine.dispose()
    if redis_url:
        cleanup_redis(redis_url, app.config["REDIS_PREFIX"], app.config["DRAMATIQ_NAMESPACE"])


def cleanup_redis(url: str, prefix: str, namespace: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    for pattern in (prefix + "*", namespace + ":*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)


def prod_overrides(pg_database_url: str, redis_url: str) -> dict:
    prefix = redis_prefix()
    url = pg_database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    return {
        "SQLALCHEMY_DATABASE_URI": url,
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "DRAMATIQ_NAMESPACE": prefix.rstrip(":").replace(":", "-"),
    }


@pytest.fixture
def prod_app(tmp_path, pg_database_url, redis_url):
    """Production mode: PostgreSQL, RedisBroker, Redis live bus (no worker started)."""
    overrides = prod_overrides(pg_database_url, redis_url)
    application = make_app(tmp_path, **overrides)
    from extensions import db

    with application.app_context():
        db.drop_all()
        db.create_all()
    yield application
    shut_down_app(application, redis_url)


@pytest.fixture
def prod_worker(prod_app):
    """An in-process Dramatiq worker consuming the Redis broker of prod_app."""
    import dramatiq

    state = prod_app.extensions["switchboard.tasks"]
    w = dramatiq.Worker(state.broker, worker_threads=4, worker_timeout=100)
    w.start()
    yield w
    w.stop()


# ---------------------------------------------------------------- a real HTTP server


def _close_when_sent(app):
    """WSGI middleware: a response's iterable is closed as soon as it is sent. Werkzeug's
    server closes it only after draining the request socket, and a browser that drops the
    connection there (navigating away mid-page) makes that read raise first: the static
    file being served is then left for the garbage collector, as a ResourceWarning in
    whatever test runs next."""

    def wrapped(environ, start_response):
        body = app(environ, start_response)
        try:
            yield from body
        finally:
            if hasattr(body, "close"):
                body.close()

    return wrapped


def self_signed_certificate(directory) -> tuple:
    """(certificate, key) files for 127.0.0.1, made by openssl for a test's TLS server."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key


class LiveServer:
    def __init__(self, app, ssl_context=None) -> None:
        self.app = app
        self.server = make_server(
            "127.0.0.1", 0, _close_when_sent(app), threaded=True, ssl_context=ssl_context
        )
        self.port = self.server.server_port
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)


@pytest.fixture
def live_server(app):
    server = LiveServer(app).start()
    yield server
    server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- factories


class Factory:
    """Creates committed records in the app's database."""

    def __init__(self, app) -> None:
        self.app = app
        self._n = itertools.count(1)

    def tenant(self, name: str | None = None):
        from extensions import db
        from models.accounts import Tenant

        with self.app.app_context():
            tenant = Tenant(name=name or f"Tenant {next(self._n)}")
            db.session.add(tenant)
            db.session.commit()
            db.session.refresh(tenant)
            db.session.expunge(tenant)
            return tenant

    def user(self, tenant=None, role: str = "admin", email: str | None = None):
        from extensions import db
        from services.accounts import create_user

        tenant = tenant or self.tenant()
        with self.app.app_context():
            from models.accounts import Tenant

            t = db.session.get(Tenant, tenant.id)
            user = create_user(email or f"user{next(self._n)}@example.com", PASSWORD, t, role=role)
            db.session.commit()
            db.session.refresh(user)
            db.session.expunge(user)
            return user


@pytest.fixture
def factory(app):
    return Factory(app)


@pytest.fixture
def prod_factory(prod_app):
    return Factory(prod_app)


def login(client, user, password: str = PASSWORD):
    """Log in through the real form (CSRF token and all)."""
    import re

    page = client.get("/login")
    token = re.search(rb'name="csrf_token" type="hidden" value="([^"]+)"', page.data)
    assert token, "login form has no CSRF token"
    response = client.post(
        "/login",
        data={"email": user.email, "password": password, "csrf_token": token.group(1).decode()},
    )
    assert response.status_code == 303, response.data[:500]
    return client


def csrf_token_from(html: bytes) -> str:
    import re

    match = re.search(rb'"X-CSRFToken": "([^"]+)"', html) or re.search(
        rb'name="csrf_token"[^>]*value="([^"]+)"', html
    )
    assert match, "no CSRF token in page"
    return match.group(1).decode()


# ---------------------------------------------------------------- a Redis of our own


def _wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def private_redis():
    """A Redis server of our own that the test can stop and start again."""
    if not shutil.which("redis-server"):
        pytest.skip("redis-server not installed")
    port = free_port()

    def start():
        proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=port)
        assert _wait_until(lambda: _ping(client), timeout=10)
        client.close()
        return proc

    state = {"proc": start()}

    def stop():
        state["proc"].terminate()
        state["proc"].wait(timeout=10)

    def restart():
        state["proc"] = start()

    yield type(
        "PrivateRedis", (), {"url": f"redis://127.0.0.1:{port}/0", "stop": stop, "start": restart}
    )
    if state["proc"].poll() is None:
        stop()


def _ping(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001
        return False
