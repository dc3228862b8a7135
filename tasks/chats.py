"""Chat handlers and actors: sentiment, auto-replies (streamed), live frames, archiving."""

from __future__ import annotations

import logging
import time

from flask import current_app
from sqlalchemy import bindparam, select
from sqlalchemy.orm import aliased

from events import enqueue
from events.registry import Event, handler, periodic, task
from extensions import db
from models.chats import Agent, Chat, Message
from services import chat_live, chats
from services.assistant import (
    NOT_CONFIGURED_REPLY,
    UNAVAILABLE_REPLY,
    build_messages,
    is_configured,
    stream_reply,
)
from services.escalation import analysis_burst
from services.kv import kv
from services.notifications import notification_rule
from services.sentiment import analyse_many, backend_name, detect_language, warm_up

log = logging.getLogger(__name__)

notification_rule(
    "escalation.triggered",
    type="escalation",
    recipients="tenant_admins",
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
    if chat is not None:
        chat_live.publish_chat_row(chat, created=event.action == "created")


Reply = aliased(Message)

# What a reply needs to start, in one statement built once (a statement built per call costs
# its cache key again: 0.5 ms of the 0.9 it took here): the message, its chat and agent, and
# whether it has been answered.
_REPLY_START = (
    select(
        Message,
        Chat,
        Agent,
        select(Reply.id)
        .where(Reply.in_response_to_id == Message.id, Reply.sender == "assistant")
        .exists(),
    )
    .join(Chat, Chat.id == Message.chat_id)
    .outerjoin(Agent, Agent.id == Chat.agent_id)
    .where(Message.id == bindparam("message_id"))
)


def cancel_key(reply_id: str) -> str:
    return f"cancel:{reply_id}"


@task(name="generate_reply", queue="assistant", max_retries=0, time_limit_ms=120_000)
def generate_reply(message_id: int) -> None:
    """Stream the assistant's reply to a visitor message, then save it (idempotent)."""
    cfg = current_app.config
    # Its reads need no transaction of their own: in autocommit there is no BEGIN and no
    # COMMIT to wait for on the way to the first delta. (The reply is saved in a transaction
    # of its own at the end, on a connection checked out afresh.)
    if not db.session().in_transaction():  # (a caller's open transaction is simply used)
        db.session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    # One statement for what the reply needs to start (each round trip counts: the visitor
    # waits for the first delta, and the message's other handlers are busy meanwhile).
    row = db.session.execute(_REPLY_START, {"message_id": message_id}).first()
    if row is None:
        return
    message, chat, agent, already = row
    if already or not chats.should_auto_reply(chat):
        return
    if not kv().claim(chats.reply_claim_key(message.id), chats.REPLY_CLAIM_SECONDS):
        return  # another generate_reply (started by the web process or the event) has it
    reply_id = chat_live.reply_id_for(message.id)
    history = chats.recent_history(chat.id, cfg.get("CHAT_HISTORY_MESSAGES", 50))
    # What the reply needs, read now: the commit below expires these objects, and touching
    # one afterwards costs a new transaction and a SELECT before the model is even asked.
    settings = chat.settings or {}
    tenant_id, chat_id = chat.tenant_id, chat.id
    request = {
        "model": agent.model if agent else cfg["OPENAI_MODEL"],
        "temperature": float(settings.get("temperature", agent.temperature if agent else 0.7)),
        "max_tokens": int(settings.get("max_tokens", agent.max_tokens if agent else 1000)),
        "messages": build_messages(
            agent.system_prompt if agent else "",
            (chat.agent_settings or {}).get("tone"),
            history,
        ),
    }
    db.session.commit()  # the connection goes back to the pool while the model talks

    stream = chat_live.ReplyStream(tenant_id, chat_id, reply_id)
    stream.start()
    interrupted = None  # or how the reply ended early: "stopped" or "cut" (see ReplyResult)
    if not is_configured():
        result_text, failed, usage, cancelled, ms = NOT_CONFIGURED_REPLY, True, None, False, 0
        stream.delta(result_text)
        error_code = None  # not an outage: the fallback says plainly why
    else:
        started = time.monotonic()
        result = stream_reply(
            **request,
            on_delta=stream.delta,
            should_cancel=lambda: kv().has_flag(cancel_key(reply_id)),
        )
        cancelled, usage, ms = result.cancelled, result.usage, result.processing_ms
        interrupted = result.interrupted
        failed = result.failed and not result.cancelled
        result_text = result.content
        error_code = None
        if failed:
            log.warning("assistant failed for message %s: %s", message_id, result.error)
            if not result.content:
                result_text = UNAVAILABLE_REPLY
                stream.delta(result_text)
            error_code = "assistant_unavailable"
        ms = ms or int((time.monotonic() - started) * 1000)
    saved = None
    if result_text:
        saved = chats.add_message(
            db.session.get(Chat, chat_id),
            "assistant",
            result_text,
            in_response_to_id=message_id,
            usage=usage,
            processing_ms=ms,
            interrupted=interrupted,
        )
    db.session.commit()
    stream.done(saved, usage=usage, cancelled=cancelled, error_code=error_code)


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
