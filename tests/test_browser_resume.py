"""Fault drill in a real browser: the widget's socket is cut mid-reply; the widget reconnects
with back-off and the reply continues where it stopped — no text lost, none repeated."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from playwright.sync_api import expect

from tests.browser import chromium
from tests.fake_openai import FakeOpenAI, Script
from tests.test_browser_widget import _allow, host_site, shop  # noqa: F401 - fixtures

pytestmark = pytest.mark.browser

REPLY = " ".join(f"word{n}" for n in range(40)) + "."


class CuttableProxy:
    """A TCP proxy in front of the console whose open connections can all be cut at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections: list[socket.socket] = []
        self.accepted = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.connections += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Drop every open connection abruptly (a network failure, not a clean close)."""
        with self.lock:
            connections, self.connections = self.connections, []
        for s in connections:
            # No WebSocket close frame: the browser sees the connection simply end (1006).
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.fixture
def slow_upstream(app):
    fake = FakeOpenAI(Script(reply=REPLY, chunk_delay=0.08)).start()
    app.config.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="test-key")
    yield fake
    fake.stop()


def test_socket_cut_mid_reply_reconnects_and_resumes(
    app,
    db,
    worker,
    live_server,
    slow_upstream,
    shop,  # noqa: F811
):
    proxy = CuttableProxy(live_server.port)
    try:
        with host_site(proxy.url, shop.widget_key) as site, chromium() as browser:
            _allow(db, shop, site)
            page = browser.new_context().new_page()
            page.set_default_timeout(15_000)
            page.goto(site + "/")
            page.locator("#switchboard-chat .launcher").click()
            page.locator("#switchboard-chat textarea").fill("Tell me a long story")
            page.locator("#switchboard-chat textarea").press("Enter")
            reply = page.locator("#switchboard-chat .msg.assistant").last
            expect(reply).to_contain_text("word5")
            connections_before = proxy.accepted
            proxy.cut()
            cut_text = reply.inner_text()
            assert "word39." not in cut_text  # the cut really was mid-reply
            # The widget reconnects by itself (a new connection through the proxy) ...
            deadline = time.monotonic() + 15
            while proxy.accepted == connections_before and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proxy.accepted > connections_before
            # ... and the reply completes exactly once, without gaps or repeats.
            expect(reply).to_have_text(REPLY, timeout=30_000)
            assert page.locator("#switchboard-chat .msg.assistant").count() == 1
    finally:
        proxy.close()
