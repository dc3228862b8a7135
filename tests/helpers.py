"""Helpers for tests that talk to a real server over HTTP and WebSocket."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time

import requests
import websocket


class Browserless:
    """A logged-in HTTP session against a live server, able to open /ws/live sockets."""

    def __init__(self, base_url: str, ca_file: str | None = None) -> None:
        self.base_url = base_url
        self.http = requests.Session()
        self.tls = ca_file is not None  # an https server whose certificate is ca_file
        if ca_file is not None:
            self.http.verify = ca_file
            self.http.trust_env = False  # else REQUESTS_CA_BUNDLE would override verify

    def login(self, email: str, password: str) -> Browserless:
        page = self.http.get(self.base_url + "/login", timeout=10)
        token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.text).group(1)
        response = self.http.post(
            self.base_url + "/login",
            data={"email": email, "password": password, "csrf_token": token},
            headers={"Referer": self.base_url + "/login"},  # as a browser; https checks it
            allow_redirects=False,
            timeout=10,
        )
        assert response.status_code == 303, response.text[:300]
        return self

    def live_url(self, path: str = "/") -> str:
        """The /ws/live URL (with its signed topics) that the page at `path` connects to."""
        page = self.http.get(self.base_url + path, timeout=10)
        match = re.search(r'hx-ws:connect="([^"]+)"', page.text)
        assert match, "page has no live connection"
        return match.group(1).replace("&amp;", "&")

    def _socket_target(self, ws_path: str) -> tuple[str, str]:
        """The absolute ws(s):// URL for `ws_path`, and this session's Cookie header."""
        cookie = "; ".join(f"{c.name}={c.value}" for c in self.http.cookies)
        if not ws_path.startswith(("ws://", "wss://")):
            ws_path = self.base_url.replace("http", "ws", 1) + ws_path
        return ws_path, cookie

    def open_socket(self, ws_path: str, origin: str | None = None) -> websocket.WebSocket:
        ws_path, cookie = self._socket_target(ws_path)
        ws = websocket.WebSocket(sslopt={"ca_certs": self.http.verify} if self.tls else None)
        ws.connect(
            ws_path,
            cookie=cookie,
            origin=origin or self.base_url,
            timeout=5,
        )
        return ws

    def open_deflate_socket(self, ws_path: str, recv_buffer: int | None = None) -> DeflateSocket:
        """Like open_socket, but negotiating permessage-deflate as a browser does."""
        ws_path, cookie = self._socket_target(ws_path)
        return DeflateSocket(ws_path, cookie, self.base_url, recv_buffer=recv_buffer)


def receive_until(ws: websocket.WebSocket, predicate, timeout: float = 5.0) -> list[str]:
    """Collect text frames until one satisfies predicate; raises if none does in time."""
    frames: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ws.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            frame = ws.recv()
        except websocket.WebSocketTimeoutException:
            break
        frames.append(frame)
        if predicate(frame):
            return frames
    raise AssertionError(f"no matching frame within {timeout}s; got {frames!r}"[:2000])


def receive_for(ws: websocket.WebSocket, seconds: float) -> list[str]:
    """Everything that arrives within `seconds`."""
    frames: list[str] = []
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        ws.settimeout(remaining)
        try:
            frames.append(ws.recv())
        except (websocket.WebSocketTimeoutException, websocket.WebSocketConnectionClosedException):
            break
    return frames


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def stop_process(process) -> None:
    """Terminate a child process (a `dramatiq` worker), killing it if it lingers."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stderr is not None:
        process.stderr.close()


def worker_process_env(app, instance_dir, **extra: str) -> dict[str, str]:
    """The environment of a separate `dramatiq tasks.worker` process for a production-mode
    test app: the same database, Redis namespace and secret, its own instance folder."""
    import os
    from pathlib import Path

    cfg = app.config
    root = Path(__file__).resolve().parent.parent
    return dict(
        os.environ,
        DATABASE_URL=cfg["SQLALCHEMY_DATABASE_URI"],
        REDIS_URL=cfg["REDIS_URL"],
        REDIS_PREFIX=cfg["REDIS_PREFIX"],
        DRAMATIQ_NAMESPACE=cfg["DRAMATIQ_NAMESPACE"],
        SECRET_KEY=cfg["SECRET_KEY"],
        SWITCHBOARD_INSTANCE=str(instance_dir),
        PYTHONPATH=str(root),
        **extra,
    )


class DeflateSocket:
    """A WebSocket client that negotiates permessage-deflate, as browsers do (wsproto over a
    plain socket; websocket-client cannot). `recv_buffer` shrinks the kernel's receive buffer
    (set before connecting) so a client that stops reading backs up quickly."""

    def __init__(self, url: str, cookie: str, origin: str, recv_buffer: int | None = None):
        import socket
        from urllib.parse import urlsplit

        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, Request
        from wsproto.extensions import PerMessageDeflate

        parts = urlsplit(url)
        self.sock = socket.socket()
        if recv_buffer:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        self.sock.settimeout(5)
        self.sock.connect((parts.hostname, parts.port))
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.extension = PerMessageDeflate()
        target = parts.path + ("?" + parts.query if parts.query else "")
        self.sock.sendall(
            self.conn.send(
                Request(
                    host=parts.netloc,
                    target=target,
                    extensions=[self.extension],
                    extra_headers=[(b"cookie", cookie.encode()), (b"origin", origin.encode())],
                )
            )
        )
        self._messages: list[str] = []
        self._partial = ""
        self.wire_bytes = 0  # bytes received after the handshake
        self.close_code: int | None = None
        self.pings = 0
        self.accepted = False
        while not self.accepted:
            self.conn.receive_data(self.sock.recv(65536))
            for event in self.conn.events():
                if isinstance(event, AcceptConnection):
                    self.accepted = True
                else:
                    self._handle(event)

    def _handle(self, event) -> None:
        from wsproto.events import CloseConnection, Ping, TextMessage

        if isinstance(event, CloseConnection):
            # wsproto reports a malformed stream as a close with 1002 / 1007 of its own.
            self.close_code = event.code
        elif isinstance(event, Ping):
            self.pings += 1
            self.sock.sendall(self.conn.send(event.response()))
        elif isinstance(event, TextMessage):
            self._partial += event.data
            if event.message_finished:
                self._messages.append(self._partial)
                self._partial = ""

    def recv(self, timeout: float = 5.0) -> str | None:
        """The next text message, or None if none arrives within `timeout`."""

        deadline = time.monotonic() + timeout
        while not self._messages:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                return None
            if not data:
                return None
            self.wire_bytes += len(data)
            self.conn.receive_data(data)
            for event in self.conn.events():
                self._handle(event)
        return self._messages.pop(0)

    def read_slowly(self, seconds: float, chunk: int = 16384, pause: float = 0.005) -> None:
        """Read in small sips for `seconds` (a client on a slow link), keeping messages."""
        deadline = time.monotonic() + seconds
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(chunk)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return
            if not data:
                return
            self.wire_bytes += len(data)
            self.conn.receive_data(data)
            for event in self.conn.events():
                self._handle(event)
            time.sleep(pause)

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- the Shure tests' apps


@contextlib.contextmanager
def shure_app(tmp_path, overrides: dict):
    """An embedded app with its tables for the device tests; afterwards the Shure client, whose
    connections belong to the process and outlive any one app, is closed and reset."""
    from extensions import db
    from services.manufacturers.shure import ShureSettings
    from services.manufacturers.shure import service as shure_service
    from tests.conftest import make_app

    application = make_app(tmp_path, **overrides)
    with application.app_context():
        db.create_all()
    try:
        yield application
    finally:
        shure_service.shutdown()
        shure_service.settings = ShureSettings()
        application.extensions["switchboard.tasks"].stop()
        with application.app_context():
            db.engine.dispose()


@contextlib.contextmanager
def handlers_only(app):
    """The embedded worker runs the handlers; the scheduler does not, so only the polls and
    periodic jobs a test runs itself happen (its first round ran before any endpoint existed)."""
    state = app.extensions["switchboard.tasks"]
    state.start_embedded_worker()
    state.scheduler.stop()
    state.scheduler = None
    try:
        yield state
    finally:
        state.stop()


@contextlib.contextmanager
def statements_run():
    """The SQL statements the app's engine runs meanwhile, each as (its transaction's
    identity, its text): the embedded worker's threads run statements side by side."""
    from sqlalchemy import event

    from extensions import db

    statements: list[tuple[int, str]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        statements.append((id(conn.get_transaction()), statement))

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(db.engine, "before_cursor_execute", record)


def transaction_running(statements: list[tuple[int, str]], prefix: str) -> list[str]:
    """The statements of the first transaction that ran one starting with `prefix`."""
    txn = next(txn for txn, text in statements if text.startswith(prefix))
    return [text for t, text in statements if t == txn]
