"""Project actors: generation and exports, plus their notifications and live progress."""

from __future__ import annotations

import logging

from sqlalchemy import select

from events.registry import Event, handler, periodic, task
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


GENERATE_RETRIES = 2


@task(
    name="generate_project", queue="projects", max_retries=GENERATE_RETRIES, time_limit_ms=600_000
)
def generate_project(generated_id: int) -> None:
    """Run a generation. It ends the row itself whatever happens; a retry only follows a
    failure to record that (the database was away), and finds the deadline passed."""
    generator.run_generation(generated_id)


# Under the sweeper's default PROJECT_STALE_AFTER_SECONDS (240): an export still running
# when the sweeper looks has been stopped by this limit, never a healthy slow one.
@task(name="build_export", queue="projects", max_retries=0, time_limit_ms=180_000)
def build_export(export_id: int) -> None:
    exports.build(export_id)


@periodic("PROJECT_SWEEP_INTERVAL", name="sweep_stale_projects")
def sweep_stale_projects() -> None:
    projects.sweep_stale()
    db.session.commit()


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
