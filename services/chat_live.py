"""Live frames for chats. One topic per chat carries both renderings of each frame: JSON for
the widget (`/ws/chat`) and out-of-band HTML for the console (`/ws/live`)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Collection
from typing import Any

from flask import current_app
from markupsafe import escape

from events.fanout import append_key
from events.live import RedisBus, encode
from extensions import db
from models.chats import Chat, Message
from services.chats import chat_topic, is_row_id, row_facts, view_counts
from services.live import (
    bus,
    fragments,
    publish,
    render_fragment,
    tenant_topic,
    user_topic,
    watched_topics,
)
from services.rendering import markdown_to_safe_html

log = logging.getLogger(__name__)
HTML_REFRESH_SECONDS = 0.1


def reply_id_for(visitor_message_id: int) -> str:
    return f"r{visitor_message_id}"


def visitor_message_id_of(reply_id: object) -> int | None:
    """The visitor message a reply id ("r123") answers, or None for anything else."""
    if not isinstance(reply_id, str) or not reply_id.startswith("r"):
        return None
    digits = reply_id[1:]
    # isdecimal() also takes other scripts' digits; int() would read them, but ids are ASCII.
    if not (digits.isascii() and digits.isdecimal()) or len(digits) > 10:
        return None
    message_id = int(digits)
    return message_id if is_row_id(message_id) else None


def message_json(message: Message) -> dict[str, Any]:
    if message.sender == "visitor":
        html = str(escape(message.content)).replace("\n", "<br>")
    else:
        html = str(markdown_to_safe_html(message.content))
    return {
        "id": message.id,
        "sender": message.sender,
        "html": html,
        "created_at": message.created_at.isoformat(),
        "in_response_to": message.in_response_to_id,
        "interrupted": message.interrupted,
    }


def _message_html(message: Message) -> str:
    return render_fragment("chats/_message.html", m=message)


def visitor_typing_slot(chat_id: int, typing: bool) -> str:
    inner = '<p class="typing">Visitor is typing…</p>' if typing else ""
    return f'<div id="chat-{chat_id}-visitor-typing" hx-swap-oob="innerHTML">{inner}</div>'


def publish_message(message: Message, *, updated: bool = False) -> None:
    """A message reaches the console (an append, then replaces of it, e.g. its sentiment
    badge) and the widget; the chat's header and list row follow (its count and last message
    change in SQL, which raises no `chat.updated`)."""
    topic = chat_topic(message.tenant_id, message.chat_id)
    if updated:
        html = render_fragment("chats/_message_push.html", m=message, replace=True)
        publish(topic, f"message-{message.id}", html=html)
    else:
        html = render_fragment("chats/_message_push.html", m=message, replace=False)
        if message.sender == "visitor":
            html += visitor_typing_slot(message.chat_id, False)
        publish(
            topic,
            append_key(f"message-{message.id}"),
            html=html,
            json_data={"type": "message", "message": message_json(message)},
        )
    chat = db.session.get(Chat, message.chat_id)
    if chat is not None:
        publish_chat_row(chat)


def status_json(chat: Chat) -> dict[str, Any]:
    """The widget's `status` frame: the chat ended (by the visitor or an operator) or was
    rated; the widget keeps the transcript and asks for a rating once."""
    return {
        "type": "status",
        "chat_id": str(chat.public_id),
        "status": chat.status,
        "satisfaction": chat.satisfaction,
    }


def publish_chat_row(chat: Chat, *, created: bool = False) -> None:
    facts = row_facts([chat.id])
    with fragments():
        frames = chat_row_frames(chat, facts, created=created)
    bus().publish_many(frames)


def publish_view_counts(tenant_id: int, user_ids: set[int]) -> None:
    """After a chat is added or changes hands: the counts of the chat list's views on every
    open list (All, Unassigned), and Mine on the lists of the users it was or is assigned to."""
    users = sorted(user_ids)
    counts = view_counts(tenant_id, users[0] if users else 0)
    with fragments():
        frames = [
            (
                tenant_topic(tenant_id, "chats"),
                encode(
                    "view-counts",
                    html=render_fragment(
                        "chats/_view_counts.html",
                        counts={"all": counts["all"], "unassigned": counts["unassigned"]},
                    ),
                ),
            )
        ]
        for user_id in users:
            mine = (counts if user_id == users[0] else view_counts(tenant_id, user_id))["mine"]
            html = render_fragment("chats/_view_counts.html", counts={"mine": mine})
            frames.append((user_topic(tenant_id, user_id, "inbox"), encode("view-mine", html=html)))
    bus().publish_many(frames)


def chat_row_frames(
    chat: Chat, facts: dict, *, created: bool = False, topics: Collection[str] | None = None
) -> list[tuple[str, str]]:
    """The frames of a chat's list row and of its page's header, as (topic, data); with
    `topics`, only the frames of those topics are rendered."""
    frames = []
    rows = tenant_topic(chat.tenant_id, "chats")
    if topics is None or rows in topics:
        html = render_fragment("chats/_row_push.html", chat=chat, created=created, row_facts=facts)
        # A new chat's row is an append: no later update of the row may merge it away.
        key = append_key(f"chat-row-{chat.id}") if created else f"chat-row-{chat.id}"
        frames.append((rows, encode(key, html=html)))
    page = chat_topic(chat.tenant_id, chat.id)
    if topics is None or page in topics:
        # The chat's own page refreshes its header (status, count, satisfaction, summary).
        header = render_fragment("chats/_header.html", chat=chat, oob=True)
        frames.append(
            (page, encode(f"chat-header-{chat.id}", html=header, json_data=status_json(chat)))
        )
    return frames


# RedisBus's numbered XADD (events/live.py), for many frames in one call: KEYS are each
# frame's stream and number key, ARGV the frames' data and then MAXLEN.
_XADD_MANY = """
local maxlen = ARGV[#ARGV]
for i = 1, #ARGV - 1 do
  local n = redis.call('INCR', KEYS[2 * i])
  redis.call('XADD', KEYS[2 * i - 1], 'MAXLEN', '~', maxlen, '*', 'd', ARGV[i], 'n', n)
end
return #ARGV - 1
"""


class _DeltaFlusher:
    """Publishes the coalesced deltas of every reply of this process, one round trip per
    window: a reply's tokens that came within a window become one frame, and all replies'
    frames go out together. At 50 tokens a second, a few hundred replies are thousands of
    frames a second; one pipeline per window keeps that to a few dozen round trips."""

    def __init__(self, live_bus: Any, window: float) -> None:
        self.bus = live_bus
        self.window = window
        # On Redis, a round's frames are added by one script call: as a pipeline of numbered
        # XADDs (RedisBus.publish_many) each frame costs a command to pack and a reply to
        # parse here, a third of what a token costs this process in all.
        self._xadd_many = (
            live_bus.redis.register_script(_XADD_MANY) if isinstance(live_bus, RedisBus) else None
        )
        self._pending: dict[ReplyStream, None] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._urgent = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reply-deltas", daemon=True)
        self._thread.start()

    def mark(self, stream: ReplyStream, *, urgent: bool = False) -> None:
        """Publish the stream's pending text with the next round; `urgent` (a reply's first
        text: the visitor is waiting for it) starts that round now."""
        with self._lock:
            self._pending[stream] = None
            if urgent:
                self._urgent.set()
        if not self._wake.is_set():
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            # What comes within the window joins this round (a first text ends it early).
            self._urgent.wait(self.window)
            with self._lock:
                self._wake.clear()
                self._urgent.clear()
                streams, self._pending = list(self._pending), {}
            if not streams:
                continue
            try:
                self.flush(streams)
            except Exception:  # noqa: BLE001 - a bug here must not end every reply's deltas
                log.exception("reply deltas not published")

    def publish(self, frames: list[tuple[str, str]]) -> None:
        if self._xadd_many is None:
            self.bus.publish_many(frames)
            return
        keys: list[str] = []
        for topic, _data in frames:
            keys += (self.bus._key(topic), self.bus._number_key(topic))
        self._xadd_many(keys=keys, args=[*(data for _topic, data in frames), self.bus.maxlen])

    def flush(self, streams: list[ReplyStream]) -> None:
        # Each stream's send lock is held from taking its frame until the frame is in the
        # bus, so its frames reach the topic in the order of their numbers.
        locked = []
        try:
            for stream in streams:
                stream.send_lock.acquire()
                locked.append(stream)
            frames = [f for s in streams for f in s.take_frames()]
            if frames:
                try:
                    self.publish([(topic, data) for _s, topic, data in frames])
                except Exception as exc:  # noqa: BLE001 - best effort; see ReplyStream
                    for stream, _topic, _data in frames:
                        stream.failed_to_publish(exc)
        finally:
            for stream in locked:
                stream.send_lock.release()


_flushers: dict[tuple[int, float], _DeltaFlusher] = {}
_flushers_lock = threading.Lock()


def _flusher(live_bus: Any, window: float) -> _DeltaFlusher:
    key = (id(live_bus), window)
    with _flushers_lock:
        flusher = _flushers.get(key)
        if flusher is None or flusher.bus is not live_bus:
            flusher = _flushers[key] = _DeltaFlusher(live_bus, window)
        return flusher


class ReplyStream:
    """Publishes one assistant reply: typing, numbered deltas, done.

    A reply's first text goes out at once (the visitor waits for it); what follows is
    coalesced for up to CHAT_DELTA_COALESCE_MS, so a frame may carry several tokens' text.
    All of this process's replies' frames go out together, from one thread (_DeltaFlusher).
    Frames are numbered 1, 2, 3 … in the order they reach the topic (`seq`; `chunks` says
    how many of the model's chunks the text so far holds), so the socket's duplicate check
    and a widget's resume position work frame by frame, as before.

    Publishing is best effort: the saved message is what counts. A reply whose frames cannot
    be published (Redis away) is still written to its end and saved whole; a widget that
    missed frames gets the message in the `done` frame or from the database on reconnect.
    A `quiet` stream (a reply started again after its first writer died, whose deltas the
    widget has partly shown already) publishes no deltas, only typing and the finished
    message.

    `delta` may be called from any thread (the model's stream is read on one of its own)."""

    def __init__(self, tenant_id: int, chat_id: int, reply_id: str, *, quiet: bool = False) -> None:
        self.topic = chat_topic(tenant_id, chat_id)
        self.tenant_id = tenant_id
        self.chat_id = chat_id
        self.reply_id = reply_id
        self.quiet = quiet
        self.seq = 0  # frames published
        self.chunks = 0  # texts received
        self.text: list[str] = []
        self._sent_chunks = 0  # texts already in a frame
        self._last_html = 0.0
        # The console's copy of the text so far, kept escaped for HTML and then for JSON as
        # it grows: escaping the whole text again every HTML_REFRESH_SECONDS is work that
        # grows with the reply, for every reply streaming. (Both escapes work character by
        # character, so the pieces' escapes add up to the whole's.)
        self._console_json = ""
        self._console_chunks = 0
        self._console_ends: tuple[str, str] | None = None
        self.publish_failed = False
        self.bus = bus()
        window = float(current_app.config.get("CHAT_DELTA_COALESCE_MS", 30)) / 1000
        self._flusher = _flusher(self.bus, window) if window > 0 else None
        self._lock = threading.Lock()  # the text and counters
        self._reply_json = json.dumps(reply_id)
        self._key_id = self._reply_json[1:-1]  # as json.dumps writes it inside the key
        self.send_lock = threading.Lock()  # taking a frame and publishing it
        self._typing: str | None = None  # the typing frame, until the flusher sends it

    def failed_to_publish(self, exc: Exception) -> None:
        if not self.publish_failed:
            log.warning("reply %s: live frames not published: %s", self.reply_id, exc)
        self.publish_failed = True

    def _publish(self, key: str, **frame: Any) -> None:
        try:
            self.bus.publish(self.topic, encode(key, **frame))
        except Exception as exc:  # noqa: BLE001 - the reply goes on; see the class doc
            self.failed_to_publish(exc)

    def _console_slot(self) -> tuple[str, str]:
        """The JSON string of the console's streaming slot, cut where its text goes."""
        mark = "\x00"
        whole = json.dumps(self._slot(f'<div class="msg msg-assistant streaming">{mark}</div>'))
        head, _, tail = whole.partition(json.dumps(mark)[1:-1])
        return head, tail

    def _pages_watching(self) -> set[str]:
        """Which of the pages a reply's end changes (the chat's own, the chat list) some
        operator has open. Most replies end with none open, and reading the row's facts and
        rendering the fragments for nobody was a quarter of what a reply cost this process
        (bench/RESULTS.md, seventh stop). Asked after the reply's commit: a page that
        registers later (Hub.subscribe(watch=True)) takes its snapshot later, from the
        database, with the reply in it. Redis unreachable: rendered for both."""
        watched, _generation = watched_topics({self.topic, tenant_topic(self.tenant_id, "chats")})
        return watched

    def _slot(self, inner: str) -> str:
        return f'<div id="chat-{self.chat_id}-streaming" hx-swap-oob="innerHTML">{inner}</div>'

    def start(self) -> None:
        typing = encode(
            f"typing-{self.reply_id}",
            html=self._slot('<p class="typing">Assistant is typing…</p>'),
            json_data={"type": "typing", "from": "assistant", "reply_id": self.reply_id},
        )
        if self._flusher is None:
            self._publish_encoded(self.topic, typing)
            return
        # Published by the flusher's thread with its next round (at the latest with the
        # reply's first delta, ahead of it): the reply's own thread goes on to ask the model
        # meanwhile (an XADD waited for here was most of a millisecond on the way to the
        # first delta). Not urgent: an urgent round ends every streaming reply's window
        # early, and with hundreds streaming and dozens starting a second, a round per start
        # for a typing dot cut their deltas into more, smaller frames.
        with self._lock:
            self._typing = typing
        self._flusher.mark(self)

    def delta(self, text: str) -> None:
        with self._lock:
            self.chunks += 1
            self.text.append(text)
            first = self.chunks == 1
        if self.quiet:
            return
        # Published by the flusher's thread, even the first text: `delta` is called on the
        # process's stream loop, which a Redis round trip would hold up for every reply.
        if self._flusher is None:
            self.send_now()
        else:
            self._flusher.mark(self, urgent=first)

    def send_now(self) -> None:
        """Publish what is pending of this reply now, in the caller's thread."""
        with self.send_lock:
            for _stream, topic, data in self.take_frames():
                self._publish_encoded(topic, data)

    def _publish_encoded(self, topic: str, data: str) -> None:
        try:
            self.bus.publish(topic, data)
        except Exception as exc:  # noqa: BLE001 - the reply goes on; see the class doc
            self.failed_to_publish(exc)

    def take_frames(self) -> list[tuple[ReplyStream, str, str]]:
        """The frames to publish next, in order: the typing frame if start() left it to the
        flusher, then the next delta frame. The caller holds `send_lock` and publishes them."""
        with self._lock:
            typing, self._typing = self._typing, None
        frames = [(self, self.topic, typing)] if typing is not None else []
        frame = self.take_frame()
        if frame is not None:
            frames.append(frame)
        return frames

    def take_frame(self) -> tuple[ReplyStream, str, str] | None:
        """The next delta frame (the texts not yet in one), numbered; None when there are
        none. The caller holds `send_lock` and publishes it."""
        with self._lock:
            if self.quiet or self._sent_chunks >= self.chunks:
                return None
            pending = "".join(self.text[self._sent_chunks : self.chunks])
            self._sent_chunks = chunks = self.chunks
            self.seq += 1
            seq = self.seq
            console = None
            now = time.monotonic()
            if now - self._last_html >= HTML_REFRESH_SECONDS:
                # The console shows the text so far (coalesced per socket); the widget appends.
                self._last_html = now
                grown = "".join(self.text[self._console_chunks : chunks])
                self._console_chunks = chunks
                self._console_json += json.dumps(str(escape(grown)))[1:-1]
                console = self._console_json
        # The frame as events.live.encode writes it, from parts encoded once per reply: a
        # json.dumps of the nested dicts costs as much as the rest of the frame's way out.
        html = ""
        if console is not None:
            if self._console_ends is None:
                self._console_ends = self._console_slot()
            head, tail = self._console_ends
            html = f',"html":{head}{console}{tail}'
        data = (
            f'{{"key":"delta-{self._key_id}-{seq}"{html},"json":{{"type":"delta",'
            f'"reply_id":{self._reply_json},"seq":{seq},"chunks":{chunks},'
            f'"text":{json.dumps(pending)}}}}}'
        )
        return self, self.topic, data

    def done(
        self,
        message: Message | None,
        *,
        usage: dict | None,
        cancelled: bool = False,
        error_code: str | None = None,
    ) -> None:
        # The chat's list row and header change too (its count and last message): read
        # first, then every fragment rendered in one scope and every frame sent in one
        # round trip, the reply's last text first (`done` follows every delta on the topic).
        pages = self._pages_watching()
        chat, facts = None, {}
        if message is not None and pages:
            try:
                chat = db.session.get(Chat, message.chat_id)
                rows = tenant_topic(self.tenant_id, "chats")
                facts = row_facts([chat.id]) if chat is not None and rows in pages else {}
            except Exception as exc:  # noqa: BLE001 - the next snapshot shows the row
                log.warning("reply %s: chat row not published: %s", self.reply_id, exc)
                chat = None
        # The console's copy (the streaming slot emptied, the saved message added) is for
        # a page that shows the chat; the widget reads the JSON.
        html = self._slot("") if self.topic in pages else None
        row_frames: list[tuple[str, str]] = []
        with fragments():
            if html is not None and message is not None:
                html += render_fragment("chats/_message_push.html", m=message, replace=False)
            if chat is not None:
                row_frames = chat_row_frames(chat, facts, topics=pages)
        message_data = message_json(message) if message is not None else None
        with self.send_lock:
            frames = [(topic, data) for _stream, topic, data in self.take_frames()]
            done = {
                "type": "done",
                "reply_id": self.reply_id,
                "seq": self.seq,
                "chunks": self.chunks,
                "message": message_data,
                "usage": usage,
                "cancelled": cancelled,
            }
            frames.append((self.topic, encode(f"done-{self.reply_id}", html=html, json_data=done)))
            try:
                self.bus.publish_many(frames + row_frames)
            except Exception as exc:  # noqa: BLE001 - the reply goes on; see the class doc
                self.failed_to_publish(exc)
        if error_code:
            self._publish(
                f"error-{self.reply_id}",
                json_data={
                    "type": "error",
                    "code": error_code,
                    "message": "The assistant is unavailable right now; a person will follow "
                    "up on your message.",
                    "reply_id": self.reply_id,
                },
            )
