"""Repository exports: a zip of the files, or a real git repository (one commit) as a bundle."""

from __future__ import annotations

import os
import subprocess
import tempfile
import zipfile
from pathlib import Path

from flask import current_app
from sqlalchemy import select, update

from events import emit
from extensions import db
from models.base import utcnow
from models.projects import GeneratedProject, ProjectFile, RepositoryExport

EXPORT_TRANSITIONS = {
    "running": ("pending",),
    "completed": ("running",),
    "failed": ("pending", "running"),
}


class ExportError(RuntimeError):
    pass


def exports_dir() -> Path:
    path = Path(
        current_app.config.get("EXPORTS_DIR") or Path(current_app.instance_path) / "exports"
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


def request_export(generated: GeneratedProject, fmt: str, user_id: int | None) -> RepositoryExport:
    if fmt not in ("zip", "git"):
        raise ExportError("Export as zip or git.")
    if generated.status not in ("completed", "archived"):
        raise ExportError(f"Generation #{generated.id} is {generated.status}; nothing to export.")
    export = RepositoryExport(
        tenant_id=generated.tenant_id,
        generated_project_id=generated.id,
        format=fmt,
        status="pending",
        requested_by_id=user_id,
    )
    db.session.add(export)
    db.session.flush()
    return export


def set_status(export_id: int, to: str, *, artifact: str | None = None, error: str | None = None):
    values: dict = {"status": to, "updated_at": utcnow()}
    if artifact:
        values["artifact"] = artifact
    if error:
        values["error"] = error[:4000]
    result = db.session.execute(
        update(RepositoryExport)
        .where(
            RepositoryExport.id == export_id, RepositoryExport.status.in_(EXPORT_TRANSITIONS[to])
        )
        .values(**values),
        execution_options={"synchronize_session": False},
    )
    export = db.session.get(RepositoryExport, export_id)
    db.session.refresh(export)
    if result.rowcount != 1:
        raise ExportError(f"Export #{export_id} is {export.status}; it cannot become {to}.")
    if to in ("completed", "failed"):
        generated = db.session.get(GeneratedProject, export.generated_project_id)
        payload = {
            "label": f"{export.format} export #{export.id} {to}",
            "project_id": generated.project_id if generated else None,
            "format": export.format,
        }
        if error:
            payload["error"] = error[:500]
        emit(
            f"project.export_{to}",
            tenant_id=export.tenant_id,
            entity="repository_export",
            entity_id=export.id,
            payload=payload,
        )
    return export


def _files(generated_id: int) -> list[ProjectFile]:
    return db.session.scalars(
        select(ProjectFile)
        .where(ProjectFile.generated_project_id == generated_id)
        .order_by(ProjectFile.path)
    ).all()


def build_zip(generated_id: int, target: Path) -> None:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in _files(generated_id):
            archive.writestr(file.path, file.content)


def build_git_bundle(generated_id: int, target: Path, message: str) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "Switchboard",
        "GIT_AUTHOR_EMAIL": "switchboard@localhost",
        "GIT_COMMITTER_NAME": "Switchboard",
        "GIT_COMMITTER_EMAIL": "switchboard@localhost",
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": tempfile.gettempdir(),
    }
    with tempfile.TemporaryDirectory(prefix="sb-export-") as tmp:
        root = Path(tmp)
        for file in _files(generated_id):
            path = root / file.path
            if root.resolve() not in path.resolve().parents:
                raise ExportError(f"{file.path} would leave the repository.")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(file.content)

        def git(*args: str) -> None:
            done = subprocess.run(
                ["git", *args], cwd=root, env=env, capture_output=True, text=True, timeout=60
            )
            if done.returncode != 0:
                raise ExportError(f"git {args[0]} failed: {done.stderr.strip()[:300]}")

        git("init", "-q", "-b", "main")
        git("add", "-A")
        git("commit", "-q", "-m", message)
        git("bundle", "create", str(target), "HEAD", "main")


def build(export_id: int) -> RepositoryExport:
    """Run one export: pending → running → completed | failed."""
    export = set_status(export_id, "running")
    db.session.commit()
    generated = db.session.get(GeneratedProject, export.generated_project_id)
    suffix = "zip" if export.format == "zip" else "bundle"
    target = exports_dir() / f"export-{export.id}.{suffix}"
    try:
        if export.format == "zip":
            build_zip(generated.id, target)
        else:
            build_git_bundle(generated.id, target, f"Generated project: {generated.prompt[:60]}")
    except (ExportError, OSError, subprocess.SubprocessError) as exc:
        db.session.rollback()
        target.unlink(missing_ok=True)
        export = set_status(export_id, "failed", error=str(exc))
        db.session.commit()
        return export
    export = set_status(export_id, "completed", artifact=target.name)
    db.session.commit()
    return export
