"""Notifications: rules that turn events into notifications for resolved recipients.

Domains declare, next to their handlers, which events notify whom:

    notification_rule(
        "escalation.triggered",
        type="escalation",
        recipients="tenant_admins",            # or "tenant_users", "actor", or fn(event) -> ids
        title=lambda e: "Negative sentiment in a chat",
        body=lambda e: e.payload.get("excerpt", ""),
        link=lambda e: f"/chats/{e.entity_id}",
        subject=lambda e: f"chat:{e.entity_id}",   # with type: the duplicate-suppression key
    )

The notifications handler (tasks/notifications.py) runs for every topic that has a rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from events.registry import Event

Recipients = str | Callable[[Event], Iterable[int]]


def _no_text(event: Event) -> str:
    return ""


def _default_subject(event: Event) -> str:
    return f"{event.entity or event.topic}:{event.entity_id or ''}"


@dataclass(frozen=True)
class NotificationRule:
    topic: str
    type: str
    recipients: Recipients
    title: Callable[[Event], str]
    body: Callable[[Event], str] = _no_text
    link: Callable[[Event], str] = _no_text
    subject: Callable[[Event], str] = _default_subject
    when: Callable[[Event], bool] | None = None


RULES: dict[str, list[NotificationRule]] = {}


def notification_rule(topic: str, **fields) -> NotificationRule:
    rule = NotificationRule(topic=topic, **fields)
    RULES.setdefault(topic, []).append(rule)
    return rule
