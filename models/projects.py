"""Projects domain: AI code-generation jobs, their files and exports."""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
    inspect,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship, validates

from extensions import db
from models.base import Timestamps, Tracked, UTCDateTime, tenant_fk, utcnow

GENERATION_STATUSES = ("pending", "generating", "completed", "failed", "archived")
# The only status changes a generation may make (services/projects.py enforces them in SQL).
TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"generating"}),
    "generating": frozenset({"completed", "failed"}),
    "completed": frozenset({"archived"}),
    "failed": frozenset(),
    "archived": frozenset(),
}


class InvalidTransition(ValueError):
    """Raised by the model itself for a status change the lifecycle forbids."""


EXPORT_FORMATS = ("zip", "git")
EXPORT_STATUSES = ("pending", "running", "completed", "failed")


class Project(Tracked, Timestamps, db.Model):
    __tablename__ = "projects"
    __entity__ = "project"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk()
    name: Mapped[str] = mapped_column(String(120))
    description: Mapped[str] = mapped_column(Text, default="")
    created_by_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )

    generations: Mapped[list[GeneratedProject]] = relationship(
        back_populates="project", cascade="all, delete-orphan", passive_deletes=True
    )


class GeneratedProject(Tracked, Timestamps, db.Model):
    __tablename__ = "generated_projects"
    __entity__ = "generated_project"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'generating', 'completed', 'failed', 'archived')",
            name="status_valid",
        ),
        CheckConstraint("total_files >= 0", name="total_files_nonnegative"),
        CheckConstraint("total_size >= 0", name="total_size_nonnegative"),
        Index("ix_generated_projects_project_created", "project_id", "created_at", "id"),
        Index("ix_generated_projects_tenant_status", "tenant_id", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk(index=False)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    prompt: Mapped[str] = mapped_column(Text)
    total_files: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    total_size: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    error: Mapped[Optional[str]] = mapped_column(Text)
    started_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    completed_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())

    project: Mapped[Project] = relationship(back_populates="generations")
    files: Mapped[list[ProjectFile]] = relationship(
        back_populates="generated_project", cascade="all, delete-orphan", passive_deletes=True
    )

    def feed_label(self) -> str:
        return f"Generation #{self.id} ({self.status})"

    @validates("status")
    def _check_status(self, key: str, new: str) -> str:
        old = self.status  # loaded even after expiry: Tracked keeps active history
        if new not in TRANSITIONS:
            raise InvalidTransition(f"{new!r} is not a generation status.")
        if old is None:
            if new != "pending":
                raise InvalidTransition("A generation starts as pending.")
        elif old != new and new not in TRANSITIONS[old]:
            raise InvalidTransition(f"A {old} generation cannot become {new}.")
        return new


class ProjectFile(Tracked, db.Model):
    __tablename__ = "project_files"
    __entity__ = "project_file"
    __event_exclude__ = frozenset({"content"})
    __table_args__ = (
        UniqueConstraint("generated_project_id", "path"),
        CheckConstraint("file_size >= 0", name="file_size_nonnegative"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk(index=False)
    generated_project_id: Mapped[int] = mapped_column(
        ForeignKey("generated_projects.id", ondelete="CASCADE")
    )
    path: Mapped[str] = mapped_column(String(500))
    content: Mapped[str] = mapped_column(Text, default="")
    file_size: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    generated_project: Mapped[GeneratedProject] = relationship(back_populates="files")


class RepositoryExport(Tracked, Timestamps, db.Model):
    __tablename__ = "repository_exports"
    __entity__ = "repository_export"
    __table_args__ = (
        CheckConstraint("format IN ('zip', 'git')", name="format_valid"),
        CheckConstraint(
            "status IN ('pending', 'running', 'completed', 'failed')", name="status_valid"
        ),
        Index("ix_repository_exports_generated_created", "generated_project_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = tenant_fk(index=False)
    generated_project_id: Mapped[int] = mapped_column(
        ForeignKey("generated_projects.id", ondelete="CASCADE")
    )
    format: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    artifact: Mapped[Optional[str]] = mapped_column(String(500))
    error: Mapped[Optional[str]] = mapped_column(Text)
    requested_by_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )

    def feed_label(self) -> str:
        return f"{self.format} export #{self.id} ({self.status})"


# ------------------------------------------------------------------ exact totals
# Whatever code path adds, removes or resizes a file, its generation's totals move in SQL
# (`SET total = total ± n`) inside the same transaction: exact under concurrency.


def _adjust_totals(connection, generated_id: int, files: int, size: int) -> None:
    table = GeneratedProject.__table__
    connection.execute(
        table.update()
        .where(table.c.id == generated_id)
        .values(total_files=table.c.total_files + files, total_size=table.c.total_size + size)
    )


@event.listens_for(ProjectFile, "after_insert")
def _file_inserted(mapper, connection, target: ProjectFile) -> None:
    _adjust_totals(connection, target.generated_project_id, 1, target.file_size or 0)


@event.listens_for(ProjectFile, "after_delete")
def _file_deleted(mapper, connection, target: ProjectFile) -> None:
    _adjust_totals(connection, target.generated_project_id, -1, -(target.file_size or 0))


@event.listens_for(ProjectFile, "after_update")
def _file_updated(mapper, connection, target: ProjectFile) -> None:
    history = inspect(target).attrs.file_size.history
    if history.deleted and history.added:
        delta = (history.added[0] or 0) - (history.deleted[0] or 0)
        _adjust_totals(connection, target.generated_project_id, 0, delta)


@event.listens_for(Session, "after_flush")
def _expire_totals(session: Session, flush_context) -> None:
    # The totals changed in SQL: loaded generations must re-read them.
    touched = {
        obj.generated_project_id
        for obj in (*session.new, *session.deleted, *session.dirty)
        if isinstance(obj, ProjectFile)
    }
    if touched:
        for obj in list(session.identity_map.values()):
            if isinstance(obj, GeneratedProject) and obj.id in touched:
                session.expire(obj, ["total_files", "total_size"])
