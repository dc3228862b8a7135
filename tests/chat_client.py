"""A /ws/chat client for tests: speaks the widget's JSON protocol over a real socket."""

from __future__ import annotations

import json
import time
from typing import Any

import websocket


class ChatClient:
    def __init__(
        self,
        base_url: str,
        key: str,
        origin: str,
        visitor: str | None = None,
        cookie: str | None = None,
    ) -> None:
        url = base_url.replace("http://", "ws://") + f"/ws/chat?key={key}"
        if visitor:
            url += f"&visitor={visitor}"
        self.ws = websocket.WebSocket()
        self.ws.connect(url, origin=origin, timeout=10, cookie=cookie)
        self.frames: list[dict[str, Any]] = []
        self.welcome = self.expect("welcome")

    def send(self, type_: str, **fields: Any) -> None:
        self.ws.send(json.dumps({"type": type_, **fields}))

    def send_raw(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            self.ws.send_binary(data)
        else:
            self.ws.send(data)

    def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        self.ws.settimeout(timeout)
        frame = json.loads(self.ws.recv())
        self.frames.append(frame)
        return frame

    def expect(self, type_: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        """The next frame of this type (and fields); other frames are kept in self.frames."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {type_} frame {match} within {timeout}s: {self.frames}")
            frame = self.recv(remaining)
            if frame.get("type") == type_ and all(frame.get(k) == v for k, v in match.items()):
                return frame

    def collect_reply(self, timeout: float = 15.0) -> tuple[list[dict], dict]:
        """Deltas and the done frame of the next reply."""
        deltas: list[dict] = []
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv(max(0.1, deadline - time.monotonic()))
            if frame["type"] == "delta":
                deltas.append(frame)
            elif frame["type"] == "done":
                return deltas, frame

    def close(self) -> None:
        self.ws.close()
