"""Chat handlers and actors: sentiment, auto-replies (streamed), live frames, archiving."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from flask import current_app
from redis.exceptions import RedisError
from sqlalchemy import bindparam, literal_column, null, select, union_all
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import aliased

from events import enqueue
from events.registry import Event, handler, periodic, route, task
from extensions import db
from models.base import utcnow
from models.chats import Agent, Chat, Message
from services import chat_live, chats
from services.assistant import (
    NOT_CONFIGURED_REPLY,
    UNAVAILABLE_REPLY,
    build_messages,
    is_configured,
    stream_reply,
    visitor_language,
)
from services.escalation import analysis_burst
from services.kv import kv
from services.notifications import notification_rule
from services.sentiment import analyse_many, backend_name, detect_language, warm_up

log = logging.getLogger(__name__)

notification_rule(
    "escalation.triggered",
    type="escalation",
    recipients=chats.escalation_recipients,
    title=lambda e: (
        "A chat needs attention"
        if str(e.payload.get("reason", "")).startswith("phrase:")
        else "A visitor is unhappy"
    ),
    body=lambda e: " · ".join(
        part for part in (e.payload.get("reason"), e.payload.get("excerpt", "")) if part
    ),
    link=lambda e: f"/chats/{e.entity_id}",
    subject=lambda e: f"chat:{e.entity_id}",
)


def _visitor_message(event: Event) -> Message | None:
    if (event.payload.get("fields") or {}).get("sender") != "visitor":
        return None
    return db.session.get(Message, event.entity_id)


# A chat's events are one message each for all their handlers (the feed, webhooks, metrics
# and audit ones too), not one per queue: a visitor's message made four Dramatiq messages and
# four transactions, whose work shares the cores the reply streams from; routed, the handler
# workers spend about a fifth less CPU per message (issue 23 §3). The routed handlers are
# quick database work; the counters' upsert runs last (metrics.count is marked `last`).
route("message.*", "chats")
route("chat.*", "chats")


@handler("message.created", name="chat_sentiment", queue="chats", max_retries=3)
def analyse_sentiment(event: Event) -> None:
    message = _visitor_message(event)
    if message is None or message.sentiment_label is not None:
        return
    chat = db.session.get(Chat, message.chat_id)
    if chat is not None and not (chat.settings or {}).get("sentiment_analysis", True):
        message.language = message.language or detect_language(message.content)
        return
    # The model is asked once for a burst of messages (the visitor typed several before the
    # first was analysed); the offline backends take one at a time, as cheap as it gets.
    limit = current_app.config.get("SENTIMENT_LLM_BATCH", 20) if backend_name() == "llm" else 1
    burst = analysis_burst(message, limit)
    if not burst:
        return  # another handler is analysing this message with its own burst
    languages = [m.language or detect_language(m.content) for m in burst]
    for analysed, sentiment in zip(
        burst, analyse_many([m.content for m in burst], languages), strict=True
    ):
        chats.apply_sentiment(analysed, sentiment)


# Replies name the visitor's language (services.assistant.build_messages): the language model
# loads now, in the background, not on the way to a visitor's first reply.
warm_up()


# The fallback for the reply the web process sends itself right after the message commits
# (services.chats.start_reply_now): it only matters when that process died in between. It runs
# with the chat's other handlers, not on the `assistant` queue, so the assistant process spends
# the moments before a reply's first delta on that reply and not on this handler's transaction.
@handler("message.created", name="chat_auto_reply", queue="chats", max_retries=3)
def start_auto_reply(event: Event) -> None:
    message = _visitor_message(event)
    if message is None:
        return
    chat = db.session.get(Chat, message.chat_id)
    if chat is None or not chats.should_auto_reply(chat):
        return
    if kv().has_flag(chats.reply_queued_key(message.id)) or kv().has_flag(
        chats.reply_claim_key(message.id)
    ):
        return  # the web process that saved the message started the reply already
    enqueue("generate_reply", message.id)


@handler("message.created", "message.updated", name="chat_live_messages", queue="chats")
def publish_message(event: Event) -> None:
    """Visitor, operator and system messages (and sentiment badges) reach both sides live.
    Assistant replies arrive through the reply stream's own `done` frame instead."""
    message = db.session.get(Message, event.entity_id)
    if message is None:
        return
    if event.action == "created" and message.sender == "assistant" and message.in_response_to_id:
        return
    chat_live.publish_message(message, updated=event.action == "updated")
    if event.action == "created" and message.sender == "visitor":
        chats.publish_unread_after_commit(message.tenant_id, message.chat_id)


@handler(
    "chat.created",
    "chat.updated",
    "chat.archived",
    "chat.completed",
    name="chat_live_rows",
    queue="chats",
)
def publish_chat_row(event: Event) -> None:
    chat = db.session.get(Chat, event.entity_id)
    if chat is None:
        return
    chat_live.publish_chat_row(chat, created=event.action == "created")
    # The list's view counts change when a chat is added or changes hands.
    handed = (event.payload.get("changes") or {}).get("assignee_id")
    if event.action == "created":
        chat_live.publish_view_counts(chat.tenant_id, {chat.assignee_id} - {None})
    elif isinstance(handed, list) and len(handed) == 2:
        users = {u for u in handed if isinstance(u, int)}
        chat_live.publish_view_counts(chat.tenant_id, users)


Reply = aliased(Message)
Earlier = aliased(Message)
Asked = aliased(Message)

# What a reply needs to start, in one statement built once (a statement built per call costs
# its cache key again): the message, its chat and agent and whether it has been answered
# (the row with part 0), then the chat's last messages for the prompt (part 1, one row each).
# One round trip and plain columns instead of three ORM entities and a second query: every
# step here is on the way to the visitor's first delta.
_REPLY_START_HEAD = (
    select(
        literal_column("0").label("part"),
        Message.sender,
        Message.content,
        Message.created_at,
        Message.id,
        Message.language,
        Message.sentiment_label,
        Chat.id.label("chat_id"),
        Chat.tenant_id,
        Chat.status,
        Chat.settings,
        Chat.agent_settings,
        Agent.is_active.label("agent_active"),
        Agent.model,
        Agent.temperature,
        Agent.max_tokens,
        Agent.system_prompt,
        select(Reply.id)
        .where(
            Reply.sender == "assistant",
            (Reply.in_response_to_id == Message.id)
            # A reply saved without naming its message (imported or demo transcripts)
            # answers what came before it in its chat.
            | (
                (Reply.chat_id == Message.chat_id)
                & Reply.in_response_to_id.is_(None)
                & (Reply.id > Message.id)
            ),
        )
        .exists()
        .label("already"),
    )
    .join(Chat, Chat.id == Message.chat_id)
    .outerjoin(Agent, Agent.id == Chat.agent_id)
    .where(Message.id == bindparam("message_id"))
)
_HISTORY = (
    select(Earlier.sender, Earlier.content, Earlier.created_at, Earlier.id)
    .where(
        Earlier.chat_id
        == select(Asked.chat_id).where(Asked.id == bindparam("message_id")).scalar_subquery()
    )
    .order_by(Earlier.created_at.desc(), Earlier.id.desc())
    .limit(bindparam("limit"))
    .subquery()
)
_REPLY_START = union_all(
    _REPLY_START_HEAD,
    select(
        literal_column("1"),
        _HISTORY.c.sender,
        _HISTORY.c.content,
        _HISTORY.c.created_at,
        _HISTORY.c.id,
        *[null()] * (len(_REPLY_START_HEAD.selected_columns) - 5),
    ),
)


def _reply_start(message_id: int, history_limit: int):
    """The reply's start row (None when the message is gone) and the prompt's history, oldest
    first, as (sender, content)."""
    params = {"message_id": message_id, "limit": history_limit}
    if db.session().in_transaction():  # (a caller's open transaction is simply used)
        rows = db.session.execute(_REPLY_START, params).all()
    else:
        # In autocommit and outside the session: no BEGIN and no COMMIT to wait for on the
        # way to the first delta, none of the session's bookkeeping, and the connection is
        # back in the pool before the model is asked. (The reply is saved in a transaction
        # of its own at the end.)
        with db.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            rows = conn.execute(_REPLY_START, params).all()
    head = next((row for row in rows if row.part == 0), None)
    earlier = sorted((row for row in rows if row.part == 1), key=lambda r: (r.created_at, r.id))
    return head, [(row.sender, row.content) for row in earlier]


def cancel_key(reply_id: str) -> str:
    return f"cancel:{reply_id}"


# How many of a process's replies may be ending at once (saved, their last frames and the
# chat's row rendered and sent). That is Python work that holds the interpreter lock; a few
# hundred threads doing it together each get the lock in turn, and so does the loop that
# reads every reply's model stream: the replies still streaming stalled, all at the same
# moment. Waiting here, a reply's thread leaves the lock to the few that are working and
# to the stream loop. (Starts are not held back: the visitor waits for the first delta.)
REPLY_ENDS_AT_ONCE = 3
_reply_ends = threading.BoundedSemaphore(REPLY_ENDS_AT_ONCE)


@task(name="generate_reply", queue="assistant", max_retries=0, time_limit_ms=120_000)
def generate_reply(message_id: int) -> None:
    """Stream the assistant's reply to a visitor message, then save it (idempotent)."""
    cfg = current_app.config
    # One statement for what the reply needs to start (each round trip counts: the visitor
    # waits for the first delta, and the message's other handlers are busy meanwhile).
    start, history = _reply_start(message_id, cfg.get("CHAT_HISTORY_MESSAGES", 50))
    if start is None or start.already:
        return
    if not chats.auto_reply_allowed(start.settings, start.status, start.agent_active):
        return
    lease = ReplyLease(chats.reply_claim_key(message_id), cfg["CHAT_REPLY_LEASE_SECONDS"])
    started_key = chats.reply_started_key(message_id)
    # The claim, and the mark that a reply is being written, in one round trip. Marked
    # already: a reply begun by a process that died, whose deltas are partly on the
    # visitor's screen, so this one streams none and sends the finished message (which
    # replaces them).
    resumed = lease.claim(started_key, cfg["CHAT_REPLY_RESUME_WINDOW"])
    if resumed is None:
        return  # another generate_reply (started by the web process or the event) has it
    reply_id = chat_live.reply_id_for(message_id)
    settings = start.settings or {}
    tenant_id, chat_id = start.tenant_id, start.chat_id
    # Detected once, for both the tone and the reply-language instruction.
    language = start.language or visitor_language(history)
    temperature = start.temperature if start.temperature is not None else 0.7
    request = {
        "model": start.model or cfg["OPENAI_MODEL"],
        "temperature": float(settings.get("temperature", temperature)),
        "max_tokens": int(settings.get("max_tokens", start.max_tokens or 1000)),
        "messages": build_messages(
            start.system_prompt or "",
            # from this message, not the background's race
            chats.reply_tone(start.agent_settings, start, language),
            history,
            language,
        ),
    }
    if db.session().in_transaction():
        db.session.commit()  # a caller's: its connection goes back while the model talks

    lease.keep()
    try:
        stream = chat_live.ReplyStream(tenant_id, chat_id, reply_id, quiet=resumed)
        stream.start()
        outcome = _write_reply(message_id, reply_id, request, stream)
        saved = _save_reply(chat_id, message_id, outcome)
    except (OperationalError, RedisError):
        raise  # an outage: the sweep (resume_stalled_replies) starts the reply again
    except Exception:
        _forget_started(started_key)  # a failure that would only recur: not again
        raise
    finally:
        lease.release()
    with _reply_ends:
        stream.done(
            saved, usage=outcome.usage, cancelled=outcome.cancelled, error_code=outcome.error_code
        )
    _forget_started(started_key)


def _forget_started(started_key: str) -> None:
    try:
        kv().set_flag(started_key, ttl=0.001)  # ended: nothing to resume
    except Exception as exc:  # noqa: BLE001 - at worst the sweep finds it answered
        log.warning("could not clear the reply flag %s: %s", started_key, exc)


@dataclass
class _Outcome:
    text: str
    usage: dict | None
    cancelled: bool
    interrupted: str | None
    error_code: str | None
    ms: int


def _write_reply(message_id: int, reply_id: str, request: dict, stream) -> _Outcome:
    if not is_configured():
        stream.delta(NOT_CONFIGURED_REPLY)
        # Not an outage: the fallback says plainly why.
        return _Outcome(NOT_CONFIGURED_REPLY, None, False, None, None, 0)
    started = time.monotonic()
    stops = _stop_requests(kv())
    try:
        result = stream_reply(
            **request,
            on_delta=stream.delta,
            should_cancel=lambda: stops.asked(reply_id),
            register_wake=lambda wake: stops.watch(reply_id, wake),
        )
    finally:
        stops.forget(reply_id)
    failed = result.failed and not result.cancelled
    text, error_code = result.content, None
    if failed:
        log.warning("assistant failed for message %s: %s", message_id, result.error)
        if not result.content:
            text = UNAVAILABLE_REPLY
            stream.delta(text)
        error_code = "assistant_unavailable"
    ms = result.processing_ms or int((time.monotonic() - started) * 1000)
    return _Outcome(text, result.usage, result.cancelled, result.interrupted, error_code, ms)


class _StopRequests:
    """The visitors' Stop requests for this process's replies, read for all of them in one
    round trip every STOP_POLL_SECONDS; a reply that was asked to stop is woken at once. A
    reply asking Redis on its own, 20 times a second, costs a few hundred replies more CPU
    than their tokens do."""

    def __init__(self, store) -> None:
        self.store = store
        self._watched: dict[str, list] = {}  # reply id -> the wake-ups of its writers
        self._asked: set[str] = set()
        self._lock = threading.Lock()
        self._any = threading.Event()
        self._failing = False
        threading.Thread(target=self._run, name="reply-stops", daemon=True).start()

    def watch(self, reply_id: str, wake) -> None:
        with self._lock:
            self._watched.setdefault(reply_id, []).append(wake)
            self._any.set()

    def forget(self, reply_id: str) -> None:
        with self._lock:
            self._watched.pop(reply_id, None)
            self._asked.discard(reply_id)
            if not self._watched:
                self._any.clear()

    def asked(self, reply_id: str) -> bool:
        return reply_id in self._asked

    def _run(self) -> None:
        while True:
            self._any.wait()
            with self._lock:
                replies = [r for r in self._watched if r not in self._asked]
            try:
                flags = self.store.has_flags([cancel_key(r) for r in replies])
                self._failing = False
            except Exception as exc:  # noqa: BLE001 - Redis away: nobody can have asked
                if not self._failing:
                    log.warning("stop requests not read: %s", exc)
                self._failing = True
                flags = []
            wakes = []
            with self._lock:
                for reply, flag in zip(replies, flags, strict=False):
                    if flag and reply in self._watched:
                        self._asked.add(reply)
                        wakes += self._watched[reply]
            for wake in wakes:
                wake()
            time.sleep(STOP_POLL_SECONDS)


STOP_POLL_SECONDS = 0.05
_stops: dict[int, _StopRequests] = {}
_stops_lock = threading.Lock()


def _stop_requests(store) -> _StopRequests:
    with _stops_lock:
        stops = _stops.get(id(store))
        if stops is None or stops.store is not store:
            stops = _stops[id(store)] = _StopRequests(store)
        return stops


# Built once (a statement built per call costs its cache key again).
_LOCK_VISITOR_MESSAGE = (
    select(Message.id).where(Message.id == bindparam("message_id")).with_for_update()
)
_SAVED_REPLY = select(Message).where(
    Message.in_response_to_id == bindparam("message_id"), Message.sender == "assistant"
)


def _save_reply(chat_id: int, message_id: int, outcome: _Outcome) -> Message | None:
    """Save the reply once (a second writer's reply is kept instead), retrying while the
    database is away for up to CHAT_REPLY_SAVE_RETRY_SECONDS: the text is in this process
    only, and losing it would leave the visitor unanswered."""
    if not outcome.text:
        return None
    deadline = time.monotonic() + current_app.config["CHAT_REPLY_SAVE_RETRY_SECONDS"]
    delay = 0.5
    while True:
        try:
            with _reply_ends:  # (not while it waits for the database to come back)
                return _save_reply_once(chat_id, message_id, outcome)
        except (OperationalError, DBAPIError) as exc:
            try:
                db.session.rollback()
            except Exception:  # noqa: BLE001 - the connection is gone with the database
                db.session.remove()
            if isinstance(exc, DBAPIError) and not (
                isinstance(exc, OperationalError) or exc.connection_invalidated
            ):
                raise
            if time.monotonic() + delay > deadline:
                raise
            log.warning("reply to message %s not saved yet (%s); retrying", message_id, exc)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _save_reply_once(chat_id: int, message_id: int, outcome: _Outcome) -> Message:
    # The visitor message's row lock orders two writers of the same reply.
    db.session.execute(_LOCK_VISITOR_MESSAGE, {"message_id": message_id})
    existing = db.session.scalar(_SAVED_REPLY, {"message_id": message_id})
    saved = existing or chats.add_message(
        db.session.get(Chat, chat_id),
        "assistant",
        outcome.text,
        in_response_to_id=message_id,
        usage=outcome.usage,
        processing_ms=outcome.ms,
        interrupted=outcome.interrupted,
    )
    # The saved reply is published as it was written: expired by the commit, it would be
    # read back with a SELECT of its own for the `done` frame.
    session = db.session()
    session.expire_on_commit = False
    try:
        db.session.commit()
    finally:
        session.expire_on_commit = True
    return saved


class ReplyLease:
    """The right to write one reply, held in Redis for `seconds` and renewed while the reply
    is written (_LeaseKeeper): when its process dies, the lease runs out and the sweep
    (resume_stalled_replies) starts the reply again."""

    def __init__(self, key: str, seconds: float) -> None:
        self.key = key
        self.seconds = seconds
        self.store = kv()

    def claim(self, mark: str, mark_seconds: float) -> bool | None:
        """Take the lease and set the flag `mark`: None when another writer holds the lease,
        else whether `mark` was set before."""
        return self.store.claim_and_mark(self.key, self.seconds, mark, mark_seconds)

    def keep(self) -> None:
        _lease_keeper(self.store).hold(self.key, self.seconds)

    def release(self) -> None:
        _lease_keeper(self.store).drop(self.key)
        try:
            self.store.set_flag(self.key, ttl=0.001)
        except Exception as exc:  # noqa: BLE001 - it runs out by itself
            log.warning("reply lease %s not released: %s", self.key, exc)


class _LeaseKeeper:
    """Renews the leases of every reply this process writes, from one thread, all in one
    round trip every third of the shortest lease. A thread per reply cost each reply's
    start the thread's start (half a millisecond on the way to its first delta), and a few
    hundred replies as many threads."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.pid = os.getpid()
        self._leases: dict[str, float] = {}  # key -> seconds
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._due: float | None = None  # when the next renewal is due (monotonic)
        self._thread: threading.Thread | None = None

    def hold(self, key: str, seconds: float) -> None:
        # The claim has just set the lease's time: its first renewal is due in a third of
        # it, not now (a renewal at every start put a round trip, and the interpreter lock,
        # beside the reply's set-up whenever the process had no other reply).
        due = time.monotonic() + seconds / 3
        with self._lock:
            self._leases[key] = seconds
            if self._due is None or due < self._due:
                self._due = due
                self._wake.set()  # sooner than the thread sleeps for
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="reply-leases", daemon=True)
                self._thread.start()

    def drop(self, key: str) -> None:
        with self._lock:
            self._leases.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                wait = None if self._due is None else self._due - time.monotonic()
            if wait is None or wait > 0:
                self._wake.wait(wait)
                self._wake.clear()
                continue
            with self._lock:
                by_seconds: dict[float, list[str]] = {}
                for key, seconds in self._leases.items():
                    by_seconds.setdefault(seconds, []).append(key)
                shortest = min(by_seconds, default=None)
                self._due = None if shortest is None else time.monotonic() + shortest / 3
            for seconds, keys in by_seconds.items():
                try:
                    self.store.set_flags(keys, ttl=seconds)
                except Exception as exc:  # noqa: BLE001 - Redis away: renewed on the next beat
                    log.warning("%d reply leases not renewed: %s", len(keys), exc)


_lease_keepers: dict[int, _LeaseKeeper] = {}
_lease_keepers_lock = threading.Lock()


def _lease_keeper(store: Any) -> _LeaseKeeper:
    with _lease_keepers_lock:
        keeper = _lease_keepers.get(id(store))
        if keeper is None or keeper.store is not store or keeper.pid != os.getpid():
            keeper = _lease_keepers[id(store)] = _LeaseKeeper(store)
        return keeper


@periodic("CHAT_REPLY_SWEEP_INTERVAL", name="resume_stalled_replies", max_retries=0)
def resume_stalled_replies() -> None:
    """Start again the replies whose writer died mid-reply (started, lease gone, unsaved)."""
    cfg = current_app.config
    since = utcnow() - timedelta(seconds=cfg["CHAT_REPLY_RESUME_WINDOW"])
    for message_id in chats.unanswered_visitor_messages(since):
        if kv().has_flag(chats.reply_started_key(message_id)) and not kv().has_flag(
            chats.reply_claim_key(message_id)
        ):
            log.warning("the reply to message %s lost its writer; starting it again", message_id)
            enqueue("generate_reply", message_id)
    db.session.commit()


@periodic("CHAT_ARCHIVE_INTERVAL", name="archive_inactive_chats", time_limit_ms=900_000)
def archive_inactive_chats() -> None:
    """Archive (and summarise) due chats a batch of ids at a time; each chat in short
    transactions of its own around a model call made with none open."""
    after_id = 0
    while True:
        candidates = chats.archive_candidates(limit=ARCHIVE_BATCH, after_id=after_id)
        db.session.rollback()  # the read's transaction ends before any model call
        for chat_id in candidates.ids:
            chats.archive_if_still_due(chat_id, candidates.cutoff)
        if len(candidates.ids) < ARCHIVE_BATCH:
            return
        after_id = candidates.ids[-1]


ARCHIVE_BATCH = 50
