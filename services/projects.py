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
