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
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship, validates
from sqlalchemy.orm.attributes import set_committed_value

from extensions import db
from models.base import Timestamps, Tracked, UTCDateTime, tenant_fk, utcnow

GENERATION_STATUSES = ("pending", "generating", "completed", "failed", "archived")
# The only status changes a generation may make. Every UPDATE that changes a status carries
# `AND status IN (allowed sources)`, whether it comes from services/projects.py or from an ORM
# assignment (the before_update guard below), so stale data can never decide it.
TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"generating", "failed"}),  # failed: cancelled before it started
    "generating": frozenset({"completed", "failed"}),
    "completed": frozenset({"archived"}),
    "failed": frozenset(),
    "archived": frozenset(),
}


class InvalidTransition(ValueError):
    """Raised by the model itself for a status change the lifecycle forbids."""


class TransitionError(InvalidTransition):
    """A status change the lifecycle does not allow from the row's current (stored) status."""


EXPORT_FORMATS = ("zip", "git")
EXPORT_STATUSES = ("pending", "running", "completed", "failed")
# An export's status changes, by target: the statuses it may come from. failed → pending is
# a retry.
EXPORT_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "pending": ("failed",),
    "running": ("pending",),
    "completed": ("running",),
    "failed": ("pending", "running"),
}


def generation_sources(target: str) -> list[str]:
    return [source for source, targets in TRANSITIONS.items() if target in targets]


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
    # before_delete deletes the row itself (to learn whether it was still there); the ORM's
    # own DELETE then finds nothing, which is expected, not a warning.
    __mapper_args__ = {"confirm_deleted_rows": False}

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


# ------------------------------------------------------------------ guarded status


def _guard_status(connection, table, target, sources: list[str] | tuple[str, ...]) -> str | None:
    """Move the stored row to the target's new status only from an allowed source status;
    the stored status that refused it, or None."""
    new = target.status
    result = connection.execute(
        table.update()
        .where(table.c.id == target.id, table.c.status.in_(sources))
        .values(status=new)
    )
    if result.rowcount == 1:
        return None
    return connection.scalar(select(table.c.status).where(table.c.id == target.id)) or "gone"


@event.listens_for(GeneratedProject, "before_update")
def _generation_status_guard(mapper, connection, target: GeneratedProject) -> None:
    if not inspect(target).attrs.status.history.has_changes():
        return
    stored = _guard_status(
        connection, GeneratedProject.__table__, target, generation_sources(target.status)
    )
    if stored is not None:
        raise TransitionError(
            f"Generation #{target.id} is {stored}; it cannot become {target.status}."
        )


@event.listens_for(RepositoryExport, "before_update")
def _export_status_guard(mapper, connection, target: RepositoryExport) -> None:
    if not inspect(target).attrs.status.history.has_changes():
        return
    stored = _guard_status(
        connection,
        RepositoryExport.__table__,
        target,
        EXPORT_TRANSITIONS.get(target.status, ()),
    )
    if stored is not None:
        raise TransitionError(f"Export #{target.id} is {stored}; it cannot become {target.status}.")


# ------------------------------------------------------------------ exact totals
# Whatever code path adds, removes or resizes a file, its generation's totals move in SQL
# (`SET total = total ± n`) inside the same transaction, by what the database itself reports:
# the size of a row this statement inserted, the stored size of a row it locked before
# resizing it, the rows a DELETE actually removed. A file's size is always its content's.


def content_size(content: str | None) -> int:
    return len((content or "").encode("utf-8", "surrogatepass"))


def _adjust_totals(connection, generated_id: int, files: int, size: int) -> None:
    if not files and not size:
        return
    table = GeneratedProject.__table__
    connection.execute(
        table.update()
        .where(table.c.id == generated_id)
        .values(total_files=table.c.total_files + files, total_size=table.c.total_size + size)
    )


@event.listens_for(ProjectFile, "before_insert")
def _size_new_file(mapper, connection, target: ProjectFile) -> None:
    target.file_size = content_size(target.content)


@event.listens_for(ProjectFile, "after_insert")
def _file_inserted(mapper, connection, target: ProjectFile) -> None:
    _adjust_totals(connection, target.generated_project_id, 1, target.file_size)


@event.listens_for(ProjectFile, "before_update")
def _file_resized(mapper, connection, target: ProjectFile) -> None:
    attrs = inspect(target).attrs
    if not attrs.content.history.has_changes():
        if attrs.file_size.history.has_changes():
            # A size without new content is nobody's to set: keep the stored one.
            loaded = attrs.file_size.history.deleted
            set_committed_value(target, "file_size", loaded[0] if loaded else None)
        return
    new_size = content_size(target.content)
    target.file_size = new_size
    table = ProjectFile.__table__
    # A no-op UPDATE locks the row and reads its size as stored now (after any concurrent
    # writer of this file committed), not as this session last saw it.
    stored = connection.execute(
        table.update()
        .where(table.c.id == target.id)
        .values(file_size=table.c.file_size)
        .returning(table.c.file_size, table.c.generated_project_id)
    ).first()
    if stored is not None:  # else the ORM's UPDATE finds no row and raises StaleDataError
        _adjust_totals(connection, stored.generated_project_id, 0, new_size - stored.file_size)


@event.listens_for(ProjectFile, "before_delete")
def _file_deleted(mapper, connection, target: ProjectFile) -> None:
    table = ProjectFile.__table__
    removed = connection.execute(
        table.delete()
        .where(table.c.id == target.id)
        .returning(table.c.file_size, table.c.generated_project_id)
    ).first()
    if removed is not None:  # another session may have deleted it first
        _adjust_totals(connection, removed.generated_project_id, -1, -removed.file_size)


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
