"""Outbound addresses: webhooks and device pollers connect only where the policy allows, to the
exact address that was checked; manufacturers are a catalog tenants cannot extend.

DNS is not available here, so names are answered by a stand-in for socket.getaddrinfo that
knows a few test names and hands every other lookup to the real one. No test sends traffic
off this machine: a connection to a non-loopback address is stopped and recorded instead.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import func, select

from events import emit
from models.devices import DeviceEndpoint, Manufacturer
from models.webhooks import WebhookDelivery, WebhookEndpoint
from tests.conftest import csrf_token_from, drain, login

PUBLIC_LOOKING = "93.184.215.14"


class LocalReceiver:
    """An HTTP server on a loopback address that records the requests it gets."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, status: int = 200, location=""):
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append({"headers": dict(self.headers), "body": body})
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_GET = do_POST  # noqa: N815 - a followed redirect would arrive as a GET

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    started: list[LocalReceiver] = []

    def start(**kwargs) -> LocalReceiver:
        started.append(LocalReceiver(**kwargs))
        return started[-1]

    yield start
    for receiver in started:
        receiver.stop()


class FakeDNS:
    """Answers for test names, one answer per lookup in turn (the last one repeats)."""

    def __init__(self, monkeypatch) -> None:
        self.answers: dict[str, list] = {}
        self.lookups: dict[str, int] = {}
        real = socket.getaddrinfo

        def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):  # noqa: A002
            name = host.decode() if isinstance(host, bytes) else host
            if name not in self.answers:
                return real(host, port, family, type, proto, flags)
            count = self.lookups[name] = self.lookups.get(name, 0) + 1
            plan = self.answers[name]
            answer = plan[min(count, len(plan)) - 1]
            if isinstance(answer, Exception):
                raise answer
            port_number = int(port or 0)
            result = []
            for address in answer:
                ip = ipaddress.ip_address(address)
                if ip.version == 6:
                    sockaddr = (address, port_number, 0, 0)
                    result.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", sockaddr))
                else:
                    sockaddr = (address, port_number)
                    result.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", sockaddr))
            return result

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    def answer(self, name: str, *answers) -> None:
        self.answers[name] = list(answers)
        self.lookups[name] = 0


@pytest.fixture
def dns(monkeypatch):
    return FakeDNS(monkeypatch)


@pytest.fixture
def offsite(monkeypatch):
    """Connections to non-loopback addresses are recorded and refused, never sent."""
    attempts: list[tuple[str, int]] = []
    real = socket.create_connection

    def create_connection(address, *args, **kwargs):
        try:
            ip = ipaddress.ip_address(address[0])
        except ValueError:
            ip = None
        if ip is not None and not ip.is_loopback:
            attempts.append((str(ip), int(address[1])))
            raise ConnectionRefusedError(f"test: no traffic to {ip}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    return attempts


@pytest.fixture
def fast(app):
    app.config.update(
        WEBHOOK_RETRY_MIN_MS=50,
        WEBHOOK_RETRY_MAX_MS=100,
        WEBHOOK_TIMEOUT_SECONDS=3,
        WEBHOOK_MAX_ATTEMPTS=2,
        WEBHOOK_DISABLE_AFTER_FAILURES=0,
    )
    return app


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def deliveries(db, endpoint_id):
    db.session.expire_all()
    return db.session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint_id)
        .order_by(WebhookDelivery.id)
    ).all()


def endpoint_for(db, tenant, url: str) -> int:
    endpoint = WebhookEndpoint(tenant_id=tenant.id, url=url, topics=["test.*"])
    db.session.add(endpoint)
    db.session.commit()
    return endpoint.id


def ping(db, tenant) -> None:
    emit("test.ping", tenant_id=tenant.id, payload={"n": 1}, entity="test", entity_id=1)
    db.session.commit()


def post_webhook_form(client, url: str):
    token = csrf_token_from(client.get("/webhooks/").data)
    return client.post("/webhooks/", data={"csrf_token": token, "url": url, "topics": "*"})


def loopback_names_in_hosts_file() -> list[str]:
    names = []
    with open("/etc/hosts") as hosts:
        for line in hosts:
            fields = line.split("#")[0].split()
            if len(fields) >= 2 and fields[0].startswith("127."):
                names.extend(n for n in fields[1:] if n != "localhost")
    return names[:2]


# ---------------------------------------------------------------- webhooks: on save


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/",
        "http://0x7f000001/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://0/",
        "http://localhost./",
        "http://LOCALHOST:6379/",
        "http://[::ffff:127.0.0.1]/",
        *(f"http://{name}/hook" for name in loopback_names_in_hosts_file()),
    ],
)
def test_loopback_in_disguise_is_refused_by_the_form(app, client, factory, url):
    app.config["WEBHOOK_ALLOW_PRIVATE_NETWORKS"] = False
    login(client, factory.user(factory.tenant(), role="admin"))

    response = post_webhook_form(client, url)

    assert response.status_code == 422, url
    assert b"private network" in response.data
    assert b'class="field-error"' in response.data
    with app.app_context():
        from extensions import db

        assert db.session.scalar(select(func.count()).select_from(WebhookEndpoint)) == 0


def test_a_name_that_resolves_into_the_private_network_is_refused(app, client, factory, dns):
    app.config["WEBHOOK_ALLOW_PRIVATE_NETWORKS"] = False
    dns.answer("intranet.test", [PUBLIC_LOOKING, "10.1.2.3"])
    dns.answer("public.test", [PUBLIC_LOOKING])
    dns.answer("nowhere.test", socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    login(client, factory.user(factory.tenant(), role="admin"))

    assert b"private network" in post_webhook_form(client, "https://intranet.test/h").data
    unresolved = post_webhook_form(client, "https://nowhere.test/h")
    assert unresolved.status_code == 422 and b"could not be resolved" in unresolved.data
    assert post_webhook_form(client, "https://public.test/h").status_code == 303


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://0xa9fea9fe/latest/meta-data/",  # 169.254.169.254 in hex
        "http://[::ffff:169.254.169.254]/",
        "http://100.100.100.200/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[fe80::1]/",
    ],
)
def test_metadata_addresses_are_refused_even_with_private_networks_allowed(
    app, client, factory, url
):
    assert app.config["WEBHOOK_ALLOW_PRIVATE_NETWORKS"]
    login(client, factory.user(factory.tenant(), role="admin"))

    response = post_webhook_form(client, url)

    assert response.status_code == 422, url
    assert b"metadata" in response.data
    # A private address is still fine with the setting on.
    assert post_webhook_form(client, "http://127.1:9/hook").status_code == 303


# ---------------------------------------------------------------- webhooks: at delivery


def test_dns_rebinding_after_the_check_cannot_reach_loopback(
    app, db, worker, fast, factory, dns, offsite, receivers
):
    app.config["WEBHOOK_ALLOW_PRIVATE_NETWORKS"] = False
    local = receivers()
    # Public when checked, loopback on every later lookup.
    dns.answer("rebind.test", [PUBLIC_LOOKING], ["127.0.0.1"])
    tenant = factory.tenant()
    endpoint_id = endpoint_for(db, tenant, f"http://rebind.test:{local.port}/hook")

    ping(db, tenant)
    drain(app)
    rows = wait_for(lambda: [d for d in deliveries(db, endpoint_id) if d.final])

    assert local.requests == []
    # The first attempt went to the address that was checked, not to a second lookup's.
    assert offsite[0] == (PUBLIC_LOOKING, local.port)
    first = deliveries(db, endpoint_id)[0]
    assert not first.succeeded and "network error" in first.error
    assert "private network" in rows[-1].error  # the retry's lookup said loopback: refused


def test_a_failed_lookup_fails_closed_and_is_retried(
    app, db, worker, fast, factory, dns, receivers
):
    app.config["WEBHOOK_ALLOW_PRIVATE_NETWORKS"] = False
    local = receivers()
    dns.answer(
        "flaky.test",
        socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        ["127.0.0.1"],
    )
    tenant = factory.tenant()
    endpoint_id = endpoint_for(db, tenant, f"http://flaky.test:{local.port}/hook")

    ping(db, tenant)
    drain(app)
    rows = wait_for(lambda: [d for d in deliveries(db, endpoint_id) if d.final])

    assert local.requests == []
    first = deliveries(db, endpoint_id)[0]
    assert not first.succeeded and not first.final  # retryable, like a network error
    assert "could not be resolved" in first.error and "flaky.test" in first.error
    assert rows[-1].attempt == 2


def test_delivery_goes_to_the_checked_address_with_the_original_host(
    app, db, worker, fast, factory, dns, receivers
):
    """Private networks allowed (as the tests' receivers need): a name still reaches the
    address its one lookup gave, and the receiver sees the name in the Host header."""
    first = receivers(host="127.0.0.1")
    second = receivers(host="127.0.0.2", port=first.port)
    dns.answer("hooks.test", ["127.0.0.1"], ["127.0.0.2"])
    tenant = factory.tenant()
    endpoint_id = endpoint_for(db, tenant, f"http://hooks.test:{first.port}/hook?x=1")

    ping(db, tenant)
    drain(app)
    (row,) = wait_for(lambda: deliveries(db, endpoint_id))

    assert row.succeeded and row.status_code == 200
    assert len(first.requests) == 1 and second.requests == []
    assert first.requests[0]["headers"]["Host"] == f"hooks.test:{first.port}"
    assert dns.lookups["hooks.test"] == 1


def test_redirects_are_not_followed(app, db, worker, fast, factory, receivers):
    target = receivers()
    redirecting = receivers(status=307, location=target.url)
    tenant = factory.tenant()
    endpoint_id = endpoint_for(db, tenant, redirecting.url)

    ping(db, tenant)
    drain(app)
    (row,) = wait_for(lambda: deliveries(db, endpoint_id))

    assert len(redirecting.requests) == 1 and target.requests == []
    assert row.status_code == 307 and row.final and not row.succeeded


def _self_signed(tmp_path, name: str):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName=DNS:{name}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_pinned_connection_verifies_the_original_name(tmp_path, receivers):
    from services.netpolicy import PinnedHTTPSConnection

    cert, key = _self_signed(tmp_path, "hooks.test")
    plain = receivers()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    plain.server.socket = server_context.wrap_socket(plain.server.socket, server_side=True)
    client_context = ssl.create_default_context(cafile=str(cert))
    loopback = [ipaddress.ip_address("127.0.0.1")]

    good = PinnedHTTPSConnection("hooks.test", plain.port, loopback, 3.0, context=client_context)
    good.request("POST", "/hook", body=b"{}")
    assert good.getresponse().status == 200
    good.close()
    assert plain.requests[0]["headers"]["Host"] == f"hooks.test:{plain.port}"

    # The certificate is checked against the URL's name, not the address connected to.
    wrong = PinnedHTTPSConnection("other.test", plain.port, loopback, 3.0, context=client_context)
    with pytest.raises(ssl.SSLCertVerificationError):
        wrong.request("POST", "/hook", body=b"{}")
    wrong.close()
    assert len(plain.requests) == 1


# ---------------------------------------------------------------- device endpoints


@pytest.fixture
def venue(app, factory):
    from extensions import db
    from services.manufacturers.endpoints import manufacturer_for

    tenant = factory.tenant("Venue")
    admin = factory.user(tenant, role="admin")
    with app.app_context():
        shure_id = manufacturer_for("shure").id
        db.session.commit()
    return tenant, admin, shure_id


def post_endpoint_form(client, shure_id: int, host: str, port="2202"):
    token = csrf_token_from(client.get("/devices/settings").data)
    return client.post(
        "/devices/settings",
        data={
            "csrf_token": token,
            "action": "endpoint",
            "ep-manufacturer_id": str(shure_id),
            "ep-host": host,
            "ep-port": port,
            "ep-location_id": "0",
        },
    )


def endpoint_hosts(app) -> list[str]:
    with app.app_context():
        from extensions import db

        return list(db.session.scalars(select(DeviceEndpoint.host).order_by(DeviceEndpoint.id)))


def test_endpoint_form_checks_host_port_and_allowed_networks(app, client, venue):
    _, admin, shure_id = venue
    login(client, admin)
    for host, port, message in (
        ("169.254.169.254", "80", b"metadata"),
        ("[fe80::1]", "2202", b"metadata"),
        ("8.8.8.8", "2202", b"DEVICES_ALLOWED_NETWORKS"),
        ("0xa9fea9fe", "80", b"metadata"),
        ("rx one!", "2202", b"not a valid host"),
        ("10.20.30.40", "0", b"between 1 and 65535"),
        ("10.20.30.40", "65536", b"between 1 and 65535"),
    ):
        response = post_endpoint_form(client, shure_id, host, port)
        assert response.status_code == 422, (host, port)
        assert message in response.data and b'class="field-error"' in response.data, host
    assert endpoint_hosts(app) == []

    assert post_endpoint_form(client, shure_id, "10.20.30.40").status_code == 303
    assert endpoint_hosts(app) == ["10.20.30.40"]

    # Metadata stays refused even when the setting allows everything.
    app.config["DEVICES_ALLOWED_NETWORKS"] = "0.0.0.0/0,::/0"
    assert post_endpoint_form(client, shure_id, "169.254.169.254").status_code == 422
    assert post_endpoint_form(client, shure_id, "8.8.8.8").status_code == 303


def test_cli_refuses_endpoints_outside_the_policy(app, venue):
    runner = app.test_cli_runner()
    for address, message in (
        ("169.254.169.254:80", "metadata"),
        ("8.8.8.8", "DEVICES_ALLOWED_NETWORKS"),
        ("bad_host!:2202", "not a valid host"),
    ):
        result = runner.invoke(args=["devices", "endpoints", "add", address, "--tenant", "Venue"])
        assert result.exit_code == 1 and message in result.output, (address, result.output)
        assert "Traceback" not in result.output
    assert endpoint_hosts(app) == []
    added = runner.invoke(args=["devices", "endpoints", "add", "10.9.8.7", "--tenant", "Venue"])
    assert added.exit_code == 0, added.output


def test_loopback_endpoints_need_the_simulator_or_the_setting(app):
    from config import Config
    from services import netpolicy

    defaults = Config()
    assert not netpolicy.device_address_problem(ipaddress.ip_address("192.168.1.20"), defaults)
    assert netpolicy.device_address_problem(ipaddress.ip_address("127.0.0.1"), defaults)
    defaults.DEVICES_SIMULATOR_RECEIVERS = 4  # `make run`
    assert not netpolicy.device_address_problem(ipaddress.ip_address("127.0.0.1"), defaults)
    assert netpolicy.device_address_problem(ipaddress.ip_address("169.254.169.254"), defaults)


def test_poller_refuses_a_host_that_now_resolves_outside_the_policy(app, client, venue, dns):
    """Saved while `rx.test` was a LAN address; it now points at a service on this machine.
    The poller resolves it, refuses to connect, and the settings page says why."""
    from services.manufacturers.shure import service as shure_service
    from services.manufacturers.simulator import SimulatedReceiver

    tenant, admin, shure_id = venue
    app.config["DEVICES_ALLOWED_NETWORKS"] = "10.0.0.0/8"
    dns.answer("rx.test", ["10.0.0.7"])
    login(client, admin)
    try:
        with SimulatedReceiver("ULXD4D", device_id="LOCAL-RX", seed=3) as local:
            saved = post_endpoint_form(client, shure_id, "rx.test", str(local.port))
            assert saved.status_code == 303
            assert endpoint_hosts(app) == ["rx.test"]
            dns.answer("rx.test", ["127.0.0.1"])
            with app.app_context():
                from extensions import db

                endpoint = db.session.scalars(select(DeviceEndpoint)).one()
                reports = shure_service.fetch([endpoint], timeout=1.0)
            assert [r.online for r in reports] == [False]
            assert local.client_count == 0
            page = client.get("/devices/settings")
            assert b"refused" in page.data and b"DEVICES_ALLOWED_NETWORKS" in page.data
    finally:
        shure_service.shutdown()


# ---------------------------------------------------------------- manufacturers


def test_tenant_admins_cannot_add_manufacturers(app, client, venue):
    _, admin, _ = venue
    login(client, admin)
    page = client.get("/devices/settings")
    assert b"Add manufacturer" not in page.data
    response = client.post(
        "/devices/settings",
        data={
            "csrf_token": csrf_token_from(page.data),
            "action": "manufacturer",
            "man-code": "evil",
            "man-name": "Everyone sees this",
        },
    )
    assert response.status_code in (403, 404)
    with app.app_context():
        from extensions import db

        assert db.session.scalars(select(Manufacturer.code)).all() == ["shure"]


def test_catalog_is_seeded_from_code_and_the_cli(app, client, factory):
    with app.app_context():
        from extensions import db

        assert db.session.scalars(select(Manufacturer)).all() == []
    runner = app.test_cli_runner()
    seeded = runner.invoke(args=["devices", "manufacturers", "seed"])
    assert seeded.exit_code == 0 and "shure" in seeded.output, seeded.output
    again = runner.invoke(args=["devices", "manufacturers", "seed"])
    assert again.exit_code == 0
    added = runner.invoke(args=["devices", "manufacturers", "add", "acme", "Acme Audio"])
    assert added.exit_code == 0, added.output
    bad = runner.invoke(args=["devices", "manufacturers", "add", "Bad Code!", "X"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    listed = runner.invoke(args=["devices", "manufacturers", "list"])
    assert "acme" in listed.output and "Acme Audio" in listed.output and "shure" in listed.output
    with app.app_context():
        from extensions import db

        codes = db.session.scalars(select(Manufacturer.code).order_by(Manufacturer.code)).all()
    assert codes == ["acme", "shure"]


def test_settings_page_seeds_the_known_services(app, client, factory):
    login(client, factory.user(factory.tenant(), role="admin"))
    page = client.get("/devices/settings")
    assert page.status_code == 200 and b">Shure</option>" in page.data


def test_make_run_simulator_is_polled_with_the_default_policy(app, db, worker):
    """`make run`: no DEVICES_ALLOWED_NETWORKS, DEVICES_SIMULATOR_RECEIVERS=4 on 127.0.0.1.
    Without simulated receivers, loopback endpoints are refused from the start."""
    from models.accounts import Tenant
    from services import devices as device_service
    from services.demo import DEMO_RECEIVERS, DEMO_TENANT, load_demo
    from services.manufacturers.shure import service as shure_service
    from services.manufacturers.simulator import start_demo_fleet

    app.config.update(DEVICES_ALLOWED_NETWORKS="", DEVICES_SIMULATOR_RECEIVERS=0)
    load_demo()
    db.session.commit()
    with pytest.raises(ValueError, match="DEVICES_ALLOWED_NETWORKS"):
        start_demo_fleet(app, 1)
    db.session.rollback()

    app.config["DEVICES_SIMULATOR_RECEIVERS"] = len(DEMO_RECEIVERS)
    demo = db.session.scalar(select(Tenant).where(Tenant.name == DEMO_TENANT))
    fleet = start_demo_fleet(app, len(DEMO_RECEIVERS))
    try:
        result = device_service.poll_service(demo.id, "shure")
        drain(app)
    finally:
        fleet.stop()
        shure_service.shutdown()
    assert result.status == "success" and result.online_count == result.device_count >= 4
