"""Chats domain: agents (assistant configurations), chats and their messages."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any, Optional

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from extensions import db
from models.base import Timestamps, Tracked, UTCDateTime, tenant_fk, utcnow

if TYPE_CHECKING:
    from models.accounts import User

CHAT_STATUSES = ("active", "completed", "archived")
SENDERS = ("visitor", "assistant", "operator", "system")
CONTENT_TYPES = ("text", "image", "file", "audio")
INTERRUPTIONS = ("stopped", "cut")


class Agent(Tracked, Timestamps, db.Model):
    __tablename__ = "agents"
    __entity__ = "agent"
    __table_args__ = (
        CheckConstraint("temperature >= 0 AND temperature <= 2", name="temperature_range"),
        CheckConstraint("max_tokens > 0", name="max_tokens_positive"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk()
    name: Mapped[str] = mapped_column(String(120))
    provider: Mapped[str] = mapped_column(String(32), default="openai")
    model: Mapped[str] = mapped_column(String(120), default="gpt-4o-mini")
    temperature: Mapped[float] = mapped_column(Float, default=0.7)
    max_tokens: Mapped[int] = mapped_column(Integer, default=1000)
    system_prompt: Mapped[str] = mapped_column(Text, default="You are a helpful assistant.")
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)


class Chat(Tracked, Timestamps, db.Model):
    __tablename__ = "chats"
    __entity__ = "chat"
    __table_args__ = (
        CheckConstraint("status IN ('active', 'completed', 'archived')", name="status_valid"),
        CheckConstraint(
            "satisfaction IS NULL OR (satisfaction >= 1 AND satisfaction <= 5)",
            name="satisfaction_range",
        ),
        CheckConstraint("message_count >= 0", name="message_count_nonnegative"),
        Index("ix_chats_tenant_status_activity", "tenant_id", "status", "last_activity"),
        Index("ix_chats_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_chats_tenant_escalated", "tenant_id", "escalated_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True, default=uuid.uuid4)
    tenant_id: Mapped[int] = tenant_fk()
    user_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    visitor_id: Mapped[Optional[str]] = mapped_column(String(64), index=True)
    agent_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("agents.id", ondelete="SET NULL"), index=True
    )
    session_id: Mapped[Optional[str]] = mapped_column(String(64), index=True)
    title: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(16), default="active")
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    agent_settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    context: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    last_activity: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    satisfaction: Mapped[Optional[int]] = mapped_column(Integer)
    summary: Mapped[Optional[str]] = mapped_column(Text)
    archived_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    # The operator responsible for the chat (set when one takes it over); notified first.
    assignee_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    # Set when a visitor message escalates; only an operator clears it (Resolve escalation):
    # a later friendly message does not mean the problem was dealt with.
    escalated_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    escalation_reason: Mapped[Optional[str]] = mapped_column(String(200))
    # Who the visitor is, as the embedding site says through the widget's identify(). Trusted
    # only when identity_verified: the site signed the identifier with the tenant's secret.
    visitor_name: Mapped[Optional[str]] = mapped_column(String(120))
    visitor_email: Mapped[Optional[str]] = mapped_column(String(254))
    visitor_identifier: Mapped[Optional[str]] = mapped_column(String(128))
    identity_verified: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The visitor's words with their rating (optional), and when they rated: the CSAT report's
    # range is by rating time, not by when the chat began.
    satisfaction_comment: Mapped[Optional[str]] = mapped_column(Text)
    rated_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())

    agent: Mapped[Optional[Agent]] = relationship()
    assignee: Mapped[Optional[User]] = relationship(foreign_keys=[assignee_id])
    messages: Mapped[list[Message]] = relationship(
        back_populates="chat", cascade="all, delete-orphan", passive_deletes=True
    )

    def feed_label(self) -> str:
        return self.title or f"Chat {str(self.public_id)[:8]}"

    def visitor_label(self) -> str:
        """Who operators are talking to: the name/email the site passed, else the raw id."""
        known = " ".join(
            part
            for part in (self.visitor_name, f"<{self.visitor_email}>" if self.visitor_email else "")
            if part
        )
        if known:
            return known if self.identity_verified else f"{known} (unverified)"
        if self.user_id:
            return f"user #{self.user_id}"
        return self.visitor_id or "—"


class Message(Tracked, db.Model):
    __tablename__ = "messages"
    __entity__ = "message"
    __table_args__ = (
        CheckConstraint(
            "sender IN ('visitor', 'assistant', 'operator', 'system')", name="sender_valid"
        ),
        CheckConstraint(
            "content_type IN ('text', 'image', 'file', 'audio')", name="content_type_valid"
        ),
        Index("ix_messages_chat_created", "chat_id", "created_at", "id"),
        Index("ix_messages_tenant_sentiment", "tenant_id", "sentiment_label"),
        # A visitor message's reply is found by it at every reply's start and save, and the
        # foreign key's ON DELETE SET NULL looks up a deleted message's replies the same way.
        Index("ix_messages_in_response_to", "in_response_to_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk()
    chat_id: Mapped[int] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"))
    content: Mapped[str] = mapped_column(Text)
    content_type: Mapped[str] = mapped_column(String(16), default="text")
    sender: Mapped[str] = mapped_column(String(16))
    in_response_to_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL")
    )
    sentiment_label: Mapped[Optional[str]] = mapped_column(String(16))
    sentiment_score: Mapped[Optional[float]] = mapped_column(Float)
    prompt_tokens: Mapped[Optional[int]] = mapped_column(Integer)
    completion_tokens: Mapped[Optional[int]] = mapped_column(Integer)
    total_tokens: Mapped[Optional[int]] = mapped_column(Integer)
    processing_ms: Mapped[Optional[int]] = mapped_column(Integer)
    # A reply that did not finish: "stopped" by the visitor, or "cut" by a timeout. NULL: whole.
    interrupted: Mapped[Optional[str]] = mapped_column(String(16))
    # The visitor's language (ISO 639-1, detected offline when the message is analysed).
    language: Mapped[Optional[str]] = mapped_column(String(8))
    # Why the message escalated ("negative −0.72", "phrase: reembolso"); NULL: it did not.
    escalation_reason: Mapped[Optional[str]] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    chat: Mapped[Chat] = relationship(back_populates="messages")

    def feed_label(self) -> str:
        text = " ".join(self.content.split())
        return f"{self.sender}: {text[:80]}" + ("…" if len(text) > 80 else "")


ANY_LANGUAGE = "any"


class EscalationRule(Tracked, Timestamps, db.Model):
    """A phrase that escalates a visitor message whatever its sentiment ("reembolso",
    "cancel my account"), in one language or in any."""

    __tablename__ = "escalation_rules"
    __entity__ = "escalation_rule"
    __table_args__ = (UniqueConstraint("tenant_id", "language", "phrase"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk()
    language: Mapped[str] = mapped_column(String(8), default=ANY_LANGUAGE)
    phrase: Mapped[str] = mapped_column(String(200))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)

    def feed_label(self) -> str:
        return f"Escalation phrase “{self.phrase}” ({self.language})"


class CannedReply(Tracked, Timestamps, db.Model):
    """A reply an operator inserts by its shortcut ("/refund") instead of typing it again."""

    __tablename__ = "canned_replies"
    __entity__ = "canned_reply"
    __table_args__ = (UniqueConstraint("tenant_id", "shortcut"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk()
    shortcut: Mapped[str] = mapped_column(String(40))
    content: Mapped[str] = mapped_column(Text)

    def feed_label(self) -> str:
        return f"Canned reply /{self.shortcut}"


class ChatRead(db.Model):
    """How far one operator has read one chat: a visitor message after it is unread for them.
    Not tracked: reading is routine, and each operator's own business."""

    __tablename__ = "chat_reads"
    __table_args__ = (UniqueConstraint("chat_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk(index=False)
    chat_id: Mapped[int] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    last_read_message_id: Mapped[int] = mapped_column(Integer, default=0)
    read_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
