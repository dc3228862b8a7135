"""Projects: the generation lifecycle, exact file totals and safe paths.

Lifecycle: pending → generating → completed | failed, completed → archived. A transition is
one guarded UPDATE (`… WHERE id = :id AND status IN (:allowed sources)`) whose row count
decides the winner, so two concurrent transitions from the same state can never both win,
on SQLite and PostgreSQL alike. The ORM refuses any other status assignment too
(models/projects.py validates it), whichever code path tries.

Totals: every ProjectFile insert, delete or size change adjusts its GeneratedProject's
total_files / total_size with `SET total = total ± n` in the same transaction (mapper events
in models/projects.py) — never read-add-write in Python; `recount` repairs drift.

Nothing stays `generating`: a run has a deadline (services/generator.py), users can cancel a
pending or generating generation and retry a failed one, and `sweep_stale` ends what a dead
worker left behind.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from datetime import timedelta

from flask import current_app
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from events import emit
from extensions import db
from models.base import utcnow
from models.projects import (
    GeneratedProject,
    Project,
    ProjectFile,
    TransitionError,
    content_size,
    generation_sources,
)

MAX_PATH_LENGTH = 255


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
    sources = generation_sources(to)
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


class ProjectNameTaken(ValueError):
    pass


def create_project(
    tenant_id: int, name: str, description: str = "", created_by_id: int | None = None
) -> Project:
    name = (name or "").strip()
    if not name or len(name) > 120:
        raise ValueError("A project needs a name (at most 120 characters).")
    project = Project(
        tenant_id=tenant_id,
        name=name,
        description=(description or "").strip(),
        created_by_id=created_by_id,
    )
    try:
        with db.session.begin_nested():
            db.session.add(project)
    except IntegrityError as exc:
        raise ProjectNameTaken(f"A project named {name!r} already exists.") from exc
    return project


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


# Characters HFS+ ignores in names, so ".g\u200cit" is ".git" on a Mac (git's own list).
_HFS_IGNORED = dict.fromkeys(
    [0x200C, 0x200D, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x206A, 0x2070), 0xFEFF]
)


def is_git_name(part: str) -> bool:
    """Whether a path component names git's own directory on some filesystem: any case,
    Windows' trailing dots and spaces, its 8.3 short name and stream suffix, and the
    characters macOS ignores. Such a component would let a file become repository config."""
    name = part.split(":", 1)[0].translate(_HFS_IGNORED).lower().rstrip(". ")
    return name in (".git", "git~1")


def clean_path(raw: str) -> str:
    """A relative POSIX path inside the project, or PathError."""
    if not isinstance(raw, str) or not raw.strip():
        raise PathError("A file needs a path.")
    path = raw.strip().replace("\\", "/")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise PathError(f"{raw!r} is absolute; paths must be relative to the project.")
    if any(part == ".." for part in path.split("/")):
        raise PathError(f"{raw!r} leaves the project (..).")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise PathError(f"{raw!r} contains control characters.")
    if not _is_text(path):
        raise PathError(f"{raw!r} is not valid text (UTF-8).")
    normal = posixpath.normpath(path)
    if normal in (".", "") or normal.startswith("../"):
        raise PathError(f"{raw!r} is not a file inside the project.")
    if len(normal) > MAX_PATH_LENGTH:
        raise PathError(f"{raw[:40]!r}… is longer than {MAX_PATH_LENGTH} characters.")
    if any(is_git_name(part) for part in normal.split("/")):
        raise PathError(
            f"{raw!r} is inside a .git folder (or is one); generated files may not contain "
            "git's own configuration, hooks or repository links."
        )
    return normal


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a JSON answer
        return False
    return True


def check_layout(paths: list[str]) -> None:
    """Clean, distinct paths that a file system and git can hold at once: no path may be
    both a file and a folder (`a` and `a/b`)."""
    files = set()
    for path in paths:
        if clean_path(path) != path:
            raise PathError(f"{path!r} is not a clean relative path.")
        if path in files:
            raise PathError(f"{path} appears twice.")
        files.add(path)
    for path in paths:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder in files:
                raise PathError(
                    f"{folder!r} is both a file and a folder (it holds {path!r}); "
                    "rename one of them."
                )


def check_content(path: str, content: object) -> int:
    """The size in bytes of a file's content if it is storable text, else PathError."""
    if not isinstance(content, str):
        raise PathError(f"{path}: content must be text.")
    if not _is_text(content):
        raise PathError(f"{path}: content is not valid text (UTF-8).")
    if "\x00" in content:
        # PostgreSQL cannot store NUL in text, and a project's files are text.
        raise PathError(f"{path}: content contains a NUL character; binary files are refused.")
    return len(content.encode())


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
    specs: list[FileSpec] = []
    total = 0
    for item in files:
        if not isinstance(item, dict):
            raise PathError("Each file must have a path and content.")
        path = clean_path(item.get("path", ""))
        content = item.get("content")
        size = check_content(path, content)
        if size > max_file_bytes:
            raise PathError(f"{path} is {size} bytes; the limit is {max_file_bytes}.")
        total += size
        specs.append(FileSpec(path, content))
    check_layout([spec.path for spec in specs])
    if total > max_total_bytes:
        raise PathError(f"The files total {total} bytes; the limit is {max_total_bytes}.")
    return specs


def add_file(generated: GeneratedProject, path: str, content: str) -> ProjectFile:
    file = ProjectFile(
        tenant_id=generated.tenant_id,
        generated_project_id=generated.id,
        path=clean_path(path),
        content=content,
        file_size=content_size(content),
    )
    db.session.add(file)
    db.session.flush()
    return file


def store_file_if_generating(generated: GeneratedProject, path: str, content: str) -> bool:
    """Add a file only while the generation is still `generating`; False once it was
    cancelled or swept. The guarded UPDATE holds the generation's row (PostgreSQL) or the
    database's write lock (SQLite) until the caller commits, so a cancel that commits first
    is seen, and one that comes later also removes this file."""
    still_generating = db.session.execute(
        update(GeneratedProject)
        .where(GeneratedProject.id == generated.id, GeneratedProject.status == "generating")
        .values(updated_at=utcnow()),
        execution_options={"synchronize_session": False},
    ).rowcount
    if still_generating != 1:
        return False
    add_file(generated, path, content)
    return True


def delete_files(generated_id: int) -> None:
    """Remove a generation's files (a failed generation keeps no half of them)."""
    for file in db.session.scalars(
        select(ProjectFile).where(ProjectFile.generated_project_id == generated_id)
    ):
        db.session.delete(file)
    db.session.flush()


def fail_generation(generated_id: int, reason: str) -> GeneratedProject:
    """End a pending or generating generation as failed, without its files."""
    generated = transition(generated_id, "failed", error=reason)
    delete_files(generated_id)
    return generated


def cancel_generation(generated_id: int, by: str) -> GeneratedProject:
    """Cancel a pending or generating generation; a worker still running it stops before
    its next file (store_file_if_generating)."""
    try:
        return fail_generation(generated_id, f"Cancelled by {by}.")
    except TransitionError as exc:
        generated = db.session.get(GeneratedProject, generated_id)
        status = generated.status if generated else "gone"
        raise TransitionError(
            f"Generation #{generated_id} is {status}: it cannot be cancelled (only a pending "
            "or generating generation can)."
        ) from exc


def retry_generation(generated_id: int) -> GeneratedProject:
    """A new pending generation with the prompt of a failed one (which stays as it was)."""
    failed = db.session.get(GeneratedProject, generated_id)
    if failed is None:
        raise TransitionError("No such generation.")
    if failed.status != "failed":
        raise TransitionError(
            f"Generation #{failed.id} is {failed.status}; only a failed generation can be retried."
        )
    return start_generation(db.session.get(Project, failed.project_id), failed.prompt)


def stale_after() -> timedelta:
    cfg = current_app.config
    seconds = cfg.get("PROJECT_STALE_AFTER_SECONDS") or 2 * cfg["PROJECT_GENERATION_TIMEOUT"]
    return timedelta(seconds=float(seconds))


def stale_reason(age: timedelta) -> str:
    return (
        f"Stopped: no progress for more than {int(age.total_seconds())} s "
        "(the worker running it may have died)."
    )


def sweep_stale_generations() -> list[int]:
    """Fail every generation that has been `generating` for longer than
    PROJECT_STALE_AFTER_SECONDS. Each is its own guarded transition, so one that finishes
    meanwhile keeps its result."""
    age = stale_after()
    candidates = db.session.scalars(
        select(GeneratedProject.id).where(
            GeneratedProject.status == "generating",
            GeneratedProject.started_at < utcnow() - age,
        )
    ).all()
    swept = []
    for generated_id in candidates:
        try:
            fail_generation(generated_id, stale_reason(age))
        except TransitionError:
            continue
        swept.append(generated_id)
    return swept


@dataclass
class RecountFix:
    generated_id: int
    files: tuple[int, int]  # (recorded, actual)
    size: tuple[int, int]


def recount(fix: bool = True) -> list[RecountFix]:
    """Compare stored totals with the files; repair drift (in SQL) when asked.

    Each generation's row is locked first, then its files are counted by a later statement:
    a writer that changed the totals before the lock has committed and is counted; one that
    comes after adds its own ± n to the repaired value. Reading counts and totals without
    the lock could write an older count over a newer one."""
    fixes = []
    for gid in db.session.scalars(select(GeneratedProject.id).order_by(GeneratedProject.id)):
        recorded = db.session.execute(
            select(GeneratedProject.total_files, GeneratedProject.total_size)
            .where(GeneratedProject.id == gid)
            .with_for_update()
        ).first()
        if recorded is None:
            continue
        of_this = ProjectFile.generated_project_id == GeneratedProject.id
        files = select(func.count()).where(of_this).scalar_subquery()
        size = select(func.coalesce(func.sum(ProjectFile.file_size), 0)).where(of_this)
        size = size.scalar_subquery()
        if fix:
            # One statement: exact on SQLite too, where FOR UPDATE does not exist.
            actual = db.session.execute(
                update(GeneratedProject)
                .where(
                    GeneratedProject.id == gid,
                    (GeneratedProject.total_files != files) | (GeneratedProject.total_size != size),
                )
                .values(total_files=files, total_size=size)
                .returning(GeneratedProject.total_files, GeneratedProject.total_size),
                execution_options={"synchronize_session": False},
            ).first()
        else:
            actual = db.session.execute(
                select(files, size).select_from(GeneratedProject).where(GeneratedProject.id == gid)
            ).first()
            if tuple(actual) == tuple(recorded):
                actual = None
        if actual is not None:
            fixes.append(RecountFix(gid, (recorded[0], actual[0]), (recorded[1], actual[1])))
    return fixes


@dataclass
class SweepReport:
    generations: list[int]
    exports: list[int]


def sweep_stale() -> SweepReport:
    """End the generations and exports a dead worker left `generating` / `running` (the
    caller commits; every one notifies through its failed event)."""
    from services.exports import sweep_stale_exports

    return SweepReport(sweep_stale_generations(), sweep_stale_exports())


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
