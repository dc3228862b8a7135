"""Chats: sessions, messages, replies, sentiment, escalation and archiving.

Functions take ids or models, flush, and raise ChatError with a code and a human message;
the caller (a socket handler, a route, an actor) owns the commit.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from flask import current_app
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError

from events import delay_events, emit, enqueue, on_commit
from extensions import db
from models.base import utcnow
from models.chats import INTERRUPTIONS, Agent, Chat, ChatRead, Message
from services.escalation import escalation_reason
from services.kv import kv
from services.sentiment import NEGATIVE, POSITIVE, Sentiment, offline

log = logging.getLogger(__name__)

DEFAULT_SETTINGS = {
    "auto_response": True,
    "sentiment_analysis": True,
    "notifications": True,
    "human_takeover": False,
}
TONE_FOR_SENTIMENT = {NEGATIVE: "empathetic", POSITIVE: "friendly"}


class ChatError(ValueError):
    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


def chat_topic(tenant_id: int, chat_id: int) -> str:
    return f"t{tenant_id}:chat:{chat_id}"


def default_agent(tenant_id: int) -> Agent | None:
    return db.session.scalar(
        select(Agent)
        .where(Agent.tenant_id == tenant_id, Agent.is_active.is_(True))
        .order_by(Agent.is_default.desc(), Agent.id)
        .limit(1)
    )


def agent_settings_for(agent: Agent | None) -> dict[str, Any]:
    if agent is None:
        return {}
    return {
        "temperature": agent.temperature,
        "max_tokens": agent.max_tokens,
        "provider": agent.provider,
    }


def start_chat(
    tenant_id: int,
    *,
    visitor_id: str | None = None,
    user_id: int | None = None,
    session_id: str | None = None,
    title: str = "",
) -> Chat:
    """A new chat with default settings and the tenant's default agent."""
    agent = default_agent(tenant_id)
    chat = Chat(
        tenant_id=tenant_id,
        visitor_id=visitor_id,
        user_id=user_id,
        session_id=session_id,
        agent_id=agent.id if agent else None,
        title=title,
        status="active",
        is_active=True,
        settings={**DEFAULT_SETTINGS, **agent_settings_for(agent)},
        agent_settings={},
        context={},
        last_activity=utcnow(),
        message_count=0,
    )
    db.session.add(chat)
    db.session.flush()
    return chat


def change_agent(chat: Chat, agent: Agent) -> None:
    if agent.tenant_id != chat.tenant_id:
        raise ChatError("not_found", "No such agent.")
    chat.agent_id = agent.id
    chat.settings = {**(chat.settings or {}), **agent_settings_for(agent)}


def find_resumable(
    tenant_id: int, public_id: str, *, visitor_id: str | None, user_id: int | None
) -> Chat | None:
    """The caller's own chat, if it has not expired. A chat id alone never grants access."""
    import uuid

    try:
        key = uuid.UUID(str(public_id))
    except ValueError:
        return None
    chat = db.session.scalar(select(Chat).where(Chat.public_id == key, Chat.tenant_id == tenant_id))
    if chat is None:
        return None
    owns = (user_id is not None and chat.user_id == user_id) or (
        visitor_id is not None and chat.visitor_id == visitor_id
    )
    if not owns or chat.status == "archived":
        return None
    expiry = timedelta(hours=current_app.config.get("CHAT_SESSION_EXPIRY_HOURS", 24))
    if chat.last_activity and chat.last_activity < utcnow() - expiry:
        return None
    return chat


# Row ids are 32-bit integer columns on PostgreSQL: a larger id names no row, and sent to the
# database it is an error there (and an overflow in SQLite past 64 bits).
MAX_ROW_ID = 2**31 - 1


def is_row_id(value: Any) -> bool:
    """A whole number that can be a row's id (bool is an int in Python, and is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ROW_ID


def clean_visitor_text(content: Any) -> str:
    if not isinstance(content, str) or not content.strip():
        raise ChatError("empty_message", "Type a message before sending.")
    # Refused rather than stripped: the transcript keeps what the visitor sent or nothing.
    # Nobody types NUL in the widget, and PostgreSQL cannot store it in text.
    if "\x00" in content:
        raise ChatError("invalid_characters", "Messages cannot contain NUL characters.")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (JSON allows "\ud800"): no UTF-8 encoding, so no database takes it.
        raise ChatError(
            "invalid_characters", "Messages must be valid Unicode text (no lone surrogates)."
        ) from None
    limit = current_app.config.get("CHAT_MAX_MESSAGE_LENGTH", 2000)
    if len(content) > limit:
        raise ChatError(
            "message_too_long",
            f"Messages can be at most {limit} characters (this one has {len(content)}).",
            limit=limit,
        )
    return content.strip()


def _wait_text(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    return f"{-(-seconds // 60)} minutes"


def check_visitor_message_limits(
    tenant_id: int, client_ip: str, sender_key: str, *, starts_chat: bool
) -> None:
    """Count one widget message against every limit, or raise ChatError("rate_limited").

    A new socket is a new visitor, so the per-visitor limit alone resets with every socket:
    the client address and the widget key are limited too. Checked from the narrowest key to
    the widest, so a message one limit refuses is not counted against the wider ones (an
    address over its own limit does not use up its widget's ceiling for everyone else); all
    in one round trip to Redis (kv().hit_all).
    """
    cfg = current_app.config
    limits = [
        (
            f"chat-sender:{sender_key}",
            cfg["CHAT_RATE_LIMIT_PER_MINUTE"],
            60,
            "visitor",
            "You are sending messages too fast.",
        ),
        (
            f"chat-ip-messages:t{tenant_id}:{client_ip}",
            cfg["CHAT_MESSAGES_PER_IP_PER_MINUTE"],
            60,
            "ip",
            "Too many messages from your network.",
        ),
    ]
    if starts_chat:
        limits.append(
            (
                f"chat-ip-new-chats:t{tenant_id}:{client_ip}",
                cfg["CHAT_NEW_CHATS_PER_IP_PER_HOUR"],
                3600,
                "ip_new_chats",
                "Too many new conversations from your network.",
            )
        )
    limits.append(
        (
            f"chat-widget-messages:t{tenant_id}",
            cfg["CHAT_MESSAGES_PER_WIDGET_PER_MINUTE"],
            60,
            "widget",
            "This chat is very busy right now.",
        )
    )
    index, decision = kv().hit_all([(key, limit, window) for key, limit, window, _, _ in limits])
    if index is not None:
        _key, _limit, _window, scope, message = limits[index]
        raise ChatError(
            "rate_limited",
            f"{message} Try again in {_wait_text(decision.retry_after)}.",
            retry_after=decision.retry_after,
            scope=scope,
        )


# A message's bump of its chat, built once (see _latest): activity time, count, and the title
# a chat takes from its first visitor message.
_BUMP_CHAT = (
    update(Chat)
    .where(Chat.id == bindparam("chat_pk"))
    .values(last_activity=bindparam("now"), message_count=Chat.message_count + 1)
)
_BUMP_CHAT_TITLE = _BUMP_CHAT.values(title=bindparam("new_title"))


def add_message(
    chat: Chat,
    sender: str,
    content: str,
    *,
    in_response_to_id: int | None = None,
    usage: dict | None = None,
    processing_ms: int | None = None,
    interrupted: str | None = None,
) -> Message:
    """Save a message and bump the chat's activity and count in SQL (no lost updates).
    `interrupted` marks a reply that did not finish ("stopped" or "cut")."""
    if interrupted is not None and interrupted not in INTERRUPTIONS:
        raise ValueError(f"unknown interruption {interrupted!r}")
    now = utcnow()
    usage = usage or {}
    message = Message(
        tenant_id=chat.tenant_id,
        chat_id=chat.id,
        sender=sender,
        content=content,
        content_type="text",
        in_response_to_id=in_response_to_id,
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        total_tokens=usage.get("total_tokens"),
        processing_ms=processing_ms,
        interrupted=interrupted,
        created_at=now,
    )
    db.session.add(message)
    db.session.flush()
    params: dict[str, Any] = {"chat_pk": chat.id, "now": now}
    bump = _BUMP_CHAT
    if not chat.title and sender == "visitor":
        bump, params["new_title"] = _BUMP_CHAT_TITLE, _title_from(content)
    db.session.execute(bump, params, execution_options={"synchronize_session": False})
    db.session.expire(chat, ["last_activity", "message_count", "title"])
    # The operators' unread counts and rows for a visitor's message are pushed by the
    # message.created handler (tasks.chats.publish_message): per operator, a count query
    # and two renders, which in the web process held the visitor's socket thread (and,
    # with hundreds of chats starting, the whole process).
    return message


def _title_from(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 60 else line[:59] + "…"


def _latest(*columns: Any):
    """A chat's last messages (newest first) as `columns`, or whole Messages; parameters
    chat_id and limit. Built once at import: SQLAlchemy works out a statement's cache key
    each time one is built, and that cost more than its execution (0.15 of 0.29 ms here)."""
    return (
        select(*(columns or (Message,)))
        .where(Message.chat_id == bindparam("chat_id"))
        .order_by(Message.created_at.desc(), Message.id.desc())
        .limit(bindparam("limit"))
    )


_LATEST_MESSAGES = _latest()
_LATEST_HISTORY = _latest(Message.sender, Message.content)


def recent_messages(chat_id: int, limit: int) -> list[Message]:
    rows = db.session.scalars(_LATEST_MESSAGES, {"chat_id": chat_id, "limit": limit}).all()
    return list(reversed(rows))


def recent_history(chat_id: int, limit: int) -> list[tuple[str, str]]:
    """(sender, content) of the chat's last `limit` messages, oldest first: what the model is
    sent, read as plain columns (no Message objects to build on the way to the first delta)."""
    rows = db.session.execute(_LATEST_HISTORY, {"chat_id": chat_id, "limit": limit}).all()
    return [(sender, content) for sender, content in reversed(rows)]


def messages_before(chat_id: int, before_id: int, limit: int) -> list[Message]:
    rows = db.session.scalars(
        select(Message)
        .where(Message.chat_id == chat_id, Message.id < before_id)
        .order_by(Message.id.desc())
        .limit(limit)
    ).all()
    return list(reversed(rows))


def should_auto_reply(chat: Chat) -> bool:
    agent = db.session.get(Agent, chat.agent_id) if chat.agent_id else None
    return auto_reply_allowed(chat.settings, chat.status, agent.is_active if agent else None)


def auto_reply_allowed(settings: dict | None, status: str, agent_active: bool | None) -> bool:
    """Whether the assistant answers in a chat with these settings and status, whose agent
    is active (True), inactive (False) or missing (None)."""
    settings = settings or {}
    if not settings.get("auto_response", True) or settings.get("human_takeover"):
        return False
    return status == "active" and bool(agent_active)


def set_takeover(chat: Chat, on: bool, user_id: int | None = None) -> None:
    """Turn human takeover on or off; whoever takes a chat over becomes its assignee
    (unless it has one already), so its escalations reach them first."""
    chat.settings = {**(chat.settings or {}), "human_takeover": bool(on)}
    if on and user_id is not None and chat.assignee_id is None:
        chat.assignee_id = user_id


def resolve_escalation(chat: Chat) -> bool:
    """An operator says the escalation was dealt with; False if the chat was not escalated.
    The change is an ordinary chat update, so it is audited with the operator as actor."""
    if chat.escalated_at is None:
        return False
    chat.escalated_at = None
    chat.escalation_reason = None
    return True


def escalation_recipients(event: Any) -> list[int]:
    """Who hears of an escalation: the chat's assignee and every active user of the tenant
    who is on duty, whatever their role; when nobody is, the tenant's admins, so that an
    escalation never reaches no one."""
    from models.accounts import User

    tenant_users = select(User.id).where(
        User.tenant_id == event.tenant_id, User.is_active_user.is_(True)
    )
    wanted = set(db.session.scalars(tenant_users.where(User.on_duty.is_(True))))
    assignee_id = db.session.scalar(
        select(Chat.assignee_id).where(
            Chat.id == event.entity_id, Chat.tenant_id == event.tenant_id
        )
    )
    if assignee_id is not None:
        wanted.add(assignee_id)
    if not wanted:
        wanted = set(db.session.scalars(tenant_users.where(User.role == "admin")))
    return sorted(wanted)


def complete_chat(chat: Chat) -> None:
    if chat.status == "active":
        chat.status = "completed"
        chat.is_active = False
        emit(
            "chat.completed",
            tenant_id=chat.tenant_id,
            entity="chat",
            entity_id=chat.id,
            payload={"label": chat.feed_label()},
        )


def check_rating(score: Any) -> int:
    if not isinstance(score, int) or isinstance(score, bool) or not 1 <= score <= 5:
        raise ChatError("invalid_rating", "A rating is a whole number from 1 to 5.")
    return score


MAX_RATING_COMMENT = 1000


def rate_chat(chat: Chat, score: Any, comment: Any = None) -> None:
    chat.satisfaction = check_rating(score)
    chat.rated_at = utcnow()
    if comment is not None:
        # A rating's comment goes through the same checks as a message; blank clears it.
        text = clean_visitor_text(comment) if isinstance(comment, str) and comment.strip() else ""
        if len(text) > MAX_RATING_COMMENT:
            raise ChatError(
                "comment_too_long",
                f"A comment can be at most {MAX_RATING_COMMENT} characters.",
            )
        chat.satisfaction_comment = text or None


def apply_sentiment(message: Message, sentiment: Sentiment) -> None:
    """Store the sentiment and language, emit message.analyzed, escalate (with the reason:
    one of the tenant's phrases, or negative sentiment) and adjust the tone."""
    message.sentiment_label = sentiment.label
    message.sentiment_score = sentiment.score
    message.language = sentiment.language or message.language
    reason = message.escalation_reason = escalation_reason(message, sentiment)
    chat = db.session.get(Chat, message.chat_id)
    excerpt = message.content[:200]
    emit(
        "message.analyzed",
        tenant_id=message.tenant_id,
        entity="message",
        entity_id=message.id,
        payload={
            "chat_id": message.chat_id,
            "label": f"{sentiment.label} ({sentiment.score:+.2f})",
            "sentiment": sentiment.label,
            "score": sentiment.score,
            "backend": sentiment.backend,
        },
    )
    if reason and chat is not None:
        # The newest reason shows; the time stays that of the first unresolved escalation.
        chat.escalation_reason = reason
        chat.escalated_at = chat.escalated_at or utcnow()
    if reason:
        emit(
            "escalation.triggered",
            tenant_id=message.tenant_id,
            entity="chat",
            entity_id=message.chat_id,
            payload={
                "label": f"Escalated ({reason}): {chat.feed_label() if chat else 'a chat'}",
                "reason": reason,
                "language": message.language,
                "message_id": message.id,
                "score": sentiment.score,
                "excerpt": excerpt,
            },
        )
    tone = TONE_FOR_SENTIMENT.get(sentiment.label)
    if chat is not None and tone and (chat.agent_settings or {}).get("tone") != tone:
        style = "supportive" if tone == "empathetic" else "enthusiastic"
        chat.agent_settings = {**(chat.agent_settings or {}), "tone": tone, "response_style": style}


def reply_tone(agent_settings: dict | None, message: Any, language: str | None) -> str | None:
    """The tone of the reply to `message` (anything with its sender, content and
    sentiment_label), decided from that message itself: the background analysis usually has
    not stored its sentiment yet when the reply starts, so the offline lexicon (well under a
    millisecond) reads it here, in `language`. A neutral message keeps the chat's tone."""
    label = message.sentiment_label
    if label is None and message.sender == "visitor":
        label = offline(message.content, language).label
    return TONE_FOR_SENTIMENT.get(label) or (agent_settings or {}).get("tone")


_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-zA-ZÀ-ÿ']{3,}")
_STOP = set(
    "the and for you your are was with that this have has not but can will what when how "
    "hi hello thanks thank please there they them then than just about into from our".split()
)


def extractive_summary(messages: list[Message], max_sentences: int = 3) -> str:
    """The most representative sentences of the conversation, in their original order."""
    sentences: list[tuple[int, str, str]] = []
    for message in messages:
        for sentence in _SENTENCE.split(" ".join(message.content.split())):
            if len(sentence) >= 8:
                sentences.append((len(sentences), message.sender, sentence))
    if not sentences:
        return "No conversation to summarise."
    freq = Counter(
        w.lower() for _, _, s in sentences for w in _WORD.findall(s) if w.lower() not in _STOP
    )

    def score(item: tuple[int, str, str]) -> float:
        words = [w.lower() for w in _WORD.findall(item[2]) if w.lower() not in _STOP]
        return sum(freq[w] for w in words) / (len(words) + 1) + (0.5 if item[1] == "visitor" else 0)

    best = sorted(sorted(sentences, key=score, reverse=True)[:max_sentences])
    return " ".join(f"{sender.capitalize()}: {text}" for _, sender, text in best)[:1000]


def summarise(chat: Chat) -> str:
    return summarise_history(recent_history(chat.id, SUMMARY_MESSAGES))


SUMMARY_MESSAGES = 200


class _Said(NamedTuple):
    sender: str
    content: str


def summarise_history(history: list[tuple[str, str]]) -> str:
    """A summary of (sender, content) pairs, oldest first: the model's, else an extractive
    one. It may wait long for the model: call it with no transaction open."""
    from services.assistant import complete

    if not history:
        return "No messages were exchanged."
    transcript = "\n".join(f"{sender}: {content}" for sender, content in history)[-12000:]
    llm = complete(
        [
            {
                "role": "system",
                "content": "Summarise this customer conversation in at most three sentences: "
                "the visitor's need, what was done, and what is still open.",
            },
            {"role": "user", "content": transcript},
        ]
    )
    return llm or extractive_summary([_Said(sender, content) for sender, content in history])


def archive_chat(chat: Chat, summary: str | None = None) -> None:
    if chat.status == "archived":
        return
    chat.summary = summary if summary is not None else summarise(chat)
    chat.status = "archived"
    chat.is_active = False
    chat.archived_at = utcnow()
    emit(
        "chat.archived",
        tenant_id=chat.tenant_id,
        entity="chat",
        entity_id=chat.id,
        payload={"label": chat.feed_label(), "summary": chat.summary[:300]},
    )


def _archivable(cutoff: datetime):
    return (Chat.status == "completed") | (
        (Chat.status == "active") & (Chat.last_activity < cutoff)
    )


def archive_if_still_due(chat_id: int, cutoff: datetime) -> bool:
    """Archive one candidate of the sweep without holding a transaction while the model
    writes its summary: read the transcript (short transaction), summarise (none), then
    archive in a short transaction of its own if the chat is still due (a visitor may have
    written meanwhile). Commits; True if archived."""
    due = db.session.scalar(select(Chat.id).where(Chat.id == chat_id, _archivable(cutoff)))
    history = recent_history(chat_id, SUMMARY_MESSAGES) if due else []
    db.session.rollback()  # nothing written: end the read transaction before the model call
    if not due:
        return False
    summary = summarise_history(history)
    chat = db.session.scalar(
        select(Chat).where(Chat.id == chat_id, _archivable(cutoff)).with_for_update()
    )
    if chat is None:
        db.session.rollback()
        return False
    archive_chat(chat, summary)
    db.session.commit()
    return True


@dataclass
class ArchiveCandidates:
    ids: list[int]
    cutoff: datetime


def archive_candidates(
    now: datetime | None = None, limit: int = 500, after_id: int = 0
) -> ArchiveCandidates:
    """Completed chats, and active ones idle longer than CHAT_INACTIVITY_HOURS (ids above
    `after_id`, in order: the sweep reads them a batch at a time)."""
    now = now or utcnow()
    cutoff = now - timedelta(hours=current_app.config.get("CHAT_INACTIVITY_HOURS", 24))
    ids = db.session.scalars(
        select(Chat.id)
        .where(_archivable(cutoff), Chat.id > after_id)
        .order_by(Chat.id)
        .limit(limit)
    ).all()
    return ArchiveCandidates(list(ids), cutoff)


def message_counts(chat_ids: list[int]) -> dict[int, int]:
    rows = db.session.execute(
        select(Message.chat_id, func.count())
        .where(Message.chat_id.in_(chat_ids))
        .group_by(Message.chat_id)
    )
    return dict(rows.all())


@dataclass(frozen=True)
class RowFacts:
    """What a chat's row in the inbox shows besides the chat's own columns."""

    last_sender: str
    last_text: str
    sentiment: str | None  # the latest analysed visitor message's


def row_facts(chat_ids: list[int]) -> dict[int, RowFacts]:
    """The last message and latest visitor sentiment of each chat, in two queries."""
    if not chat_ids:
        return {}
    last_ids = (
        select(func.max(Message.id)).where(Message.chat_id.in_(chat_ids)).group_by(Message.chat_id)
    )
    last = db.session.execute(
        select(Message.chat_id, Message.sender, Message.content).where(Message.id.in_(last_ids))
    ).all()
    felt_ids = (
        select(func.max(Message.id))
        .where(
            Message.chat_id.in_(chat_ids),
            Message.sender == "visitor",
            Message.sentiment_label.is_not(None),
        )
        .group_by(Message.chat_id)
    )
    felt = dict(
        db.session.execute(
            select(Message.chat_id, Message.sentiment_label).where(Message.id.in_(felt_ids))
        ).all()
    )
    facts = {}
    for chat_id, sender, content in last:
        text = " ".join(content.split())
        text = text[:80] + ("…" if len(text) > 80 else "")
        facts[chat_id] = RowFacts(sender, text, felt.get(chat_id))
    return facts


# ------------------------------------------------------------------ assignment and unread


def view_counts(tenant_id: int, user_id: int) -> dict[str, int]:
    """The chat list's views as the user sees them: All, Mine (assigned to the user) and
    Unassigned, counted in one statement."""
    row = db.session.execute(
        select(
            func.count(),
            func.count().filter(Chat.assignee_id == user_id),
            func.count().filter(Chat.assignee_id.is_(None)),
        ).where(Chat.tenant_id == tenant_id)
    ).one()
    return {"all": row[0], "mine": row[1], "unassigned": row[2]}


def assign(chat: Chat, assignee_id: int | None) -> None:
    """Make a user of the chat's tenant (or no one) its assignee. The caller checked the
    user's tenant; the change is audited by the chat's `updated` event."""
    chat.assignee_id = assignee_id


def _last_read(user_id: int):
    return (
        select(ChatRead.last_read_message_id)
        .where(ChatRead.chat_id == Chat.id, ChatRead.user_id == user_id)
        .scalar_subquery()
    )


def unread_clause(user_id: int):
    """An active chat with a visitor message past this operator's read mark (or never
    opened). A completed or archived chat waits for no one: a new operator's count would
    otherwise start at every chat ever had."""
    return Chat.status == "active", (
        select(Message.id)
        .where(
            Message.chat_id == Chat.id,
            Message.sender == "visitor",
            Message.id > func.coalesce(_last_read(user_id), 0),
        )
        .exists()
    )


def unread_chat_ids(user_id: int, chat_ids: list[int]) -> set[int]:
    if not chat_ids:
        return set()
    stmt = select(Chat.id).where(Chat.id.in_(chat_ids), *unread_clause(user_id))
    return set(db.session.scalars(stmt))


def unread_chat_count(tenant_id: int, user_id: int) -> int:
    stmt = (
        select(func.count())
        .select_from(Chat)
        .where(Chat.tenant_id == tenant_id, *unread_clause(user_id))
    )
    return int(db.session.scalar(stmt) or 0)


def mark_read(chat: Chat, user_id: int) -> None:
    """Everything in the chat up to now is read by this operator (by no one else)."""
    last_id = db.session.scalar(select(func.max(Message.id)).where(Message.chat_id == chat.id))
    stmt = select(ChatRead).where(ChatRead.chat_id == chat.id, ChatRead.user_id == user_id)
    mark = db.session.scalar(stmt)
    if mark is None:
        mark = ChatRead(tenant_id=chat.tenant_id, chat_id=chat.id, user_id=user_id)
        try:
            with db.session.begin_nested():  # two tabs opening the chat at once
                db.session.add(mark)
        except IntegrityError:
            mark = db.session.scalar(stmt)
    mark.last_read_message_id = max(mark.last_read_message_id or 0, last_id or 0)
    mark.read_at = utcnow()
    publish_unread_after_commit(chat.tenant_id, chat.id, user_ids=[user_id])


def publish_unread_after_commit(
    tenant_id: int, chat_id: int, user_ids: list[int] | None = None
) -> None:
    """After commit, each operator's pages get their own unread count (the nav badge, on
    their bell topic which every page follows) and the chat's row as it is for them (their
    inbox topic). Per user topics: one operator's reading is no one else's."""
    app = current_app._get_current_object()

    def _push() -> None:
        from models.accounts import User
        from services.live import publish, render_fragment, user_topic

        with app.app_context():
            try:
                chat = db.session.get(Chat, chat_id)
                if chat is None:
                    return
                stmt = select(User.id).where(
                    User.tenant_id == tenant_id, User.is_active_user.is_(True)
                )
                if user_ids is not None:
                    stmt = stmt.where(User.id.in_(user_ids))
                facts = row_facts([chat_id])
                frames = []
                for user_id in db.session.scalars(stmt).all():
                    count = unread_chat_count(tenant_id, user_id)
                    badge = render_fragment("chats/_nav_count.html", count=count, oob=True)
                    frames.append((user_topic(tenant_id, user_id, "bell"), "chats-unread", badge))
                    row = render_fragment(
                        "chats/_row.html",
                        chat=chat,
                        row_facts=facts,
                        oob="row",
                        unread=bool(unread_chat_ids(user_id, [chat_id])),
                    )
                    frames.append(
                        (user_topic(tenant_id, user_id, "inbox"), f"inbox-{chat_id}", row)
                    )
                for topic, key, html in frames:
                    publish(topic, key, html=html)
            except Exception:  # noqa: BLE001 - live counts are best effort; pages reload them
                log.exception("unread state of chat %s not published", chat_id)

    on_commit(_push)


def reply_claim_key(message_id: int) -> str:
    return f"reply-claim:{message_id}"


def reply_queued_key(message_id: int) -> str:
    """Set by the web process once its generate_reply is on the queue (start_reply_now)."""
    return f"reply-queued:{message_id}"


def reply_started_key(message_id: int) -> str:
    """Set while a reply is being written (cleared when it ends): with its lease
    (reply_claim_key) gone, the writer died and the reply is started again."""
    return f"reply-started:{message_id}"


def unanswered_visitor_messages(since: datetime, limit: int = 200) -> list[int]:
    """Visitor messages since `since` that have no assistant reply, oldest first."""
    from sqlalchemy.orm import aliased

    answered = aliased(Message)
    return list(
        db.session.scalars(
            select(Message.id)
            .where(
                Message.sender == "visitor",
                Message.created_at >= since,
                ~select(answered.id)
                .where(answered.in_response_to_id == Message.id, answered.sender == "assistant")
                .exists(),
            )
            .order_by(Message.id)
            .limit(limit)
        )
    )


# Longer than any reply may take (generate_reply's time limit): meanwhile no second
# generate_reply for the same message streams a second answer.
REPLY_CLAIM_SECONDS = 150.0


def start_reply_now(message_id: int) -> None:
    """For the web process that saves a visitor message wanting an automatic reply
    (should_auto_reply): enqueue the reply in the message's transaction. The job is sent as
    soon as the transaction commits, before the commit's events go to their handlers, instead
    of waiting for the message.created event's `chat_auto_reply` handler: that saves two queue
    hops and a handler transaction, and the reply is not queued behind (nor its worker busy
    with) the sentiment, metrics and audit work the event starts. Being a durable job, it
    is sent again by the relay if Redis is down at the commit or this process dies before the
    send. The handler stays for messages saved elsewhere; when both start a reply, the claim
    in generate_reply lets one of them stream."""
    enqueue("generate_reply", message_id)
    delay_ms = current_app.config.get("CHAT_EVENTS_DELAY_MS", 0.0)
    if delay_ms > 0:
        delay_events(delay_ms / 1000)

    def mark_queued() -> None:
        # Runs after the job's send, off the reply's path: the fallback handler, which may
        # run before generate_reply claims the message, then knows not to queue a second one.
        try:
            kv().set_flag(reply_queued_key(message_id), ttl=REPLY_CLAIM_SECONDS)
        except Exception as exc:  # noqa: BLE001 - at worst a second job, which the claim stops
            log.warning("could not flag the reply to message %s as queued: %s", message_id, exc)

    on_commit(mark_queued, before_events=True)


# ------------------------------------------------------------------ erasure

ERASED = "[removed]"
# Texts shorter than this are not searched for outside the erased chats' own rows: "hello"
# or "thanks" appear in everybody's conversations, and are nobody's personal data alone.
MIN_SWEPT_TEXT = 12


@dataclass
class Erasure:
    chats: int = 0
    messages: int = 0
    copies: int = 0  # rows elsewhere (events, audit, notifications, …) that held their text
    live_frames: int = 0
    live: list[tuple[int, list[int]]] = field(default_factory=list)  # (tenant, its chats)
    texts: tuple[str, ...] = ()


def chats_to_erase(
    *, user_id: int | None = None, visitor_id: str | None = None, chat_ref: str | None = None
) -> list[int]:
    """Ids of the chats of a signed-in user, of an anonymous visitor (the widget's visitor
    id), or one chat (number or public id)."""
    import uuid

    stmt = select(Chat.id)
    if user_id is not None:
        stmt = stmt.where(Chat.user_id == user_id)
    elif visitor_id:
        stmt = stmt.where(Chat.visitor_id == visitor_id)
    elif chat_ref:
        if chat_ref.isdigit():
            stmt = stmt.where(Chat.id == int(chat_ref))
        else:
            try:
                stmt = stmt.where(Chat.public_id == uuid.UUID(chat_ref))
            except ValueError:
                return []
    else:
        return []
    return list(db.session.scalars(stmt.order_by(Chat.id)))


def _scrub(value: Any, texts: tuple[str, ...] | None = None) -> Any:
    """`value` with its strings erased: wholly (texts None), or only where they contain one
    of `texts`. Numbers, booleans and keys stay, so ids and counts still mean something."""
    if isinstance(value, str):
        if texts is None:
            return ERASED
        for text in texts:
            value = value.replace(text, ERASED)
        return value
    if isinstance(value, dict):
        return {key: _scrub(item, texts) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub(item, texts) for item in value]
    return value


def _forms(text: str) -> set[str]:
    """How a text can be stored elsewhere: as is, inside JSON (escaped), inside HTML."""
    import html
    import json

    return {text, json.dumps(text)[1:-1], html.escape(text), html.escape(text, quote=False)}


def _sweep_table_copies(texts: tuple[str, ...]) -> int:
    """Replace verbatim copies of `texts` in every text and JSON column of every table (a copy
    this module does not know of: a quote in another chat, a label, a future table)."""
    from sqlalchemy import JSON, String, Text, Unicode, UnicodeText, or_
    from sqlalchemy import cast as sql_cast

    patterns = sorted({form for text in texts for form in _forms(text)})
    changed = 0
    for table in db.metadata.sorted_tables:
        keys = list(table.primary_key.columns)
        if not keys:
            continue
        for column in table.columns:
            is_json = isinstance(column.type, JSON)
            if not (is_json or isinstance(column.type, String | Text | Unicode | UnicodeText)):
                continue
            target = sql_cast(column, Text) if is_json else column
            condition = or_(
                *(target.contains(pattern, autoescape=True) for pattern in patterns if pattern)
            )
            rows = db.session.execute(select(*keys, column).where(condition)).all()
            for row in rows:
                *key_values, value = row
                new_value = _scrub(value, texts) if is_json else _scrub(value, tuple(patterns))
                if is_json and new_value == value:
                    # Stored escaped in a way the texts do not match (non-ASCII): erase whole
                    # strings that hold a copy.
                    new_value = _scrub_strings_containing(value, texts)
                db.session.execute(
                    update(table)
                    .where(*(k == v for k, v in zip(keys, key_values, strict=True)))
                    .values({column.key: new_value})
                )
                changed += 1
    return changed


def _scrub_strings_containing(value: Any, texts: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        return ERASED if any(text in value for text in texts) else value
    if isinstance(value, dict):
        return {key: _scrub_strings_containing(item, texts) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub_strings_containing(item, texts) for item in value]
    return value


def _erase_live_frames(tenant_id: int, chat_ids: list[int], texts: tuple[str, ...]) -> int:
    """Drop what the live bus keeps for replay: the chats' own topics whole, and frames of the
    tenant's other topics (the inbox rows, the feed) that name these chats or hold their text."""
    from services.live import bus

    live = bus()
    own_topics = {chat_topic(tenant_id, chat_id) for chat_id in chat_ids}
    markers = {f"chat-row-{chat_id}" for chat_id in chat_ids} | {
        f'/chats/{chat_id}"' for chat_id in chat_ids
    }
    markers |= {form for text in texts for form in _forms(text) if form}

    def holds_personal(data: str) -> bool:
        return any(marker in data for marker in markers)

    removed = 0
    redis = getattr(live, "redis", None)
    if redis is not None:
        prefix = live.prefix
        for key in redis.scan_iter(match=f"{prefix}t{tenant_id}:*", count=500):
            name = key.decode() if isinstance(key, bytes) else key
            if name[len(prefix) :] in own_topics:
                removed += redis.xlen(name)
                redis.delete(name)
                continue
            doomed = []
            for frame_id, fields in redis.xrange(name):
                raw = fields.get(b"d", fields.get("d", b""))
                data = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                if holds_personal(data):
                    doomed.append(frame_id)
            if doomed:
                removed += redis.xdel(name, *doomed)
        return removed
    streams = getattr(live, "_streams", {})
    for topic in list(streams):
        if not topic.startswith(f"t{tenant_id}:"):
            continue
        frames = streams[topic]
        kept = [
            (frame_id, data)
            for frame_id, data in frames
            if topic not in own_topics and not holds_personal(data)
        ]
        removed += len(frames) - len(kept)
        frames.clear()
        frames.extend(kept)
    return removed


def erase_chats(chat_ids: list[int]) -> Erasure:
    """Erase the words of these chats everywhere they were copied: every message of them
    (the assistant's and operators' replies quote the visitor), the chats' titles, summaries
    and context, the events written about them and their messages, their audit details,
    notifications about them (escalation excerpts), verbatim copies in any other table, and
    the live bus's replayable frames. The chats stay, with counts and times, anonymous.

    Written with plain UPDATEs: an ORM change would record the old text in a new event.
    Commits once, after which one `chat.erased` event per chat says what was done (no text)."""
    from models.audit import AuditLog
    from models.events import OutboxEvent
    from models.notifications import Notification

    result = Erasure()
    if not chat_ids:
        return result
    chat_rows = db.session.execute(
        select(
            Chat.id,
            Chat.tenant_id,
            Chat.public_id,
            Chat.title,
            Chat.summary,
            Chat.context,
            Chat.visitor_name,
            Chat.visitor_email,
            Chat.visitor_identifier,
            Chat.satisfaction_comment,
        ).where(Chat.id.in_(chat_ids))
    ).all()
    messages = db.session.execute(
        select(Message.id, Message.content).where(Message.chat_id.in_(chat_ids))
    ).all()
    message_ids = [message_id for message_id, _ in messages]
    texts = {content for _, content in messages} | {
        text
        for row in chat_rows
        for text in (
            row.title,
            row.summary,
            row.visitor_name,
            row.visitor_email,
            row.visitor_identifier,
            row.satisfaction_comment,
        )
        if text
    }
    # What the embedding site said about the visitor (a name, an email) travels as context.
    texts |= {
        value
        for row in chat_rows
        for value in (row.context or {}).values()
        if isinstance(value, str) and value
    }
    texts.discard(ERASED)
    swept = tuple(
        sorted((t for t in texts if len(t.strip()) >= MIN_SWEPT_TEXT), key=len, reverse=True)
    )

    db.session.execute(
        update(Message)
        .where(Message.chat_id.in_(chat_ids))
        .values(
            content=ERASED,
            sentiment_label=None,
            sentiment_score=None,
            language=None,
            escalation_reason=None,
        ),
        execution_options={"synchronize_session": False},
    )
    import uuid

    for row in chat_rows:
        db.session.execute(
            update(Chat)
            .where(Chat.id == row.id)
            .values(
                user_id=None,
                visitor_id="anon-" + uuid.uuid4().hex[:12],
                session_id=None,
                context={},
                title="Erased chat",
                summary=None,
                visitor_name=None,
                visitor_email=None,
                visitor_identifier=None,
                identity_verified=False,
                satisfaction_comment=None,
            ),
            execution_options={"synchronize_session": False},
        )

    # Copies made by reference to these chats and messages: erased whole, whatever they
    # quote (an 80-character label, a 200-character excerpt, a trimmed audit detail).
    about = ((OutboxEvent.entity == "chat") & OutboxEvent.entity_id.in_(chat_ids)) | (
        (OutboxEvent.entity == "message") & OutboxEvent.entity_id.in_(message_ids or [0])
    )
    for event_pk, payload in db.session.execute(
        select(OutboxEvent.id, OutboxEvent.payload).where(about)
    ).all():
        db.session.execute(
            update(OutboxEvent).where(OutboxEvent.id == event_pk).values(payload=_scrub(payload))
        )
        result.copies += 1
    audited = (
        (AuditLog.object_type == "chat") & AuditLog.object_id.in_([str(i) for i in chat_ids])
    ) | (
        (AuditLog.object_type == "message")
        & AuditLog.object_id.in_([str(i) for i in message_ids] or ["0"])
    )
    for audit_pk, details in db.session.execute(
        select(AuditLog.id, AuditLog.details).where(audited)
    ).all():
        db.session.execute(
            update(AuditLog).where(AuditLog.id == audit_pk).values(details=_scrub(details))
        )
        result.copies += 1
    noted = db.session.execute(
        update(Notification)
        .where(
            Notification.subject.in_([f"chat:{i}" for i in chat_ids])
            | Notification.link.in_([f"/chats/{i}" for i in chat_ids])
        )
        .values(body=ERASED),
        execution_options={"synchronize_session": False},
    )
    result.copies += noted.rowcount or 0
    if swept:
        result.copies += _sweep_table_copies(swept)

    for row in chat_rows:
        emit(
            "chat.erased",
            tenant_id=row.tenant_id,
            entity="chat",
            entity_id=row.id,
            payload={"label": f"Chat {str(row.public_id)[:8]} erased"},
        )
    db.session.flush()
    db.session.expire_all()
    result.chats, result.messages = len(chat_rows), len(messages)
    result.live = [
        (tenant_id, [row.id for row in chat_rows if row.tenant_id == tenant_id])
        for tenant_id in sorted({row.tenant_id for row in chat_rows})
    ]
    result.texts = swept
    return result


def erase_live_frames(erasure: Erasure) -> int:
    """After erase_chats' commit: remove the erased chats' frames from the live bus (raises
    ChatError when the bus cannot be reached; running the erasure again finishes it)."""
    for tenant_id, chat_ids in erasure.live:
        try:
            erasure.live_frames += _erase_live_frames(tenant_id, chat_ids, erasure.texts)
        except Exception as exc:  # noqa: BLE001 - the database is erased; say what is left
            log.error("could not erase the live frames of chats %s: %s", chat_ids, exc)
            raise ChatError(
                "live_bus_unavailable",
                "The chats are erased in the database, but their live frames could not be "
                f"removed from the live bus ({exc}); run the command again when it is up.",
            ) from exc
    return erasure.live_frames
