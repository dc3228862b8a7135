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
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from extensions import db
from models.base import Timestamps, Tracked, UTCDateTime, tenant_fk, utcnow

GENERATION_STATUSES = ("pending", "generating", "completed", "failed", "archived")
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
