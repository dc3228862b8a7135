"""Projects: the generation lifecycle, exact file totals and safe paths.

Lifecycle: pending → generating → completed | failed, completed → archived. A transition is
one guarded UPDATE (`… WHERE id = :id AND status IN (:allowed sources)`) whose row count
decides the winner, so two concurrent transitions from the same state can never both win,
on SQLite and PostgreSQL alike. The ORM refuses any other status assignment too
(models/projects.py validates it), whichever code path tries.

Totals: every ProjectFile insert, delete or size change adjusts its GeneratedProject's
total_files / total_size with `SET total = total ± n` in the same transaction (mapper events
in models/projects.py) — never read-add-write in Python; `recount` repairs drift.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from sqlalchemy import func, select, update

from events import emit
from extensions import db
from models.base import utcnow
from models.projects import TRANSITIONS, GeneratedProject, Project, ProjectFile

MAX_PATH_LENGTH = 255


class TransitionError(ValueError):
    """A status change the lifecycle does not allow (or that lost a race)."""


class PathError(ValueError):
    """A generated file path that would escape the project or break a limit."""


EVENT_FOR_STATUS = {
    "generating": "project.generation_started",
    "completed": "project.generation_completed",
    "failed": "project.generation_failed",
    "archived": "project.archived",
}


def transition(generated_id: int, to: str, *, error: str | None = None) -> GeneratedProject:
    """Move a generation to `to` if the lifecycle allows it from its current state."""
    sources = [src for src, targets in TRANSITIONS.items() if to in targets]
    if not sources:
        raise TransitionError(f"Nothing can move to {to!r}.")
    values: dict = {"status": to, "updated_at": utcnow()}
    if to == "generating":
        values["started_at"] = utcnow()
    if to in ("completed", "failed"):
        values["completed_at"] = utcnow()
    if to == "failed":
        values["error"] = (error or "Generation failed.")[:4000]
    result = db.session.execute(
        update(GeneratedProject)
        .where(GeneratedProject.id == generated_id, GeneratedProject.status.in_(sources))
        .values(**values),
        execution_options={"synchronize_session": False},
    )
    generated = db.session.get(GeneratedProject, generated_id)
    if generated is None:
        raise TransitionError("No such generation.")
    db.session.refresh(generated)
    if result.rowcount != 1:
        raise TransitionError(
            f"Generation #{generated_id} is {generated.status}; it cannot become {to}."
        )
    payload = {
        "label": f"Generation #{generated.id} {to}",
        "project_id": generated.project_id,
        "status": to,
    }
    if to == "failed":
        payload["error"] = values["error"]
    if to == "completed":
        payload.update(total_files=generated.total_files, total_size=generated.total_size)
    emit(
        EVENT_FOR_STATUS[to],
        tenant_id=generated.tenant_id,
        entity="generated_project",
        entity_id=generated.id,
        payload=payload,
    )
    return generated


def start_generation(project: Project, prompt: str) -> GeneratedProject:
    prompt = (prompt or "").strip()
    if not prompt:
        raise ValueError("Describe the project to generate.")
    if len(prompt) > 4000:
        raise ValueError("A prompt can be at most 4000 characters.")
    generated = GeneratedProject(
        tenant_id=project.tenant_id, project_id=project.id, prompt=prompt, status="pending"
    )
    db.session.add(generated)
    db.session.flush()
    return generated


def clean_path(raw: str) -> str:
    """A relative POSIX path inside the project, or PathError."""
    if not isinstance(raw, str) or not raw.strip():
        raise PathError("A file needs a path.")
    path = raw.strip().replace("\\", "/")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise PathError(f"{raw!r} is absolute; paths must be relative to the project.")
    if any(part == ".." for part in path.split("/")):
        raise PathError(f"{raw!r} leaves the project (..).")
    if any(ord(c) < 32 for c in path):
        raise PathError(f"{raw!r} contains control characters.")
    normal = posixpath.normpath(path)
    if normal in (".", "") or normal.startswith("../"):
        raise PathError(f"{raw!r} is not a file inside the project.")
    if len(normal) > MAX_PATH_LENGTH:
        raise PathError(f"{raw[:40]!r}… is longer than {MAX_PATH_LENGTH} characters.")
    return normal


@dataclass(frozen=True)
class FileSpec:
    path: str
    content: str


def validate_files(
    files: list[dict], *, max_files: int, max_file_bytes: int, max_total_bytes: int
) -> list[FileSpec]:
    """Check every path and limit before anything is stored."""
    if not isinstance(files, list) or not files:
        raise PathError("The generator returned no files.")
    if len(files) > max_files:
        raise PathError(f"{len(files)} files is more than the limit of {max_files}.")
    seen: set[str] = set()
    specs: list[FileSpec] = []
    total = 0
    for item in files:
        if not isinstance(item, dict):
            raise PathError("Each file must have a path and content.")
        path = clean_path(item.get("path", ""))
        content = item.get("content")
        if not isinstance(content, str):
            raise PathError(f"{path}: content must be text.")
        size = len(content.encode())
        if size > max_file_bytes:
            raise PathError(f"{path} is {size} bytes; the limit is {max_file_bytes}.")
        if path in seen:
            raise PathError(f"{path} appears twice.")
        seen.add(path)
        total += size
        specs.append(FileSpec(path, content))
    if total > max_total_bytes:
        raise PathError(f"The files total {total} bytes; the limit is {max_total_bytes}.")
    return specs


def add_file(generated: GeneratedProject, path: str, content: str) -> ProjectFile:
    file = ProjectFile(
        tenant_id=generated.tenant_id,
        generated_project_id=generated.id,
        path=clean_path(path),
        content=content,
        file_size=len(content.encode()),
    )
    db.session.add(file)
    db.session.flush()
    return file


@dataclass
class RecountFix:
    generated_id: int
    files: tuple[int, int]  # (recorded, actual)
    size: tuple[int, int]


def recount(fix: bool = True) -> list[RecountFix]:
    """Compare stored totals with the files; repair drift (in SQL) when asked."""
    actual = {
        row.generated_project_id: (row.n, row.size)
        for row in db.session.execute(
            select(
                ProjectFile.generated_project_id,
                func.count().label("n"),
                func.coalesce(func.sum(ProjectFile.file_size), 0).label("size"),
            ).group_by(ProjectFile.generated_project_id)
        )
    }
    fixes = []
    for gid, files, size in db.session.execute(
        select(GeneratedProject.id, GeneratedProject.total_files, GeneratedProject.total_size)
    ):
        n, s = actual.get(gid, (0, 0))
        if (files, size) != (n, s):
            fixes.append(RecountFix(gid, (files, n), (size, s)))
            if fix:
                db.session.execute(
                    update(GeneratedProject)
                    .where(GeneratedProject.id == gid)
                    .values(total_files=n, total_size=s),
                    execution_options={"synchronize_session": False},
                )
    return fixes


def generation_panel(generated: GeneratedProject) -> dict:
    """What the project page shows of one generation: its file tree and export history."""
    from models.projects import RepositoryExport
    from services.file_tree import build_tree

    files = db.session.scalars(
        select(ProjectFile)
        .where(ProjectFile.generated_project_id == generated.id)
        .order_by(ProjectFile.path)
    ).all()
    export_rows = db.session.scalars(
        select(RepositoryExport)
        .where(RepositoryExport.generated_project_id == generated.id)
        .order_by(RepositoryExport.id.desc())
    ).all()
    return {"g": generated, "tree": build_tree(files), "exports": export_rows}


def project_generations(project: Project) -> list[dict]:
    rows = db.session.scalars(
        select(GeneratedProject)
        .where(
            GeneratedProject.project_id == project.id,
            GeneratedProject.tenant_id == project.tenant_id,
        )
        .order_by(GeneratedProject.id.desc())
    ).all()
    return [generation_panel(g) for g in rows]
