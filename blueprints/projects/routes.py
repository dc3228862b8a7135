from flask import current_app
from flask_login import login_required
from sqlalchemy import select

from blueprints import get_owned_or_404, keyset_page, render, scoped
from blueprints.projects import bp
from extensions import db
from models.projects import GeneratedProject, Project


@bp.get("/")
@login_required
def index():
    stmt = scoped(select(Project), Project)
    projects, next_before = keyset_page(stmt, Project.id, current_app.config["LIST_PAGE_SIZE"])
    return render(
        "projects/index.html", "projects/_rows.html", projects=projects, next_before=next_before
    )


@bp.get("/<int:project_id>")
@login_required
def detail(project_id: int):
    project = get_owned_or_404(Project, project_id)
    generations = db.session.scalars(
        select(GeneratedProject)
        .where(
            GeneratedProject.project_id == project.id,
            GeneratedProject.tenant_id == project.tenant_id,
        )
        .order_by(GeneratedProject.created_at.desc(), GeneratedProject.id.desc())
    ).all()
    return render("projects/detail.html", project=project, generations=generations)
