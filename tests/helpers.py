"""Helpers for tests that talk to a real server over HTTP and WebSocket."""

from __future__ import annotations

import re
import time

import requests
import websocket


class Browserless:
    """A logged-in HTTP session against a live server, able to open /ws/live sockets."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = requests.Session()

    def login(self, email: str, password: str) -> Browserless:
        page = self.http.get(self.base_url + "/login", timeout=10)
        token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.text).group(1)
        response = self.http.post(
            self.base_url + "/login",
            data={"email": email, "password": password, "csrf_token": token},
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

    def open_socket(self, ws_path: str, origin: str | None = None) -> websocket.WebSocket:
        cookie = "; ".join(f"{c.name}={c.value}" for c in self.http.cookies)
        ws = websocket.WebSocket()
        if not ws_path.startswith(("ws://", "wss://")):
            ws_path = self.base_url.replace("http://", "ws://") + ws_path
        ws.connect(
            ws_path,
            cookie=cookie,
            origin=origin or self.base_url,
            timeout=5,
        )
        return ws


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
