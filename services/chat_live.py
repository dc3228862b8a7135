"""Live frames for chats. One topic per chat carries both renderings of each frame: JSON for
the widget (`/ws/chat`) and out-of-band HTML for the console (`/ws/live`)."""

from __future__ import annotations

import logging
import time
from typing import Any

from markupsafe import escape

from events.fanout import append_key
from extensions import db
from models.chats import Chat, Message
from services.chats import chat_topic, is_row_id, row_facts
from services.live import publish, render_fragment, tenant_topic
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
    html = render_fragment("chats/_row_push.html", chat=chat, created=created, row_facts=facts)
    # A new chat's row is an append: no later update of the row may merge it away.
    key = append_key(f"chat-row-{chat.id}") if created else f"chat-row-{chat.id}"
    publish(tenant_topic(chat.tenant_id, "chats"), key, html=html)
    # The chat's own page refreshes its header (status, count, satisfaction, summary).
    header = render_fragment("chats/_header.html", chat=chat, oob=True)
    publish(
        chat_topic(chat.tenant_id, chat.id),
        f"chat-header-{chat.id}",
        html=header,
        json_data=status_json(chat),
    )


class ReplyStream:
    """Publishes one assistant reply: typing, numbered deltas, done.

    Publishing is best effort: the saved message is what counts. A reply whose frames cannot
    be published (Redis away) is still written to its end and saved whole; a widget that
    missed frames gets the message in the `done` frame or from the database on reconnect.
    A `quiet` stream (a reply started again after its first writer died, whose deltas the
    widget has partly shown already) publishes no deltas, only typing and the finished
    message."""

    def __init__(self, tenant_id: int, chat_id: int, reply_id: str, *, quiet: bool = False) -> None:
        self.topic = chat_topic(tenant_id, chat_id)
        self.chat_id = chat_id
        self.reply_id = reply_id
        self.quiet = quiet
        self.seq = 0
        self.text: list[str] = []
        self._last_html = 0.0
        self.publish_failed = False

    def _publish(self, key: str, **frame: Any) -> None:
        try:
            publish(self.topic, key, **frame)
        except Exception as exc:  # noqa: BLE001 - the reply goes on; see the class doc
            if not self.publish_failed:
                log.warning("reply %s: live frames not published: %s", self.reply_id, exc)
            self.publish_failed = True

    def _slot(self, inner: str) -> str:
        return f'<div id="chat-{self.chat_id}-streaming" hx-swap-oob="innerHTML">{inner}</div>'

    def start(self) -> None:
        self._publish(
            f"typing-{self.reply_id}",
            html=self._slot('<p class="typing">Assistant is typing…</p>'),
            json_data={"type": "typing", "from": "assistant", "reply_id": self.reply_id},
        )

    def delta(self, text: str) -> None:
        self.seq += 1
        self.text.append(text)
        if self.quiet:
            return
        html = None
        now = time.monotonic()
        if now - self._last_html >= HTML_REFRESH_SECONDS:
            # The console shows the text so far (coalesced per socket); the widget appends.
            self._last_html = now
            body = escape("".join(self.text))
            html = self._slot(f'<div class="msg msg-assistant streaming">{body}</div>')
        self._publish(
            f"delta-{self.reply_id}-{self.seq}",
            html=html,
            json_data={"type": "delta", "reply_id": self.reply_id, "seq": self.seq, "text": text},
        )

    def done(
        self,
        message: Message | None,
        *,
        usage: dict | None,
        cancelled: bool = False,
        error_code: str | None = None,
    ) -> None:
        html = self._slot("")
        if message is not None:
            html += render_fragment("chats/_message_push.html", m=message, replace=False)
        self._publish(
            f"done-{self.reply_id}",
            html=html,
            json_data={
                "type": "done",
                "reply_id": self.reply_id,
                "seq": self.seq,
                "message": message_json(message) if message is not None else None,
                "usage": usage,
                "cancelled": cancelled,
            },
        )
        if message is not None:
            try:
                chat = db.session.get(Chat, message.chat_id)
                if chat is not None:
                    publish_chat_row(chat)  # its count and last message
            except Exception as exc:  # noqa: BLE001 - the next snapshot shows the row
                log.warning("reply %s: chat row not published: %s", self.reply_id, exc)
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
