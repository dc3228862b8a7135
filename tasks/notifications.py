"""Notification tasks. The delivery handler itself is registered by services.notifications
as soon as a domain declares a rule; this module adds the email task and the rules of the
spine's own concerns."""

from __future__ import annotations

from events.registry import task
from services.notifications import email_notification


@task(name="notifications.email", queue="notifications", max_retries=5, min_backoff_ms=2_000)
def send_notification_email(notification_id: int) -> None:
    email_notification(notification_id)
