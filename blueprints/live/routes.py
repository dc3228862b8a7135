"""/ws/live: subscribe a page to the signed, tenant-scoped topics it was rendered with.

The socket first gets a snapshot of every topic (so a missed frame heals on reconnect), then
the topics' frames, coalesced: frames that arrive within LIVE_COALESCE_MS of the last send go
out as one message, coalesced by events.fanout.coalesce (replaces of one thing merge; appends
never do).

The process's broadcaster (events/fanout.py) writes the frames: each message is built and
encoded once for every socket that shares it. The socket's own thread renders snapshots and
otherwise sleeps until the client speaks, goes, or falls behind. A socket the broadcaster
cannot write to itself (TLS terminated in this process) is served by its thread alone.
"""

from __future__ import annotations

import functools
import queue
import socket
import time
from urllib.parse import urlsplit

from flask import Flask, current_app, request
from flask_login import current_user
from simple_websocket import ConnectionClosed

from events.fanout import coalesce, take_queued, wire_of
from extensions import db, sock
from services.live import hub, pages, render_snapshot, verify_topics

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


def refuse(ws, message: str) -> None:
    """Refuse a socket with 1008 (policy): clients must not retry. `closes_cleanly` ends it."""
    ws.close(reason=POLICY_VIOLATION, message=message)


def end_socket(ws) -> None:
    """Finish a WebSocket so the client sees our close code, on any server.

    After a route returns, Werkzeug's development server (embedded mode) writes an HTTP
    response onto the upgraded connection; a browser reads those bytes as an invalid frame
    and reports 1006 instead of our close code, so the widget would retry a refusal forever.
    Half-closing the socket after our close frame makes that late write fail quietly.
    """
    if ws.connected:
        try:
            ws.close()
        except ConnectionClosed:
            pass
    if ws.mode == "werkzeug":
        try:
            ws.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already closed by the client
    ws.thread.join(timeout=2)  # the client's answering close frame


def closes_cleanly(view):
    @functools.wraps(view)
    def wrapper(ws, *args, **kwargs):
        try:
            return view(ws, *args, **kwargs)
        finally:
            end_socket(ws)

    return wrapper


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
    @closes_cleanly
    def live_socket(ws):
        if not origin_allowed(current_app.config["LIVE_ALLOWED_ORIGINS"]):
            refuse(ws, "origin not allowed")
            return
        if not current_user.is_authenticated:
            refuse(ws, "login required")
            return
        topics = verify_topics(request.args.get("topics", ""), current_user)
        if topics is None:
            refuse(ws, "topics not allowed")
            return
        user = current_user._get_current_object()
        db.session.remove()
        wire = wire_of(ws)
        if wire is None:
            _relay_by_thread(ws, topics, user)
            return
        broadcaster = pages()
        peer = broadcaster.attach(ws, topics, wire)
        try:
            broadcaster.start(peer, _snapshot(topics, user))
            while ws.connected and not peer.dead:
                # Set by simple-websocket's reader (a message, the close) or the broadcaster.
                ws.event.wait(timeout=30)
                ws.event.clear()
                if peer.behind:
                    # This client fell behind: drop its backlog and send the current state.
                    peer.await_snapshot()
                    broadcaster.start(peer, _snapshot(topics, user))
                _drain_incoming(ws)
        except ConnectionClosed:
            pass
        finally:
            broadcaster.detach(peer)
            db.session.remove()


def _relay_by_thread(ws, topics: list[str], user) -> None:
    """Serve one socket from its own thread (a socket the broadcaster cannot write to)."""
    window = current_app.config["LIVE_COALESCE_MS"] / 1000
    subscription = hub().subscribe(topics, watch=True)
    try:
        ws.send(_snapshot(topics, user))
        while ws.connected:
            if subscription.overflowed:
                subscription.overflowed = False
                while not subscription.frames.empty():
                    subscription.frames.get_nowait()
                ws.send(_snapshot(topics, user))
            try:
                first = subscription.frames.get(timeout=1.0)
            except queue.Empty:
                _drain_incoming(ws)
                continue
            if window > 0:
                time.sleep(window)
            batch = coalesce([first, *take_queued(subscription)])
            html = "".join(f.html for f in batch if f.html)
            if html:
                ws.send(html)
            _drain_incoming(ws)
    except ConnectionClosed:
        pass
    finally:
        subscription.close()
        db.session.remove()
