"""Webhook delivery is durable and idempotent: every POST carries a stable `webhook-id`
(Standard Webhooks), a duplicated or concurrent delivery message POSTs once, and retries, a
lost after-commit send, a Redis restarted empty and a database gone right after a POST all
end in a delivery — against real PostgreSQL, Redis and HTTP receivers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dramatiq
import pytest
from dramatiq.middleware import Middleware
from sqlalchemy import select

from events import emit
from models.webhooks import WebhookDelivery, WebhookEndpoint
from tests.conftest import (
    cleanup_redis,
    csrf_token_from,
    drain,
    login,
    make_app,
    new_pg_database,
    prod_overrides,
    shut_down_app,
)

FAST = {
    "WEBHOOK_RETRY_MIN_MS": 50,
    "WEBHOOK_RETRY_MAX_MS": 200,
    "WEBHOOK_TIMEOUT_SECONDS": 3,
    "WEBHOOK_MAX_ATTEMPTS": 4,
    "WEBHOOK_DISABLE_AFTER_FAILURES": 5,
    "WEBHOOK_RELAY_INTERVAL": 0.2,
    "WEBHOOK_REQUEUE_AFTER_SECONDS": 1.0,
    "WEBHOOK_SEND_LEASE_SECONDS": 2.0,
}


class Receiver:
    """A local HTTP server that records every POST (header names lowercased) and answers
    with planned codes; `on_request` runs before it answers."""

    def __init__(self, delay: float = 0.0) -> None:
        self.requests: list[dict] = []
        self.plan: list[int] = []
        self.default = 200
        self.delay = delay
        self.on_request = None
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {name.lower(): value for name, value in self.headers.items()}
                with receiver._lock:
                    receiver.requests.append({"headers": headers, "body": body})
                    code = receiver.plan.pop(0) if receiver.plan else receiver.default
                    hook = receiver.on_request
                if hook is not None:
                    hook()
                if receiver.delay:
                    time.sleep(receiver.delay)
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def ids(self) -> list[str | None]:
        return [r["headers"].get("webhook-id") for r in self.requests]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.stop()


def wait_for(predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def standard_signature_ok(secret: str, request: dict) -> bool:
    """Verify as a Standard Webhooks library does: HMAC-SHA256 keyed with the base64-decoded
    secret (after `whsec_`) over `<webhook-id>.<webhook-timestamp>.<body>`."""
    headers = request["headers"]
    key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + request["body"]
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = headers.get("webhook-signature", "").split()
    return any(
        hmac.compare_digest(entry, f"v1,{expected}") for entry in offered if entry.startswith("v1,")
    )


def add_endpoint(db, tenant_id: int, url: str, topics=("test.*",)) -> tuple[int, str]:
    endpoint = WebhookEndpoint(tenant_id=tenant_id, url=url, topics=list(topics))
    db.session.add(endpoint)
    db.session.commit()
    return endpoint.id, endpoint.secret


def ping(db, tenant_id: int, **payload) -> None:
    emit("test.ping", tenant_id=tenant_id, payload=payload, entity="test", entity_id=7)
    db.session.commit()


def attempts(db, endpoint_id: int) -> list[WebhookDelivery]:
    db.session.expire_all()
    return list(
        db.session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == endpoint_id)
            .order_by(WebhookDelivery.id)
        )
    )


def new_tenant(db) -> int:
    from models.accounts import Tenant

    tenant = Tenant(name="Hooks Ltd")
    db.session.add(tenant)
    db.session.commit()
    return tenant.id


class DeliverMessages(Middleware):
    """Keeps every `webhooks.deliver` message enqueued, and with `duplicate` enqueues a second
    copy of each (as Dramatiq's Redis broker can deliver a delayed message twice)."""

    def __init__(self, duplicate: bool = False) -> None:
        self.duplicate = duplicate
        self.sent: list = []

    def after_enqueue(self, broker, message, delay):
        if not message.actor_name.endswith("webhooks.deliver"):
            return
        self.sent.append(message)
        if self.duplicate and not message.options.get("test_copy"):
            copy = message.copy(message_id=message.message_id + "-copy")
            copy.options["test_copy"] = True
            broker.enqueue(copy, delay=delay)


def start_worker(app, queues=None) -> dramatiq.Worker:
    state = app.extensions["switchboard.tasks"]
    worker = dramatiq.Worker(state.broker, worker_threads=4, worker_timeout=100, queues=queues)
    worker.start()
    return worker


@pytest.fixture
def prod_hooks(prod_app):
    prod_app.config.update(FAST)
    return prod_app


# ---------------------------------------------------------------- the idempotency key


def test_every_post_carries_a_stable_webhook_id_signed_as_standard_webhooks(
    app, db, client, worker, factory, receiver
):
    app.config.update(FAST)
    tenant = factory.tenant()
    tenant_id = tenant.id
    endpoint_id, secret = add_endpoint(db, tenant_id, receiver.url)
    add_endpoint(db, tenant_id, receiver.url + "/other")
    receiver.plan = [503]  # the first POST to one of them fails and is retried

    ping(db, tenant_id, n=1)
    drain(app)
    wait_for(lambda: len(receiver.requests) == 3)
    ping(db, tenant_id, n=2)
    drain(app)
    wait_for(lambda: len(receiver.requests) == 5)

    by_path: dict[str, list[dict]] = {}
    for request in receiver.requests:
        assert request["headers"].get("webhook-id", "").startswith("msg_")
        assert abs(int(request["headers"]["webhook-timestamp"]) - time.time()) < 60
        by_path.setdefault(request["headers"]["webhook-id"], []).append(request)
    # One id per (endpoint, event): 2 endpoints × 2 events, the retried one seen twice.
    assert len(by_path) == 4
    assert sorted(len(v) for v in by_path.values()) == [1, 1, 1, 2]
    retried = next(v for v in by_path.values() if len(v) == 2)
    assert retried[0]["body"] == retried[1]["body"]
    ours = [r for r in receiver.requests if r["headers"].get("webhook-id") in by_path]
    assert any(standard_signature_ok(secret, r) for r in ours)
    assert not standard_signature_ok("whsec_" + base64.b64encode(b"x" * 32).decode(), ours[0])
    # The signature headers documented before are still sent.
    assert all("x-switchboard-signature" in r["headers"] for r in ours)

    # The admin's re-send of a delivery carries the same id as the original.
    (first, *_) = attempts(db, endpoint_id)
    login(client, factory.user(tenant, role="admin"))
    token = csrf_token_from(client.get(f"/webhooks/{endpoint_id}").data)
    before = len(receiver.requests)
    response = client.post(
        f"/webhooks/{endpoint_id}/deliveries/{first.id}/resend", data={"csrf_token": token}
    )
    assert response.status_code == 303
    drain(app)
    resent = wait_for(lambda: receiver.requests[before:])
    assert [r["headers"]["webhook-id"] for r in resent] == [first.webhook_id]
    page = client.get(f"/webhooks/{endpoint_id}")
    assert page.status_code == 200 and first.webhook_id.encode() in page.data


def test_deliver_actor_declares_retries_and_a_time_limit(app):
    actor = app.extensions["switchboard.tasks"].actors["webhooks.deliver"]
    assert actor.options["max_retries"] >= 1
    assert 0 < actor.options["time_limit"] <= 300_000


# ---------------------------------------------------------------- duplicates


@pytest.mark.integration
def test_a_duplicated_deliver_message_posts_once(prod_hooks, receiver):
    from extensions import db

    app = prod_hooks
    messages = DeliverMessages(duplicate=True)
    app.extensions["switchboard.tasks"].broker.add_middleware(messages)
    with app.app_context():
        tenant_id = new_tenant(db)
        endpoint_id, _ = add_endpoint(db, tenant_id, receiver.url)
        worker = start_worker(app)
        try:
            ping(db, tenant_id)
            wait_for(lambda: [a for a in attempts(db, endpoint_id) if a.final])
            # Both copies were consumed (the copy of every message was enqueued too).
            wait_for(lambda: len(messages.sent) >= 2)
            drain_redis(app)
        finally:
            worker.stop()
        assert len(receiver.requests) == 1
        assert [a.succeeded for a in attempts(db, endpoint_id)] == [True]


def drain_redis(app) -> None:
    broker = app.extensions["switchboard.tasks"].broker
    for queue_name in broker.get_declared_queues():
        broker.join(queue_name, timeout=20_000)


@pytest.mark.integration
def test_two_concurrent_runs_of_one_delivery_post_once(prod_hooks):
    """The same delivery run at once in two threads (two workers that took copies of one
    message): the receiver answers slowly, so both are inside the delivery together."""
    from events.registry import registry
    from extensions import db

    app = prod_hooks
    slow = Receiver(delay=0.5)
    messages = DeliverMessages()
    app.extensions["switchboard.tasks"].broker.add_middleware(messages)
    try:
        with app.app_context():
            tenant_id = new_tenant(db)
            endpoint_id, _ = add_endpoint(db, tenant_id, slow.url)
            # Only the spine's events run: the delivery message stays queued for us to run.
            worker = start_worker(app, queues={"events"})
            try:
                ping(db, tenant_id)
                (message,) = wait_for(lambda: list(messages.sent))
            finally:
                worker.stop()
        deliver = registry.tasks["webhooks.deliver"].fn
        errors: list[BaseException] = []
        start = threading.Barrier(2)

        def run() -> None:
            with app.app_context():
                try:
                    start.wait()
                    deliver(*message.args, **message.kwargs)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                finally:
                    db.session.remove()

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert errors == []
        assert len(slow.requests) == 1
        with app.app_context():
            assert [a.succeeded for a in attempts(db, endpoint_id)] == [True]
    finally:
        slow.stop()


# ---------------------------------------------------------------- durable retries


@pytest.mark.integration
def test_a_retry_survives_redis_restarted_empty(tmp_path, pg_database_url, private_redis):
    from extensions import db

    overrides = prod_overrides(pg_database_url, private_redis.url)
    app = make_app(tmp_path, **overrides, **FAST)
    # Long enough to restart Redis before the retry is due.
    app.config["WEBHOOK_RETRY_MIN_MS"] = 2_000
    receiver = Receiver()
    receiver.plan = [500]
    with app.app_context():
        db.drop_all()
        db.create_all()
    worker = start_worker(app)
    try:
        with app.app_context():
            tenant_id = new_tenant(db)
            endpoint_id, _ = add_endpoint(db, tenant_id, receiver.url)
            ping(db, tenant_id)
            (first,) = wait_for(lambda: attempts(db, endpoint_id))
            assert first.status_code == 500 and not first.final

            private_redis.stop()
            private_redis.start()  # empty: no delayed message survives

            wait_for(lambda: [a for a in attempts(db, endpoint_id) if a.succeeded], timeout=30)
            assert len(receiver.requests) == 2
            assert receiver.ids()[0] == receiver.ids()[1] is not None
    finally:
        worker.stop()
        receiver.stop()
        shut_down_app(app)


@pytest.mark.integration
def test_a_retry_survives_the_queue_being_flushed(prod_hooks, receiver, redis_url):
    from extensions import db

    app = prod_hooks
    app.config["WEBHOOK_RETRY_MIN_MS"] = 1_500
    receiver.plan = [502]
    worker = start_worker(app)
    try:
        with app.app_context():
            tenant_id = new_tenant(db)
            endpoint_id, _ = add_endpoint(db, tenant_id, receiver.url)
            ping(db, tenant_id)
            wait_for(lambda: attempts(db, endpoint_id))
            cleanup_redis(redis_url, app.config["REDIS_PREFIX"], app.config["DRAMATIQ_NAMESPACE"])
            wait_for(lambda: [a for a in attempts(db, endpoint_id) if a.succeeded], timeout=30)
    finally:
        worker.stop()
    assert len(receiver.requests) == 2
    assert receiver.ids()[0] == receiver.ids()[1] is not None


@pytest.mark.integration
def test_a_fanout_whose_after_commit_send_never_ran_still_delivers(prod_hooks, receiver):
    """The fan-out handler's transaction commits (its idempotency record included) and the
    worker dies before the after-commit callback: the event counts as handled, and the
    delivery must still happen."""
    from events.outbox import AFTER_COMMIT
    from events.registry import Event
    from extensions import db
    from models.events import OutboxEvent, ProcessedEvent
    from tasks.webhooks import fanout

    app = prod_hooks
    with app.app_context():
        tenant_id = new_tenant(db)
        endpoint_id, _ = add_endpoint(db, tenant_id, receiver.url)
        ping(db, tenant_id)
        row = db.session.scalars(select(OutboxEvent).where(OutboxEvent.topic == "test.ping")).one()
        db.session.add(ProcessedEvent(event_id=row.id, handler="webhooks.fanout", status="ok"))
        fanout(Event.from_row(row))
        db.session.flush()
        db.session.info.pop(AFTER_COMMIT, None)  # the worker died right after the commit
        db.session.commit()

        worker = start_worker(app)
        try:
            wait_for(lambda: [a for a in attempts(db, endpoint_id) if a.succeeded], timeout=30)
        finally:
            worker.stop()
    assert len(receiver.requests) == 1


# ---------------------------------------------------------------- the database gone mid-delivery


@pytest.mark.integration
def test_a_post_whose_outcome_was_not_recorded_is_sent_again_with_the_same_id(tmp_path, redis_url):
    """PostgreSQL refuses connections from the moment the receiver gets the POST until a
    second later: the success cannot be recorded, so the delivery is made again (at least
    once) with the same webhook-id, and recorded once it can be."""
    import psycopg

    from extensions import db
    from tests.conftest import PG_URL

    with new_pg_database("hookdown") as url:
        name = url.rsplit("/", 1)[1]
        app = make_app(tmp_path, **prod_overrides(url, redis_url), **FAST)
        with app.app_context():
            db.create_all()
        receiver = Receiver()
        down = threading.Event()

        def database_goes_down() -> None:
            if down.is_set():
                return
            down.set()
            with psycopg.connect(PG_URL, autocommit=True) as admin:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )

        receiver.on_request = database_goes_down
        worker = start_worker(app)
        try:
            with app.app_context():
                tenant_id = new_tenant(db)
                endpoint_id, _ = add_endpoint(db, tenant_id, receiver.url)
                ping(db, tenant_id)
                db.session.remove()
            wait_for(down.is_set)
            time.sleep(1.0)  # how long the database stays away
            with psycopg.connect(PG_URL, autocommit=True) as admin:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            with app.app_context():
                wait_for(lambda: [a for a in attempts(db, endpoint_id) if a.succeeded], timeout=30)
                assert len(receiver.requests) == 2
                assert receiver.ids()[0] == receiver.ids()[1] is not None
                assert [a.succeeded for a in attempts(db, endpoint_id)].count(True) == 1
        finally:
            with psycopg.connect(PG_URL, autocommit=True) as admin:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            worker.stop()
            receiver.stop()
            shut_down_app(app, redis_url)


def test_a_delivery_message_queued_before_the_upgrade_is_still_delivered(
    app, db, worker, factory, receiver
):
    """Messages already in Redis at deploy time carry (endpoint id, event pk, attempt=…):
    they are delivered once, through a row like any other."""
    from models.events import OutboxEvent

    app.config.update(FAST)
    tenant_id = factory.tenant().id
    endpoint_id, _ = add_endpoint(db, tenant_id, receiver.url, topics=("nothing.*",))
    ping(db, tenant_id)  # matches no endpoint: only the queued message below sends it
    drain(app)
    event_pk = db.session.scalars(
        select(OutboxEvent.id).where(OutboxEvent.topic == "test.ping")
    ).one()
    actor = app.extensions["switchboard.tasks"].actors["webhooks.deliver"]
    for _ in range(2):
        actor.send_with_options(
            args=(endpoint_id, event_pk), kwargs={"attempt": 2, "is_resend": False}
        )
    drain(app)

    assert len(receiver.requests) == 1
    assert receiver.ids()[0].startswith("msg_")
    assert [a.succeeded for a in attempts(db, endpoint_id)] == [True]
