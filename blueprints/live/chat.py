"""/ws/chat: the embeddable widget's socket. JSON frames both ways (see the README).

The socket's own thread reads the visitor's frames; the chat topic's frames are written by
the process's one SocketPump thread (events/fanout.py) through a queue that never blocks, or,
on a TLS socket, by a pump thread of the socket's own. Every write goes through one lock
(flask-sock's send is not thread-safe). A reply stream is
only ever sent to a socket that owns the chat: the widget's visitor (signed visitor token) or
a logged-in user of the chat's tenant who started it.

The chat itself is created by the visitor's first message, not by opening the widget, so the
inbox holds no empty chats and the per-address limit on new chats counts real conversations.
Every frame, however hostile, gets an answer (a typed error at worst) and the socket stays open.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import socket
import ssl
import threading
from functools import partial
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
from events.fanout import QueuedWriter
from events.outbox import deferred_emits
from extensions import db, sock
from models.accounts import Tenant
from models.chats import Chat
from services import chat_live, chats, visitor_identity
from services.chats import ChatError, chat_topic
from services.kv import kv
from services.live import bus, chat_pump, hub

log = logging.getLogger(__name__)
HISTORY_PAGE = 20
# A frame's chat with its agent (every frame starts with a new session), built once: a
# statement built per frame costs its cache key again.
_CHAT_WITH_AGENT = (
    select(Chat).options(joinedload(Chat.agent)).where(Chat.id == bindparam("chat_id"))
)


# How long the widget waits before sending a message again that an outage refused.
OUTAGE_RETRY_SECONDS = 3


def _is_outage(exc: BaseException) -> bool:
    """Redis or PostgreSQL away (a transient failure, not a bug): the visitor may retry."""
    import redis.exceptions
    from sqlalchemy.exc import DBAPIError, OperationalError

    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return True
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _rollback_quietly() -> None:
    try:
        db.session.rollback()
    except Exception:  # noqa: BLE001 - the database itself is away: nothing to undo
        db.session.remove()


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


# How many visitor messages a process handles at once. Each is a few milliseconds of Python
# (the rate limits, the chat's and the message's rows, the reply's job), and a crowd arriving
# set a dozen and more of them going together: every one of those threads queued for the
# interpreter lock beside the one thread that sends all chat sockets their frames, and
# streaming replies stalled in bursts. A thread waiting here does not compete for the lock.
MESSAGES_AT_ONCE = 6
_saving = threading.BoundedSemaphore(MESSAGES_AT_ONCE)


class ChatSocket:
    def __init__(self, ws, tenant: Tenant, user_id: int | None, visitor_id: str | None) -> None:
        self.ws = ws
        self.app = current_app._get_current_object()
        self.tenant_id = tenant.id
        self.user_id = user_id
        self.visitor_id = visitor_id
        # ProxyFix (PROXY_FIX_HOPS) has already put the client's own address here.
        self.client_ip = request.remote_addr or "unknown"
        self.session_started = False
        self.chat_id: int | None = None
        self.chat_public_id: str | None = None
        self.subscription = None
        self.closed = threading.Event()
        self.write_lock = threading.RLock()
        self.sent_seq: dict[str, int] = {}
        self.done_replies: set[str] = set()
        self.sent_messages: set[int] = set()
        # Messages saved by this socket whose ack it has not sent yet, and the frames of their
        # replies held back until it has (both under write_lock).
        self.awaiting_ack: set[int] = set()
        self.held: dict[int, list[dict[str, Any]]] = {}
        self.pump: threading.Thread | None = None
        # Set when the socket follows a chat (or closes): the pump sleeps until then instead
        # of looking every few ms (hundreds of open widgets without a chat yet cost a
        # process thousands of thread wake-ups a second).
        self.following = threading.Event()
        # On a plain TCP socket, the process's one SocketPump thread delivers this socket's
        # frames and every write is queued rather than blocking (events/fanout.py); a TLS
        # socket (gunicorn serving HTTPS itself) keeps a pump thread of its own.
        self.catching_up = False
        # Set while a resumed session is sent (_attach): live frames wait in the subscription
        # until the session and the replay of the stream are out, in order.
        self.attaching = False
        self.writer: QueuedWriter | None = None
        sock = getattr(ws, "sock", None)
        if isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket):
            self.chat_pump = chat_pump()
            self.writer = QueuedWriter(
                sock, int(self.app.config["CHAT_SOCKET_BUFFER_BYTES"]), self.chat_pump.backlogged
            )
            ws.sock = self.writer
        # Who the embedding site says the visitor is (session_init / identify frames).
        self.identity: visitor_identity.Identity | None = None

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
        answered = chat_live.visitor_message_id_of(reply) if reply is not None else None
        if answered is not None and answered in self.awaiting_ack:
            # The reply to a message whose acknowledgement this socket has not sent yet: the
            # job goes out at the commit, just before the ack, and a web process short of CPU
            # once let the reply's first delta overtake it (the visitor's widget lost it).
            self.held.setdefault(answered, []).append(frame)
            return
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
        if kind == "message":
            message_id = (frame.get("message") or {}).get("id")
            if message_id in self.awaiting_ack:
                self.awaiting_ack.discard(message_id)
                for held in self.held.pop(message_id, ()):
                    self._forward(held)

    def _pump(self) -> None:
        while not self.closed.is_set():
            subscription = self.subscription
            if subscription is None or self.attaching:
                self.following.wait(1.0)
                self.following.clear()
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
            except Exception as exc:  # noqa: BLE001 - Redis away mid catch-up: try again
                log.warning("chat socket could not catch up on chat %s: %s", self.chat_id, exc)
                subscription.overflowed = True
                self.closed.wait(1.0)

    def deliver(self) -> None:
        """Send the frames queued on the subscription (the SocketPump's thread calls this
        when the hub has put some there); never blocks on the client."""
        subscription = self.subscription
        if subscription is None or self.closed.is_set() or self.catching_up or self.attaching:
            return
        if subscription.overflowed:
            # Reading the stream back takes round trips to Redis: not on the pump's thread.
            self.catching_up = True
            threading.Thread(
                target=self._catch_up_apart, args=(subscription,), name="chat-catch-up", daemon=True
            ).start()
            return
        while subscription is self.subscription:
            try:
                frame = subscription.frames.get_nowait()
            except queue.Empty:
                return
            if frame.json is None:
                continue
            try:
                self.forward(frame.json)
            except ConnectionClosed:
                self.closed.set()
                return

    def _catch_up_apart(self, subscription) -> None:
        try:
            self._catch_up(subscription)
        except Exception as exc:  # noqa: BLE001 - Redis away mid catch-up: try again
            log.warning("chat socket could not catch up on chat %s: %s", self.chat_id, exc)
            subscription.overflowed = True
            self.closed.wait(1.0)
        finally:
            self.catching_up = False
            if not self.closed.is_set():
                self.chat_pump.ready(self)

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
        if self.writer is None:
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
            self.following.set()
            if self.subscription is not None:
                self.subscription.close()
            db.session.remove()

    def handle(self, raw: Any) -> None:
        if not isinstance(raw, str):
            self.error("invalid_json", "Frames must be JSON text.")
            return
        try:
            frame = json.loads(raw)
        except RecursionError:
            self.error("invalid_json", "That frame nests too deeply.")
            return
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
        client_id = frame.get("client_id")
        # Which of the widget's messages an error is about: it keeps that one's text.
        about = (
            {"client_id": client_id} if isinstance(client_id, str) and len(client_id) <= 128 else {}
        )
        try:
            handler(frame)
        except ChatError as exc:
            db.session.rollback()
            self.error(exc.code, exc.message, **{**exc.extra, **about})
        except ConnectionClosed:
            raise
        except Exception as exc:  # noqa: BLE001
            # A frame this code did not foresee must not end the visitor's socket: the error
            # is logged for us, the visitor gets an answer and can go on.
            _rollback_quietly()
            if _is_outage(exc):
                # Nothing was saved; the widget keeps the text and sends it again later.
                log.warning("chat frame %r during an outage: %s", frame["type"], exc)
                self.error(
                    "unavailable",
                    "The chat is briefly unavailable; your message will be sent again.",
                    retry_after=OUTAGE_RETRY_SECONDS,
                    **about,
                )
                return
            log.exception("chat frame %r failed", frame["type"])
            self.error(
                "server_error", "That request could not be handled; please try again.", **about
            )

    def _require_session(self) -> None:
        if not self.session_started:
            raise ChatError("no_session", "Start a session (session_init) first.")

    def _chat(self) -> Chat | None:
        """The socket's chat; None before the visitor's first message has created it."""
        self._require_session()
        if self.chat_id is None:
            return None
        # With its agent: a visitor's message asks whether the agent replies (one query, not
        # two, on the way to the reply).
        chat = db.session.execute(_CHAT_WITH_AGENT, {"chat_id": self.chat_id}).scalar()
        if chat is None:
            raise ChatError("no_session", "This chat no longer exists; start a new session.")
        return chat

    def _take_identity(self, data: Any) -> None:
        """Remember the site's identity for the visitor; a bad signature is answered, not used."""
        if data is None:
            return
        try:
            self.identity = visitor_identity.parse_identity(self.tenant_id, data)
        except visitor_identity.IdentityRefused as refused:
            self.identity = refused.args[0]  # name and email only, shown as unverified
            self.error(
                "identity_refused",
                "The identifier's signature (identifier_hash) is not valid; the identifier "
                "was ignored.",
            )

    def _record_identity(self, chat: Chat) -> bool:
        """Put the remembered identity on `chat` (the caller commits)."""
        return self.identity is not None and visitor_identity.apply_identity(chat, self.identity)

    def on_identify(self, frame: dict[str, Any]) -> None:
        chat = self._chat()
        self._take_identity(frame.get("identity"))
        if chat is not None and self._record_identity(chat):
            db.session.commit()
        identity = self.identity or visitor_identity.Identity()
        self.send({"type": "identified", "verified": identity.verified})

    def on_session_init(self, frame: dict[str, Any]) -> None:
        self.session_started = True
        self._take_identity(frame.get("identity"))
        chat = None
        chat_id = frame.get("chat_id")
        if isinstance(chat_id, str) and chat_id:
            chat = chats.find_resumable(
                self.tenant_id, chat_id, visitor_id=self.visitor_id, user_id=self.user_id
            )
        if chat is None:
            # No chat yet: the first message creates it (opening the widget is not a chat).
            self._subscribe(None)
            self.send(
                {
                    "type": "session",
                    "chat_id": None,
                    "status": "active",
                    "satisfaction": None,
                    "messages": [],
                    "has_more": False,
                }
            )
            return
        if self._record_identity(chat):
            db.session.commit()
        resume = frame.get("resume") if isinstance(frame.get("resume"), dict) else {}
        self._attach(chat, resume)

    def _subscribe(self, chat: Chat | None) -> str | None:
        """Follow `chat`'s topic (or none) from now on; the chat topic's name."""
        topic = chat_topic(chat.tenant_id, chat.id) if chat is not None else None
        old = self.subscription
        # Subscribed before the old one closes and before anything is read: nothing falls in
        # a gap.
        notify = partial(self.chat_pump.ready, self) if self.writer is not None else None
        self.subscription = hub().subscribe([topic], notify) if topic is not None else None
        if old is not None:
            old.close()
        self.chat_id = chat.id if chat is not None else None
        self.chat_public_id = str(chat.public_id) if chat is not None else None
        self.sent_seq, self.done_replies, self.sent_messages = {}, set(), set()
        if self.subscription is not None:
            self.following.set()
        return topic

    def _attach(self, chat: Chat, resume: dict[str, Any]) -> None:
        # A live delta forwarded while this runs would go out before the session frame, and
        # would raise the reply's position past frames the replay then skips: a reconnecting
        # widget lost a delta that way. Live frames wait until the replay is sent.
        self.attaching = True
        try:
            self._attach_held(chat, resume)
        finally:
            self.attaching = False
            self.following.set()
            if self.writer is not None:
                self.chat_pump.ready(self)

    def _attach_held(self, chat: Chat, resume: dict[str, Any]) -> None:
        topic = self._subscribe(chat)
        # Only positions of this chat's replies: a bare cancel stops one of them.
        self.sent_seq = {
            reply: position
            for reply, position in resume.items()
            if chat_live.visitor_message_id_of(reply) is not None
            and isinstance(position, int)
            and not isinstance(position, bool)
        }
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
        with _saving:
            self._on_message(frame)

    def _on_message(self, frame: dict[str, Any]) -> None:
        chat = self._chat()
        content = chats.clean_visitor_text(frame.get("content"))
        if chat is not None and chat.status == "archived":
            raise ChatError("no_session", "This chat is archived; start a new session.")
        sender = f"user:{self.user_id}" if self.user_id else f"visitor:{self.visitor_id}"
        chats.check_visitor_message_limits(
            self.tenant_id,
            self.client_ip,
            sender,
            starts_chat=chat is None or chat.status == "completed",
        )
        if chat is None or chat.status == "completed":
            # A chat that has ended is not silently reopened: the visitor's next message
            # starts a new one (its ack names it; the widget marks where it begins).
            chat = chats.start_chat(
                self.tenant_id,
                visitor_id=self.visitor_id,
                user_id=self.user_id,
                session_id=secrets.token_hex(8),
            )
            self._record_identity(chat)  # saved with the first message
            # Following the new chat before its commit: the reply's first frames can't be missed.
            self._subscribe(chat)
            try:
                self._save_message(chat, content, frame)
            except BaseException:
                self._subscribe(None)  # the chat was not saved: the next message starts one
                raise
            return
        self._save_message(chat, content, frame)

    def _save_message(self, chat: Chat, content: str, frame: dict[str, Any]) -> None:
        # The message's event row and its reply's job row go with the commit, in one INSERT.
        with deferred_emits(until_commit=True):
            self._save_message_now(chat, content, frame)

    def _save_message_now(self, chat: Chat, content: str, frame: dict[str, Any]) -> None:
        message = chats.add_message(chat, "visitor", content)
        client_id = frame.get("client_id")
        if not (isinstance(client_id, str) and len(client_id) <= 128):
            client_id = None  # echoed back as the client's own key only when it is one
        ack = {
            "type": "message",
            "message": chat_live.message_json(message),
            "client_id": client_id,
            # The widget learns its chat's id here when this message has just created it.
            "chat_id": self.chat_public_id,
        }
        # The visitor's message is acknowledged the moment it is committed, right after the
        # reply's job goes out and before the commit's events. Sent after commit() returned
        # instead, it came after the events were sent, and a fast reply's first deltas could
        # overtake it (the widget showed the answer above the question). Until it is sent,
        # this socket holds back the reply's frames (_forward): a thread of a busy process
        # can wait a while between the job's send and the ack's.
        with self.write_lock:
            self.awaiting_ack.add(message.id)
        on_commit(lambda: self._send_ack(ack), before_events=True)
        if chats.should_auto_reply(chat):
            chats.start_reply_now(message.id)
        try:
            db.session.commit()  # saved before any model call
        except BaseException:
            with self.write_lock:  # not saved: no reply will come
                self.awaiting_ack.discard(message.id)
                self.held.pop(message.id, None)
            raise

    def _send_ack(self, ack: dict[str, Any]) -> None:
        try:
            self.forward(ack)
        except ConnectionClosed:
            self.closed.set()  # the visitor left; the reply is still made and saved

    def on_typing(self, frame: dict[str, Any]) -> None:
        chat = self._chat()
        if chat is None:
            return  # nobody watches a chat that does not exist yet
        from services.live import publish

        typing = frame.get("state") != "stop"  # the widget says "stop" when the box empties
        publish(
            chat_topic(chat.tenant_id, chat.id),
            f"typing-visitor-{chat.id}",
            # The console's pages swap HTML; the JSON is for other sockets of the chat.
            html=chat_live.visitor_typing_slot(chat.id, typing),
            json_data={"type": "typing", "from": "visitor", "typing": typing},
        )

    def on_cancel(self, frame: dict[str, Any]) -> None:
        chat = self._chat()
        from tasks.chats import cancel_key

        reply = frame.get("reply_id")
        if not isinstance(reply, str):
            streaming = [r for r in self.sent_seq if r not in self.done_replies]
            reply = streaming[-1] if streaming else None
        if chat is None or reply is None:
            raise ChatError("nothing_to_cancel", "No reply is being generated.")
        # The reply must belong to this chat: its visitor message is in this chat.
        from models.chats import Message

        message_id = chat_live.visitor_message_id_of(reply)
        message = db.session.get(Message, message_id) if message_id is not None else None
        if message is None or message.chat_id != chat.id:
            raise ChatError("nothing_to_cancel", "No such reply in this chat.")
        kv().set_flag(cancel_key(reply), ttl=300)

    def on_session_close(self, frame: dict[str, Any]) -> None:
        chat = self._chat()
        if chat is None:
            raise ChatError("no_chat", "There is no conversation to end yet.")
        chats.complete_chat(chat)
        db.session.commit()
        # The transcript stays on the visitor's screen: this says only that the chat ended.
        self.send(chat_live.status_json(chat))

    def on_history(self, frame: dict[str, Any]) -> None:
        chat = self._chat()
        before = frame.get("before")
        if not chats.is_row_id(before):
            raise ChatError(
                "invalid_history", f'"before" must be a message id (1 to {chats.MAX_ROW_ID}).'
            )
        limit = frame.get("limit", HISTORY_PAGE)
        limit = min(max(int(limit), 1), 50) if isinstance(limit, int) else HISTORY_PAGE
        if chat is None:  # nothing said yet, so nothing earlier
            self.send({"type": "history", "messages": [], "has_more": False})
            return
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
        score = chats.check_rating(frame.get("score"))
        if chat is None:
            raise ChatError("no_chat", "There is no conversation to rate yet.")
        chats.rate_chat(chat, score, frame.get("comment"))
        db.session.commit()
        self.send(
            {
                "type": "rated",
                "score": chat.satisfaction,
                "comment": chat.satisfaction_comment,
            }
        )


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
