"""/ws/chat: the embeddable widget's socket. JSON frames both ways (see the README).

One thread reads the visitor's frames; a second pumps the chat topic's frames to the socket.
Every write goes through one lock (flask-sock's send is not thread-safe). A reply stream is
only ever sent to a socket that owns the chat: the widget's visitor (signed visitor token) or
a logged-in user of the chat's tenant who started it.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
from typing import Any
from urllib.parse import urlsplit

from flask import current_app, request
from flask_login import current_user
from itsdangerous import BadSignature, URLSafeSerializer
from simple_websocket import ConnectionClosed
from sqlalchemy import bindparam, select
from sqlalchemy.orm import joinedload

from blueprints.live.routes import closes_cleanly, refuse
from events import on_commit
from extensions import db, sock
from models.accounts import Tenant
from models.chats import Chat
from services import chat_live, chats
from services.chats import ChatError, chat_topic
from services.kv import kv
from services.live import bus, hub

log = logging.getLogger(__name__)
HISTORY_PAGE = 20
# A frame's chat with its agent (every frame starts with a new session), built once: a
# statement built per frame costs its cache key again.
_CHAT_WITH_AGENT = (
    select(Chat).options(joinedload(Chat.agent)).where(Chat.id == bindparam("chat_id"))
)


def _visitor_serializer() -> URLSafeSerializer:
    return URLSafeSerializer(current_app.config["SECRET_KEY"], salt="chat-visitor")


def sign_visitor(tenant_id: int, visitor_id: str) -> str:
    return _visitor_serializer().dumps({"t": tenant_id, "v": visitor_id})


def read_visitor(token: str | None, tenant_id: int) -> str | None:
    if not token:
        return None
    try:
        data = _visitor_serializer().loads(token)
    except BadSignature:
        return None
    if not isinstance(data, dict) or data.get("t") != tenant_id:
        return None
    visitor = data.get("v")
    return visitor if isinstance(visitor, str) and 8 <= len(visitor) <= 64 else None


def widget_origin_allowed(tenant: Tenant) -> bool:
    origin = (request.headers.get("Origin") or "").rstrip("/")
    if not origin:
        return False
    own = urlsplit(request.host_url)
    parts = urlsplit(origin)
    if parts.netloc == own.netloc and parts.scheme in ("http", "https"):
        return True
    allowed = {line.strip().rstrip("/") for line in (tenant.allowed_origins or "").splitlines()}
    return origin in allowed


class ChatSocket:
    def __init__(self, ws, tenant: Tenant, user_id: int | None, visitor_id: str | None) -> None:
        self.ws = ws
        self.app = current_app._get_current_object()
        self.tenant_id = tenant.id
        self.user_id = user_id
        self.visitor_id = visitor_id
        self.chat_id: int | None = None
        self.chat_public_id: str | None = None
        self.subscription = None
        self.closed = threading.Event()
        self.write_lock = threading.RLock()
        self.sent_seq: dict[str, int] = {}
        self.done_replies: set[str] = set()
        self.sent_messages: set[int] = set()
        self.pump: threading.Thread | None = None

    # ------------------------------------------------------------ writing
    def send(self, frame: dict[str, Any]) -> None:
        data = json.dumps(frame, separators=(",", ":"))
        with self.write_lock:
            self.ws.send(data)

    def error(self, code: str, message: str, **extra: Any) -> None:
        self.send({"type": "error", "code": code, "message": message, **extra})

    def forward(self, frame: dict[str, Any]) -> None:
        """Send a chat-topic frame once: no duplicate deltas, messages or done frames. Two
        threads forward (the reader its acks, the pump the topic), so the check and the send
        happen under the write lock together."""
        with self.write_lock:
            self._forward(frame)

    def _forward(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        reply = frame.get("reply_id")
        if kind == "delta":
            if reply in self.done_replies or frame.get("seq", 0) <= self.sent_seq.get(reply, 0):
                return
            self.sent_seq[reply] = frame["seq"]
        elif kind == "done":
            if reply in self.done_replies:
                return
            self.done_replies.add(reply)
            message = frame.get("message") or {}
            if message.get("id"):
                self.sent_messages.add(message["id"])
        elif kind == "message":
            message_id = (frame.get("message") or {}).get("id")
            if message_id in self.sent_messages:
                return
            self.sent_messages.add(message_id)
        elif kind == "typing" and frame.get("from") == "visitor":
            return  # the visitor's own typing is for the console
        self.send(frame)

    def _pump(self) -> None:
        while not self.closed.is_set():
            subscription = self.subscription
            if subscription is None:
                self.closed.wait(0.05)
                continue
            try:
                if subscription.overflowed:
                    self._catch_up(subscription)
                    continue
                try:
                    frame = subscription.frames.get(timeout=0.5)
                except queue.Empty:
                    continue
                if frame.json is None or subscription is not self.subscription:
                    continue
                self.forward(frame.json)
            except ConnectionClosed:
                self.closed.set()

    def _catch_up(self, subscription) -> None:
        """This socket fell behind and the hub dropped frames for it: send what it missed from
        the topic's stream instead. forward() skips whatever was sent already, so a reply goes
        on from the visitor's last sequence number; replies that finished meanwhile arrive as
        their `done` frame, which carries the whole message."""
        subscription.overflowed = False
        while True:  # what is queued is older than what was dropped: the stream has it all
            try:
                subscription.frames.get_nowait()
            except queue.Empty:
                break
        if subscription is not self.subscription:
            return
        log.info("chat socket fell behind on chat %s; catching up from the stream", self.chat_id)
        with self.app.app_context():
            self._replay(next(iter(subscription.topics)), dict(self.sent_seq))

    # ------------------------------------------------------------ the session
    def run(self) -> None:
        visitor_token = sign_visitor(self.tenant_id, self.visitor_id) if self.visitor_id else None
        cfg = self.app.config
        self.send(
            {
                "type": "welcome",
                "visitor_token": visitor_token,
                "limits": {
                    "messages_per_minute": cfg["CHAT_RATE_LIMIT_PER_MINUTE"],
                    "max_message_length": cfg["CHAT_MAX_MESSAGE_LENGTH"],
                },
            }
        )
        db.session.remove()
        self.pump = threading.Thread(target=self._pump, name="chat-pump", daemon=True)
        self.pump.start()
        try:
            while not self.closed.is_set():
                raw = self.ws.receive(timeout=cfg["LIVE_PING_SECONDS"])
                if raw is None:
                    continue
                try:
                    self.handle(raw)
                finally:
                    db.session.remove()
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            if self.subscription is not None:
                self.subscription.close()
            db.session.remove()

    def handle(self, raw: Any) -> None:
        if not isinstance(raw, str):
            self.error("invalid_json", "Frames must be JSON text.")
            return
        try:
            frame = json.loads(raw)
        except ValueError:
            self.error("invalid_json", "That frame is not valid JSON.")
            return
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            self.error("invalid_json", 'A frame is a JSON object with a "type".')
            return
        handler = (
            getattr(self, "on_" + frame["type"], None) if frame["type"].isidentifier() else None
        )
        if handler is None:
            self.error("unknown_type", f"Unknown frame type {frame['type'][:40]!r}.")
            return
        try:
            handler(frame)
        except ChatError as exc:
            db.session.rollback()
            self.error(exc.code, exc.message, **exc.extra)

    def _chat(self) -> Chat:
        if self.chat_id is None:
            raise ChatError("no_session", "Start a session (session_init) first.")
        # With its agent: a visitor's message asks whether the agent replies (one query, not
        # two, on the way to the reply).
        chat = db.session.execute(_CHAT_WITH_AGENT, {"chat_id": self.chat_id}).scalar()
        if chat is None:
            raise ChatError("no_session", "This chat no longer exists; start a new session.")
        return chat

    def on_session_init(self, frame: dict[str, Any]) -> None:
        chat = None
        if frame.get("chat_id"):
            chat = chats.find_resumable(
                self.tenant_id,
                str(frame["chat_id"]),
                visitor_id=self.visitor_id,
                user_id=self.user_id,
            )
        if chat is None:
            chat = chats.start_chat(
                self.tenant_id,
                visitor_id=self.visitor_id,
                user_id=self.user_id,
                session_id=secrets.token_hex(8),
            )
            db.session.commit()
        resume = frame.get("resume") if isinstance(frame.get("resume"), dict) else {}
        self._attach(chat, resume)

    def _attach(self, chat: Chat, resume: dict[str, Any]) -> None:
        topic = chat_topic(chat.tenant_id, chat.id)
        old = self.subscription
        self.subscription = hub().subscribe([topic])  # subscribe first: nothing falls in a gap
        if old is not None:
            old.close()
        self.chat_id, self.chat_public_id = chat.id, str(chat.public_id)
        self.sent_seq = {
            str(k): int(v)
            for k, v in resume.items()
            if isinstance(v, int) and not isinstance(v, bool)
        }
        self.done_replies, self.sent_messages = set(), set()
        recent = chats.recent_messages(chat.id, HISTORY_PAGE + 1)
        has_more = len(recent) > HISTORY_PAGE
        recent = recent[-HISTORY_PAGE:]
        self.sent_messages.update(m.id for m in recent)
        answered = {m.in_response_to_id for m in recent if m.sender == "assistant"}
        self.done_replies.update(chat_live.reply_id_for(i) for i in answered if i)
        self.send(
            {
                "type": "session",
                "chat_id": self.chat_public_id,
                "status": chat.status,
                "satisfaction": chat.satisfaction,
                "messages": [chat_live.message_json(m) for m in recent],
                "has_more": has_more,
            }
        )
        self._replay(topic, resume)

    def _replay(self, topic: str, resume: dict[str, Any]) -> None:
        """Frames of replies still streaming (or finished since the client last saw them)."""
        position, frames = "0-0", []
        for _ in range(100):  # bounded: the stream keeps at most LIVE_STREAM_MAXLEN frames
            batch = bus().read({topic: position}, block_ms=0)
            if not batch:
                break
            for _topic, frame_id, data in batch:
                position = frame_id
                body = json.loads(data).get("json")
                if isinstance(body, dict) and body.get("type") in ("delta", "done", "error"):
                    frames.append(body)
        finished = {f["reply_id"] for f in frames if f["type"] == "done"}
        for body in frames:
            reply = body.get("reply_id")
            if reply in self.done_replies and reply not in resume:
                continue  # already in the session's messages
            if body["type"] == "delta" and reply in finished and reply not in resume:
                continue
            self.forward(body)

    def on_message(self, frame: dict[str, Any]) -> None:
        chat = self._chat()
        cfg = self.app.config
        content = chats.clean_visitor_text(frame.get("content"))
        identity = f"user:{self.user_id}" if self.user_id else f"visitor:{self.visitor_id}"
        decision = kv().hit(f"chat:{identity}", cfg["CHAT_RATE_LIMIT_PER_MINUTE"], 60)
        if not decision.allowed:
            raise ChatError(
                "rate_limited",
                f"You are sending messages too fast. Try again in {decision.retry_after} s.",
                retry_after=decision.retry_after,
            )
        if chat.status == "completed":
            chat.status, chat.is_active = "active", True
        elif chat.status == "archived":
            raise ChatError("no_session", "This chat is archived; start a new session.")
        message = chats.add_message(chat, "visitor", content)
        ack = {
            "type": "message",
            "message": chat_live.message_json(message),
            "client_id": frame.get("client_id"),
        }
        # The visitor's message is acknowledged the moment it is committed, before the reply
        # is queued: registered first, this runs first. Sent after commit() returned instead,
        # it came after the commit's events were sent, and a fast reply's first deltas could
        # overtake it (the widget showed the answer above the question).
        on_commit(lambda: self._send_ack(ack), before_events=True)
        if chats.should_auto_reply(chat):
            chats.start_reply_now(message.id)
        db.session.commit()  # saved before any model call

    def _send_ack(self, ack: dict[str, Any]) -> None:
        try:
            self.forward(ack)
        except ConnectionClosed:
            self.closed.set()  # the visitor left; the reply is still made and saved

    def on_typing(self, frame: dict[str, Any]) -> None:
        chat = self._chat()
        from services.live import publish

        publish(
            chat_topic(chat.tenant_id, chat.id),
            f"typing-visitor-{chat.id}",
            json_data={"type": "typing", "from": "visitor"},
        )

    def on_cancel(self, frame: dict[str, Any]) -> None:
        chat = self._chat()
        from tasks.chats import cancel_key

        reply = frame.get("reply_id")
        if not isinstance(reply, str):
            streaming = [r for r in self.sent_seq if r not in self.done_replies]
            reply = streaming[-1] if streaming else None
        if reply is None or not reply.startswith("r"):
            raise ChatError("nothing_to_cancel", "No reply is being generated.")
        # The reply must belong to this chat: its visitor message is in this chat.
        from models.chats import Message

        try:
            message = db.session.get(Message, int(reply[1:]))
        except ValueError:
            message = None
        if message is None or message.chat_id != chat.id:
            raise ChatError("nothing_to_cancel", "No such reply in this chat.")
        kv().set_flag(cancel_key(reply), ttl=300)

    def on_session_close(self, frame: dict[str, Any]) -> None:
        chat = self._chat()
        chats.complete_chat(chat)
        db.session.commit()
        self.send(
            {
                "type": "session",
                "chat_id": self.chat_public_id,
                "status": chat.status,
                "messages": [],
                "has_more": False,
            }
        )

    def on_history(self, frame: dict[str, Any]) -> None:
        chat = self._chat()
        before = frame.get("before")
        if not isinstance(before, int) or isinstance(before, bool):
            raise ChatError("invalid_history", '"before" must be a message id.')
        limit = frame.get("limit", HISTORY_PAGE)
        limit = min(max(int(limit), 1), 50) if isinstance(limit, int) else HISTORY_PAGE
        rows = chats.messages_before(chat.id, before, limit + 1)
        has_more = len(rows) > limit
        rows = rows[-limit:]
        self.send(
            {
                "type": "history",
                "messages": [chat_live.message_json(m) for m in rows],
                "has_more": has_more,
            }
        )

    def on_rate(self, frame: dict[str, Any]) -> None:
        chat = self._chat()
        chats.rate_chat(chat, frame.get("score"))
        db.session.commit()
        self.send({"type": "rated", "score": chat.satisfaction})


def register_chat_routes(app) -> None:
    @sock.route("/ws/chat")
    @closes_cleanly
    def chat_socket(ws):
        key = request.args.get("key", "")
        tenant = db.session.scalar(select(Tenant).where(Tenant.widget_key == key)) if key else None
        if tenant is None:
            refuse(ws, "unknown widget key")
            return
        if not widget_origin_allowed(tenant):
            refuse(ws, "origin not allowed")
            return
        user_id = None
        if current_user.is_authenticated and current_user.tenant_id == tenant.id:
            user_id = int(current_user.id)
        visitor_id = None
        if user_id is None:
            visitor_id = read_visitor(request.args.get("visitor"), tenant.id) or secrets.token_hex(
                12
            )
        ChatSocket(ws, tenant, user_id, visitor_id).run()
