"""Project actors: generation and exports, plus their notifications and live progress."""

from __future__ import annotations

import logging

from dramatiq.middleware import CurrentMessage
from flask import current_app
from sqlalchemy import select

from events.registry import Event, handler, task
from extensions import db
from models.accounts import User
from models.projects import GeneratedProject, Project, ProjectFile, RepositoryExport
from services import exports, generator, projects
from services.live import publish_after_commit, render_fragment, tenant_topic
from services.notifications import notification_rule

log = logging.getLogger(__name__)


def project_members(event: Event) -> list[int]:
    """Whoever created the project, the tenant's admins and, for an export, whoever
    asked for it (an agent who is neither would otherwise never hear it is ready)."""
    project_id = event.payload.get("project_id")
    project = db.session.get(Project, project_id) if project_id else None
    ids = set(
        db.session.scalars(
            select(User.id).where(
                User.tenant_id == event.tenant_id,
                User.role == "admin",
                User.is_active_user.is_(True),
            )
        )
    )
    if project is not None and project.created_by_id:
        ids.add(project.created_by_id)
    if event.entity == "repository_export" and event.entity_id:
        export = db.session.get(RepositoryExport, event.entity_id)
        if export is not None and export.requested_by_id:
            ids.add(export.requested_by_id)
    return sorted(ids)


def _link(event: Event) -> str:
    return f"/projects/{event.payload.get('project_id')}"


for topic, kind, title in (
    ("project.generation_started", "generation_started", "Generation started"),
    ("project.generation_completed", "generation_completed", "Generation completed"),
    ("project.generation_failed", "generation_failed", "Generation failed"),
    ("project.export_completed", "export_completed", "Export ready"),
    ("project.export_failed", "export_failed", "Export failed"),
):
    notification_rule(
        topic,
        type=kind,
        recipients=project_members,
        title=lambda e, title=title: f"{title}: {e.payload.get('label', '')}",
        body=lambda e: e.payload.get("error", ""),
        link=_link,
        subject=lambda e: f"{e.entity}:{e.entity_id}",
    )


def _retries_left(max_retries: int) -> bool:
    message = CurrentMessage.get_current_message()
    return message is not None and message.options.get("retries", 0) < max_retries


GENERATE_RETRIES = 2


@task(
    name="generate_project", queue="projects", max_retries=GENERATE_RETRIES, time_limit_ms=600_000
)
def generate_project(generated_id: int) -> None:
    """Generate the files of a pending generation. Idempotent under retries."""
    try:
        run_generation(generated_id)
    except Exception as exc:
        db.session.rollback()
        if _retries_left(GENERATE_RETRIES):
            raise
        log.exception("generation %s failed for good", generated_id)
        try:
            # A failed generation keeps no half of its files.
            _delete_files(generated_id)
            # Database errors quote the SQL and the file content: keep them in the log only.
            reason = (
                f"The generation stopped on an unexpected error ({type(exc).__name__}); "
                "the worker log has the details."
            )
            projects.transition(generated_id, "failed", error=reason)
            db.session.commit()
        except projects.TransitionError:
            db.session.rollback()


def _delete_files(generated_id: int) -> None:
    for file in db.session.scalars(
        select(ProjectFile).where(ProjectFile.generated_project_id == generated_id)
    ):
        db.session.delete(file)
    db.session.flush()


def run_generation(generated_id: int, progress=None) -> GeneratedProject | None:
    cfg = current_app.config
    generated = db.session.get(GeneratedProject, generated_id)
    if generated is None or generated.status in ("completed", "failed", "archived"):
        return generated
    if generated.status == "pending":
        projects.transition(generated_id, "generating")
        db.session.commit()
    else:
        # A retry of an interrupted run: start again from no files.
        _delete_files(generated_id)
        db.session.commit()
    try:
        files, source = generator.generate_files(generated.prompt)
        specs = projects.validate_files(
            files,
            max_files=cfg["PROJECT_MAX_FILES"],
            max_file_bytes=cfg["PROJECT_MAX_FILE_BYTES"],
            max_total_bytes=cfg["PROJECT_MAX_TOTAL_BYTES"],
        )
    except (projects.PathError, generator.GeneratorError) as exc:
        generated = projects.transition(generated_id, "failed", error=str(exc))
        db.session.commit()
        return generated
    for spec in specs:
        projects.add_file(generated, spec.path, spec.content)
        db.session.commit()
        if progress:
            progress(spec.path)
    generated = projects.transition(generated_id, "completed")
    db.session.commit()
    log.info("generation %s completed from the %s: %s files", generated_id, source, len(specs))
    return generated


@task(name="build_export", queue="projects", max_retries=0, time_limit_ms=300_000)
def build_export(export_id: int) -> None:
    exports.build(export_id)


@handler(
    "project.generation_*",
    "project.export_*",
    "project_file.created",
    "generated_project.created",
    "repository_export.created",
    name="project_live",
    queue="projects_live",
    max_retries=2,
)
def publish_project_progress(event: Event) -> None:
    """The project page follows its generations and exports without reloads."""
    if event.entity == "project_file":
        file = db.session.get(ProjectFile, event.entity_id)
        generated = db.session.get(GeneratedProject, file.generated_project_id) if file else None
    elif event.entity == "repository_export":
        export = db.session.get(RepositoryExport, event.entity_id)
        generated = (
            db.session.get(GeneratedProject, export.generated_project_id) if export else None
        )
    else:
        generated = db.session.get(GeneratedProject, event.entity_id)
    if generated is None:
        return
    created = event.topic == "generated_project.created"
    html = render_fragment(
        "projects/_live_push.html",
        item=projects.generation_panel(generated),
        project_id=generated.project_id,
        created=created,
    )
    # Keyed by generation: a burst of file events coalesces into its latest state.
    publish_after_commit(
        tenant_topic(generated.tenant_id, f"project:{generated.project_id}"),
        f"generation-{generated.id}" + ("-new" if created else ""),
        html=html,
    )
