"""/ws/live: subscribe a page to the signed, tenant-scoped topics it was rendered with.

The socket first gets a snapshot of every topic (so a missed frame heals on reconnect), then
the topics' frames, coalesced: frames that arrive within LIVE_COALESCE_MS are sent as one
message, and of several frames with the same key only the newest is sent. One thread owns
all writes to the socket; it polls for a closed client so a dead browser frees its thread.
"""

from __future__ import annotations

import queue
import time
from urllib.parse import urlsplit

from flask import Flask, current_app, request
from flask_login import current_user
from simple_websocket import ConnectionClosed

from extensions import db, sock
from services.live import hub, render_snapshot, verify_topics

POLICY_VIOLATION = 1008


def origin_allowed(allowed_extra: list[str]) -> bool:
    origin = request.headers.get("Origin")
    if not origin:
        return False
    parts = urlsplit(origin)
    own = urlsplit(request.host_url)
    if parts.scheme in ("http", "https") and parts.netloc == own.netloc:
        return True
    return origin.rstrip("/") in {o.rstrip("/") for o in allowed_extra}


def _drain_incoming(ws) -> None:
    # The page never needs to talk on this socket; reading keeps close frames flowing.
    while ws.receive(timeout=0) is not None:
        pass


def _snapshot(topics: list[str], user) -> str:
    try:
        return "".join(render_snapshot(topic, user) for topic in topics)
    finally:
        # Hand the connection back: a socket may stay open for hours.
        db.session.remove()


def register_live_routes(app: Flask) -> None:
    @sock.route("/ws/live")
    def live_socket(ws):
        if not origin_allowed(current_app.config["LIVE_ALLOWED_ORIGINS"]):
            ws.close(reason=POLICY_VIOLATION, message="origin not allowed")
            return
        if not current_user.is_authenticated:
            ws.close(reason=POLICY_VIOLATION, message="login required")
            return
        topics = verify_topics(request.args.get("topics", ""), current_user)
        if topics is None:
            ws.close(reason=POLICY_VIOLATION, message="topics not allowed")
            return
        user = current_user._get_current_object()
        db.session.remove()
        coalesce = current_app.config["LIVE_COALESCE_MS"] / 1000
        subscription = hub().subscribe(topics)
        try:
            ws.send(_snapshot(topics, user))
            while ws.connected:
                if subscription.overflowed:
                    # This client fell behind: drop the backlog and send the current state.
                    subscription.overflowed = False
                    while not subscription.frames.empty():
                        subscription.frames.get_nowait()
                    ws.send(_snapshot(topics, user))
                try:
                    first = subscription.frames.get(timeout=1.0)
                except queue.Empty:
                    _drain_incoming(ws)
                    continue
                batch = {first.key: first}
                deadline = time.monotonic() + coalesce
                while (remaining := deadline - time.monotonic()) > 0:
                    try:
                        frame = subscription.frames.get(timeout=remaining)
                    except queue.Empty:
                        break
                    batch.pop(frame.key, None)
                    batch[frame.key] = frame
                # Pages swap HTML; JSON-only frames (for the chat widget) are not for them.
                html = "".join(f.html for f in batch.values() if f.html)
                if html:
                    ws.send(html)
                _drain_incoming(ws)
        except ConnectionClosed:
            pass
        finally:
            subscription.close()
            db.session.remove()
