"""Notifications: rules that turn events into notifications for resolved recipients.

Domains declare, next to their handlers, which events notify whom:

    notification_rule(
        "escalation.triggered",
        type="escalation",
        recipients=escalation_recipients,      # or "tenant_admins", "tenant_users", "actor"
        title=lambda e: "Negative sentiment in a chat",
        body=lambda e: e.payload.get("excerpt", ""),
        link=lambda e: f"/chats/{e.entity_id}",
        subject=lambda e: f"chat:{e.entity_id}",   # with type: the duplicate-suppression key
    )

Declaring a rule subscribes the one notifications handler to its topic. For each event the
handler resolves the recipients (always inside the event's tenant), honours each user's
preferences, suppresses duplicates of the same (type, subject) within NOTIFY_DEDUPE_SECONDS,
pushes the new unread count to the user's bell and sends email when SMTP_URL is set.
"""

from __future__ import annotations

import hashlib
import logging
import smtplib
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

from flask import current_app
from sqlalchemy import func, select, text, update

from events.registry import Event, HandlerSpec, registry
from extensions import db
from models.base import utcnow
from services.kv import kv

log = logging.getLogger(__name__)

Recipients = str | Callable[[Event], Iterable[int]]
HANDLER_NAME = "notifications.deliver"


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
# Human names of the types, for the preferences page.
TYPE_LABELS: dict[str, str] = {}


def notification_rule(topic: str, *, label: str | None = None, **fields) -> NotificationRule:
    rule = NotificationRule(topic=topic, **fields)
    RULES.setdefault(topic, []).append(rule)
    TYPE_LABELS.setdefault(rule.type, label or rule.type.replace("_", " ").capitalize())
    registry.add_handler(
        HandlerSpec(
            name=HANDLER_NAME,
            fn=deliver_event,
            topics=tuple(RULES),
            queue="notifications",
            max_retries=5,
        )
    )
    return rule


# ---------------------------------------------------------------- delivery


def _recipient_ids(rule: NotificationRule, event: Event) -> list[int]:
    from models.accounts import User

    if event.tenant_id is None:
        return []
    who = rule.recipients
    stmt = select(User.id).where(User.tenant_id == event.tenant_id, User.is_active_user.is_(True))
    if callable(who):
        wanted = {int(i) for i in who(event)}
        if not wanted:
            return []
        stmt = stmt.where(User.id.in_(wanted))  # never outside the event's tenant
    elif who == "tenant_admins":
        stmt = stmt.where(User.role == "admin")
    elif who == "actor":
        if event.actor_user_id is None:
            return []
        stmt = stmt.where(User.id == event.actor_user_id)
    elif who != "tenant_users":
        raise ValueError(f"unknown recipients {who!r}")
    return list(db.session.scalars(stmt.order_by(User.id)))


def preferences_for(user_id: int) -> dict[str, tuple[bool, bool]]:
    """type → (in_app, email) for the types this user changed from the defaults."""
    from models.notifications import NotificationPreference

    rows = db.session.scalars(
        select(NotificationPreference).where(NotificationPreference.user_id == user_id)
    )
    return {row.type: (row.in_app, row.email) for row in rows}


def _lock_duplicates(recipient_id: int, kind: str, subject: str) -> None:
    """Serialise concurrent deliveries of one (recipient, type, subject) on PostgreSQL.

    The lock lasts until the handler's transaction ends, so a second worker checking for a
    duplicate sees the first one's notification. SQLite allows one writer at a time anyway."""
    if db.session.get_bind().dialect.name != "postgresql":
        return
    digest = hashlib.blake2b(f"{recipient_id}|{kind}|{subject}".encode(), digest_size=8).digest()
    key = int.from_bytes(digest, "big", signed=True)
    db.session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def _is_duplicate(recipient_id: int, kind: str, subject: str) -> bool:
    from models.notifications import Notification

    window = current_app.config["NOTIFY_DEDUPE_SECONDS"]
    if window <= 0:
        return False
    since = utcnow() - timedelta(seconds=window)
    found = db.session.scalar(
        select(Notification.id)
        .where(
            Notification.recipient_id == recipient_id,
            Notification.type == kind,
            Notification.subject == subject,
            Notification.created_at >= since,
        )
        .limit(1)
    )
    return found is not None


def deliver_event(event: Event) -> None:
    """The notifications handler: one notification per rule and recipient, at most."""
    from models.notifications import Notification

    for rule in RULES.get(event.topic, ()):
        if rule.when is not None and not rule.when(event):
            continue
        subject = (rule.subject(event) or "")[:120]
        for user_id in _recipient_ids(rule, event):
            in_app, email = preferences_for(user_id).get(rule.type, (True, True))
            if not in_app and not email:
                continue
            _lock_duplicates(user_id, rule.type, subject)
            if _is_duplicate(user_id, rule.type, subject):
                continue
            note = Notification(
                tenant_id=event.tenant_id,
                recipient_id=user_id,
                type=rule.type,
                subject=subject,
                title=(rule.title(event) or rule.type)[:200],
                body=(rule.body(event) or "")[:4000],
                link=(rule.link(event) or "")[:500],
                created_at=utcnow(),
                # Email-only preference: kept for the record and the dedupe window, not shown
                # as unread in the app.
                read_at=None if in_app else utcnow(),
            )
            db.session.add(note)
            db.session.flush()
            publish_row_after_commit(note)
            if in_app:
                publish_bell_after_commit(event.tenant_id, user_id)
            if email and current_app.config.get("SMTP_URL"):
                from events.outbox import enqueue

                # In the handler's transaction: the email goes out if and only if the
                # notification is recorded, even when Redis is down at its commit.
                enqueue("notifications.email", note.id)


def publish_row_after_commit(note) -> None:
    """The new row, prepended to its recipient's open notifications list (their own topic:
    no one else's socket gets it)."""
    from services.live import publish_after_commit, render_fragment, user_topic

    html = render_fragment("notifications/_push.html", n=note, type_labels=TYPE_LABELS)
    topic = user_topic(note.tenant_id, note.recipient_id, "notifications")
    publish_after_commit(topic, f"notification-{note.id}", html=html)


# ---------------------------------------------------------------- the bell


def unread_count(user_id: int, *, connection=None) -> int:
    from models.notifications import Notification

    stmt = (
        select(func.count())
        .select_from(Notification)
        .where(Notification.recipient_id == user_id, Notification.read_at.is_(None))
    )
    if connection is not None:
        return int(connection.execute(stmt).scalar_one())
    return int(db.session.scalar(stmt))


def publish_bell_after_commit(tenant_id: int, user_id: int) -> None:
    """After commit, push the user's fresh unread count to every page they have open.

    The count is read after the commit (on its own connection), so concurrent deliveries
    never leave a stale number on the bell."""
    from events.outbox import on_commit
    from services.live import publish, render_fragment, user_topic

    app = current_app._get_current_object()

    def _push() -> None:
        with app.app_context():
            with db.engine.connect() as connection:
                count = unread_count(user_id, connection=connection)
            html = render_fragment("notifications/_bell.html", unread=count, oob=True)
            publish(user_topic(tenant_id, user_id, "bell"), "bell", html=html)

    on_commit(_push)


def mark_read(user, notification_ids: Iterable[int] | None = None) -> int:
    """Mark the user's notifications read (all unread ones when ids is None)."""
    from models.notifications import Notification

    stmt = update(Notification).where(
        Notification.recipient_id == user.id,
        Notification.tenant_id == user.tenant_id,
        Notification.read_at.is_(None),
    )
    if notification_ids is not None:
        stmt = stmt.where(Notification.id.in_(list(notification_ids)))
    changed = db.session.execute(stmt.values(read_at=utcnow())).rowcount or 0
    publish_bell_after_commit(user.tenant_id, user.id)
    return changed


# ---------------------------------------------------------------- email


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    username: str | None
    password: str | None
    use_ssl: bool
    starttls: bool

    @classmethod
    def from_url(cls, url: str) -> SmtpSettings:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("SMTP_URL must look like smtp://user:pass@host:port")
        query = parse_qs(parts.query)
        starttls = (query.get("starttls") or ["0"])[0].lower() in ("1", "true", "yes")
        use_ssl = parts.scheme == "smtps"
        return cls(
            host=parts.hostname,
            port=parts.port or (465 if use_ssl else 25),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            use_ssl=use_ssl,
            starttls=starttls,
        )


def send_email(to: str, subject: str, body: str) -> None:
    config = current_app.config
    settings = SmtpSettings.from_url(config["SMTP_URL"])
    message = EmailMessage()
    message["From"] = config["MAIL_FROM"]
    message["To"] = to
    message["Subject"] = subject.replace("\n", " ")[:200]
    message.set_content(body)
    timeout = 15
    if settings.use_ssl:
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(
            settings.host, settings.port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        smtp = smtplib.SMTP(settings.host, settings.port, timeout=timeout)
    with smtp:
        if settings.starttls:
            smtp.starttls(context=ssl.create_default_context())
        if settings.username:
            smtp.login(settings.username, settings.password or "")
        smtp.send_message(message)


def email_notification(notification_id: int) -> bool:
    """Send one notification by email; False when there is nothing to send."""
    from models.accounts import User
    from models.notifications import Notification

    if not current_app.config.get("SMTP_URL"):
        return False
    note = db.session.get(Notification, notification_id)
    if note is None:
        return False
    user = db.session.get(User, note.recipient_id)
    if user is None or not user.is_active_user:
        return False
    # A job can be delivered twice (at-least-once): the flag set after a send keeps a
    # redelivery from mailing the same notification again.
    sent_key = f"notification-emailed:{note.id}"
    if kv().has_flag(sent_key):
        return False
    link = urljoin(current_app.config["PUBLIC_URL"], note.link) if note.link else ""
    body = "\n\n".join(part for part in (note.body, link) if part)
    send_email(user.email, f"[Switchboard] {note.title}", body or note.title)
    kv().set_flag(sent_key, ttl=EMAILED_FLAG_SECONDS)
    return True


# Longer than any redelivery of an email job can come (the job's own retries and the relay's
# window for it take minutes, not days).
EMAILED_FLAG_SECONDS = 7 * 24 * 3600.0
