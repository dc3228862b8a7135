"""Typed SQLAlchemy 2 models, one module per domain. Importing this package registers them all."""

from models.accounts import Tenant, User
from models.audit import AuditLog
from models.chats import Agent, Chat, Message
from models.devices import (
    ActivityLog,
    Device,
    DeviceEndpoint,
    DeviceReading,
    Location,
    Manufacturer,
    ServiceSyncLog,
)
from models.events import OutboxEvent, ProcessedEvent
from models.metrics import MetricCounter
from models.notifications import Notification, NotificationPreference
from models.projects import GeneratedProject, Project, ProjectFile, RepositoryExport
from models.webhooks import WebhookDelivery, WebhookEndpoint

__all__ = [
    "ActivityLog",
    "Agent",
    "AuditLog",
    "Chat",
    "Device",
    "DeviceEndpoint",
    "DeviceReading",
    "GeneratedProject",
    "Location",
    "Manufacturer",
    "Message",
    "MetricCounter",
    "Notification",
    "NotificationPreference",
    "OutboxEvent",
    "ProcessedEvent",
    "Project",
    "ProjectFile",
    "RepositoryExport",
    "ServiceSyncLog",
    "Tenant",
    "User",
    "WebhookDelivery",
    "WebhookEndpoint",
]
