"""Typed SQLAlchemy 2 models, one module per domain. Importing this package registers them all."""

from models import metrics, webhooks  # noqa: F401 - register their tables
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
from models.notifications import Notification
from models.projects import GeneratedProject, Project, ProjectFile, RepositoryExport

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
    "Notification",
    "OutboxEvent",
    "ProcessedEvent",
    "Project",
    "ProjectFile",
    "RepositoryExport",
    "ServiceSyncLog",
    "Tenant",
    "User",
]
