"""Repository exports: a zip of the files, or a real git repository (one commit) as a bundle."""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import unicodedata
import zipfile
from datetime import datetime
from pathlib import Path

from flask import current_app
from sqlalchemy import select, update

from events import emit
from extensions import db
from models.base import utcnow
from models.projects import (
    EXPORT_TRANSITIONS,
    GeneratedProject,
    Project,
    ProjectFile,
    RepositoryExport,
)
from services import projects

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    pass


def exports_path() -> Path:
    """Where artifacts are kept (not created: a download must not try to)."""
    return Path(
        current_app.config.get("EXPORTS_DIR") or Path(current_app.instance_path) / "exports"
    )


def exports_dir() -> Path:
    path = exports_path()
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
    if to == "pending":  # a retry starts clean
        values.update(artifact=None, error=None)
    result = db.session.execute(
        update(RepositoryExport)
        .where(
            RepositoryExport.id == export_id, RepositoryExport.status.in_(EXPORT_TRANSITIONS[to])
        )
        .values(**values),
        execution_options={"synchronize_session": False},
    )
    export = db.session.get(RepositoryExport, export_id)
    if export is None:
        raise ExportError(f"No export #{export_id}.")
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


def _checked_files(generated_id: int) -> list[ProjectFile]:
    """The generation's files, checked again as validation checks them: rows may have
    reached the database some other way, and an export must never carry a .git path."""
    files = _files(generated_id)
    try:
        projects.check_layout([file.path for file in files])
        for file in files:
            projects.check_content(file.path, file.content)
    except projects.PathError as exc:
        raise ExportError(f"Export refused: {exc}") from exc
    return files


def project_folder(project: Project) -> str:
    """The zip's single top-level folder: a slug of the project's name."""
    ascii_name = unicodedata.normalize("NFKD", project.name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:60].strip("-")
    return slug or f"project-{project.id}"


def build_zip(generated: GeneratedProject, target: Path) -> None:
    folder = project_folder(db.session.get(Project, generated.project_id))
    when = (generated.completed_at or utcnow()).timetuple()[:6]
    files = _checked_files(generated.id)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in files:
            entry = zipfile.ZipInfo(f"{folder}/{file.path}", date_time=when)
            entry.compress_type = zipfile.ZIP_DEFLATED
            # A regular, non-executable file, as unzip on Unix reads the mode.
            entry.create_system = 3
            entry.external_attr = (stat.S_IFREG | 0o644) << 16
            archive.writestr(entry, file.content.encode("utf-8"))


GIT_TIMEOUT_SECONDS = 60
# Settings no config file may change for the export's git commands.
GIT_OVERRIDES = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.untrackedCache=false",
    "core.attributesFile=/dev/null",
    "core.autocrlf=false",
    "core.safecrlf=false",
    "gc.auto=0",
    "maintenance.auto=false",
    "protocol.allow=never",
)


def _config_args() -> list[str]:
    return [arg for override in GIT_OVERRIDES for arg in ("-c", override)]


def _git_env(home: Path, when: datetime) -> dict[str, str]:
    """Only what git needs. HOME is the export's private directory, so no .gitconfig of
    the worker, of $HOME or of the shared temp directory applies; the environment's
    GIT_* variables (GIT_DIR, GIT_CONFIG_*) are not passed on either."""
    date = f"{int(when.timestamp())} +0000"
    return {
        "PATH": os.environ.get("PATH") or os.defpath,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_SYSTEM": os.devnull,
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_ATTR_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": "Switchboard",
        "GIT_AUTHOR_EMAIL": "switchboard@localhost",
        "GIT_AUTHOR_DATE": date,
        "GIT_COMMITTER_NAME": "Switchboard",
        "GIT_COMMITTER_EMAIL": "switchboard@localhost",
        "GIT_COMMITTER_DATE": date,
        "GIT_INDEX_FILE": str(home / "index"),
        "LC_ALL": "C",
    }


def build_git_bundle(generated: GeneratedProject, target: Path, message: str) -> None:
    """One commit of the files as a bundle, built without any working tree.

    Contents go in as blobs (no filters, no attributes) and paths only as index entries of a
    bare repository, so no generated file can ever become git's config, a hook or a link to
    another repository, and nothing git would run on a checkout runs here."""
    files = _checked_files(generated.id)
    private = Path(tempfile.mkdtemp(prefix="sb-export-"))  # mode 0700, unpredictable name
    try:
        env = _git_env(private, generated.completed_at or utcnow())
        repo = private / "repo.git"

        def git(step: str, *args: str, stdin: bytes | None = None) -> str:
            command = ["git", *_config_args(), f"--git-dir={repo}", *args]
            done = subprocess.run(
                command,
                cwd=private,
                env=env,
                input=stdin,
                capture_output=True,
                timeout=GIT_TIMEOUT_SECONDS,
            )
            if done.returncode != 0:
                log.error("export git %s failed: %s", args[0], done.stderr[:2000])
                raise ExportError(f"git could not {step} (exit {done.returncode}).")
            return done.stdout.decode()

        git("create the repository", "init", "-q", "--bare", "--template=", "-b", "main")
        blobs = private / "blobs"
        blobs.mkdir()
        # Blob files are named by number: no generated path ever touches the file system.
        for number, file in enumerate(files):
            (blobs / str(number)).write_bytes(file.content.encode("utf-8"))
        names = "".join(f"blobs/{n}\n" for n in range(len(files))).encode()
        shas = git(
            "store the files", "hash-object", "-w", "--no-filters", "--stdin-paths", stdin=names
        ).split()
        if len(shas) != len(files):
            raise ExportError("git could not store the files.")
        entries = "".join(f"100644 {sha}\t{f.path}\0" for sha, f in zip(shas, files, strict=True))
        git(
            "build the tree",
            "update-index",
            "--add",
            "-z",
            "--index-info",
            stdin=entries.encode("utf-8"),
        )
        tree = git("build the tree", "write-tree").strip()
        # git skips paths it considers unsafe; the commit must hold every file or none.
        listed = git("check the tree", "ls-tree", "-r", "-z", "--name-only", tree)
        if sorted(p for p in listed.split("\0") if p) != sorted(f.path for f in files):
            raise ExportError("Export refused: git did not accept every path.")
        commit = git("commit", "commit-tree", tree, "-F", "-", stdin=message.encode()).strip()
        git("commit", "update-ref", "refs/heads/main", commit)
        git("write the bundle", "bundle", "create", "-q", str(target), "HEAD", "refs/heads/main")
    finally:
        shutil.rmtree(private, ignore_errors=True)


def build(export_id: int) -> RepositoryExport:
    """Run one export: pending → running → completed | failed. Whatever goes wrong (the
    folder cannot be created or written, git fails, the worker is interrupted), the export
    ends failed with a short reason; nothing stays `running`."""
    export = set_status(export_id, "running")
    db.session.commit()
    suffix = "zip" if export.format == "zip" else "bundle"
    target: Path | None = None
    try:
        generated = db.session.get(GeneratedProject, export.generated_project_id)
        target = exports_dir() / f"export-{export.id}.{suffix}"
        if export.format == "zip":
            build_zip(generated, target)
        else:
            build_git_bundle(generated, target, f"Generated project: {generated.prompt[:60]}")
    except BaseException as exc:  # noqa: BLE001 - the export must end, then interrupts go on
        failed = _fail_build(export_id, target, exc)
        if not isinstance(exc, Exception):
            raise
        return failed
    try:
        export = set_status(export_id, "completed", artifact=target.name)
        db.session.commit()
    except ExportError:  # cancelled or swept while it was being built
        db.session.rollback()
        _remove_artifact(target)
        export = db.session.get(RepositoryExport, export_id)
        db.session.refresh(export)
    return export


def _fail_build(export_id: int, target: Path | None, exc: BaseException) -> RepositoryExport:
    if isinstance(exc, ExportError):
        reason = str(exc)
    else:
        # OS and timeout errors name private paths; the log keeps them.
        log.error("export %s failed", export_id, exc_info=exc)
        reason = (
            f"The export could not be written ({type(exc).__name__}); "
            "the worker log has the details."
        )
    db.session.rollback()
    _remove_artifact(target)
    try:
        export = set_status(export_id, "failed", error=reason)
        db.session.commit()
    except ExportError:  # cancelled or swept meanwhile: it has its reason already
        db.session.rollback()
        export = db.session.get(RepositoryExport, export_id)
        db.session.refresh(export)
    return export


def _remove_artifact(target: Path | None) -> None:
    if target is None:
        return
    try:
        target.unlink(missing_ok=True)
    except OSError:  # a read-only folder: the export fails all the same
        log.warning("could not remove the partial export %s", target, exc_info=True)


def cancel_export(export_id: int, by: str) -> RepositoryExport:
    """Cancel a pending or running export; a build still running keeps no artifact."""
    try:
        return set_status(export_id, "failed", error=f"Cancelled by {by}.")
    except ExportError as exc:
        export = db.session.get(RepositoryExport, export_id)
        status = export.status if export else "gone"
        raise ExportError(
            f"Export #{export_id} is {status}; only a pending or running export can be cancelled."
        ) from exc


def retry_export(export_id: int) -> RepositoryExport:
    """Queue a failed export again (the caller sends it to a worker after commit)."""
    try:
        return set_status(export_id, "pending")
    except ExportError as exc:
        export = db.session.get(RepositoryExport, export_id)
        status = export.status if export else "gone"
        raise ExportError(
            f"Export #{export_id} is {status}: it cannot be retried (only a failed export can)."
        ) from exc


def sweep_stale_exports() -> list[int]:
    """Fail every export `running` for longer than PROJECT_STALE_AFTER_SECONDS."""
    age = projects.stale_after()
    candidates = db.session.scalars(
        select(RepositoryExport).where(
            RepositoryExport.status == "running",
            RepositoryExport.updated_at < utcnow() - age,
        )
    ).all()
    swept = []
    for export in candidates:
        suffix = "zip" if export.format == "zip" else "bundle"
        try:
            set_status(export.id, "failed", error=projects.stale_reason(age))
        except ExportError:
            continue
        _remove_artifact(exports_path() / f"export-{export.id}.{suffix}")
        swept.append(export.id)
    return swept
