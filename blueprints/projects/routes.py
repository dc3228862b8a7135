from flask import abort, current_app, flash, redirect, request, send_file, url_for
from flask_login import current_user, login_required
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from blueprints import get_owned_or_404, keyset_page, render, scoped
from blueprints.projects import bp
from blueprints.projects.forms import GenerateForm, ProjectForm
from extensions import db
from models.projects import GeneratedProject, Project, ProjectFile, RepositoryExport
from services import exports, projects
from services.file_tree import highlighted
from services.live import render_fragment, snapshot
from tasks.broker import send


@bp.get("/")
@login_required
def index():
    stmt = scoped(select(Project), Project)
    rows, next_before = keyset_page(stmt, Project.id, current_app.config["LIST_PAGE_SIZE"])
    return render(
        "projects/index.html",
        "projects/_rows.html",
        projects=rows,
        next_before=next_before,
        form=ProjectForm(),
    )


@bp.post("/")
@login_required
def create():
    form = ProjectForm()
    if not form.validate_on_submit():
        flash("A project needs a name (at most 120 characters).", "error")
        return redirect(url_for("projects.index"), code=303)
    project = Project(
        tenant_id=current_user.tenant_id,
        name=form.name.data.strip(),
        description=(form.description.data or "").strip(),
        created_by_id=current_user.id,
    )
    db.session.add(project)
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        flash(f"A project named {form.name.data!r} already exists.", "error")
        return redirect(url_for("projects.index"), code=303)
    return redirect(url_for("projects.detail", project_id=project.id), code=303)


@bp.get("/<int:project_id>")
@login_required
def detail(project_id: int):
    project = get_owned_or_404(Project, project_id)
    return render(
        "projects/detail.html",
        project=project,
        generations=projects.project_generations(project),
        form=GenerateForm(),
        live_topics=[f"project:{project.id}"],
    )


@snapshot("project")
def project_snapshot(tenant_id: int, user, project_id: str = "") -> str:
    project = db.session.get(Project, int(project_id)) if project_id.isdigit() else None
    if project is None or project.tenant_id != tenant_id:
        return ""
    return render_fragment(
        "projects/_generations.html",
        project=project,
        generations=projects.project_generations(project),
        oob=True,
    )


@bp.post("/<int:project_id>/generate")
@login_required
def generate(project_id: int):
    project = get_owned_or_404(Project, project_id)
    form = GenerateForm()
    if not form.validate_on_submit():
        flash("Describe the project to generate (at most 4000 characters).", "error")
        return redirect(url_for("projects.detail", project_id=project.id), code=303)
    generated = projects.start_generation(project, form.prompt.data)
    db.session.commit()
    send("generate_project", generated.id)
    return redirect(url_for("projects.detail", project_id=project.id), code=303)


@bp.post("/generations/<int:generated_id>/archive")
@login_required
def archive(generated_id: int):
    generated = get_owned_or_404(GeneratedProject, generated_id)
    try:
        projects.transition(generated.id, "archived")
        db.session.commit()
        flash(f"Generation #{generated.id} archived.", "info")
    except projects.TransitionError as exc:
        db.session.rollback()
        flash(str(exc), "error")
    return redirect(url_for("projects.detail", project_id=generated.project_id), code=303)


@bp.post("/generations/<int:generated_id>/export")
@login_required
def export(generated_id: int):
    generated = get_owned_or_404(GeneratedProject, generated_id)
    try:
        row = exports.request_export(generated, request.form.get("format", ""), current_user.id)
        db.session.commit()
    except exports.ExportError as exc:
        db.session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("projects.detail", project_id=generated.project_id), code=303)
    send("build_export", row.id)
    flash(f"Building the {row.format} export…", "info")
    return redirect(url_for("projects.detail", project_id=generated.project_id), code=303)


@bp.get("/exports/<int:export_id>/download")
@login_required
def download(export_id: int):
    export_row = get_owned_or_404(RepositoryExport, export_id)
    if export_row.status != "completed" or not export_row.artifact:
        abort(404)
    path = exports.exports_dir() / export_row.artifact
    if not path.is_file():
        abort(404)
    name = f"generation-{export_row.generated_project_id}"
    download_name = f"{name}.zip" if export_row.format == "zip" else f"{name}.bundle"
    from events import emit

    emit(
        "project.exported",
        tenant_id=export_row.tenant_id,
        entity="repository_export",
        entity_id=export_row.id,
        payload={"label": f"{download_name} downloaded", "format": export_row.format},
    )
    db.session.commit()
    response = send_file(path, as_attachment=True, download_name=download_name, conditional=True)
    response.headers["Cache-Control"] = "private, no-store"
    return response


@bp.get("/files/<int:file_id>")
@login_required
def file_view(file_id: int):
    file = get_owned_or_404(ProjectFile, file_id)
    generated = db.session.get(GeneratedProject, file.generated_project_id)
    return render(
        "projects/file.html",
        file=file,
        generated=generated,
        project=db.session.get(Project, generated.project_id),
        code=highlighted(file.path, file.content),
    )
