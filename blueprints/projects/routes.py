from flask import abort, current_app, flash, redirect, request, send_file, url_for
from flask_login import current_user, login_required
from sqlalchemy import select

from blueprints import get_owned_or_404, is_partial_request, keyset_page, render, scoped
from blueprints.projects import bp
from blueprints.projects.forms import GenerateForm, ProjectForm
from events import enqueue
from extensions import db
from models.projects import GeneratedProject, Project, ProjectFile, RepositoryExport
from services import exports, projects
from services.file_tree import highlighted
from services.live import render_fragment, snapshot


def _index_page(form: ProjectForm, status: int = 200):
    stmt = scoped(select(Project), Project)
    rows, next_before = keyset_page(stmt, Project.id, current_app.config["LIST_PAGE_SIZE"])
    response = render(
        "projects/index.html",
        "projects/_rows.html",
        projects=rows,
        next_before=next_before,
        form=form,
    )
    response.status_code = status
    return response


@bp.get("/")
@login_required
def index():
    return _index_page(ProjectForm())


@bp.post("/")
@login_required
def create():
    form = ProjectForm()
    # An invalid form comes back as it was typed, with the errors beside the fields.
    if not form.validate_on_submit():
        return _index_page(form, 422)
    try:
        project = projects.create_project(
            current_user.tenant_id,
            form.name.data,
            form.description.data or "",
            created_by_id=current_user.id,
        )
    except ValueError as exc:
        db.session.rollback()
        form.name.errors = [*form.name.errors, str(exc)]
        return _index_page(form, 422)
    db.session.commit()
    return redirect(url_for("projects.detail", project_id=project.id), code=303)


def _detail_page(project: Project, form: GenerateForm, status: int = 200):
    response = render(
        "projects/detail.html",
        project=project,
        generations=projects.project_generations(project),
        form=form,
        live_topics=[f"project:{project.id}"],
    )
    response.status_code = status
    return response


@bp.get("/<int:project_id>")
@login_required
def detail(project_id: int):
    return _detail_page(get_owned_or_404(Project, project_id), GenerateForm())


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
        return _detail_page(project, form, 422)
    generated = projects.start_generation(project, form.prompt.data)
    # In the same transaction: a broker outage at commit delays the generation, never loses it.
    enqueue("generate_project", generated.id)
    db.session.commit()
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


@bp.get("/generations/<int:generated_id>")
@login_required
def generation(generated_id: int):
    """One generation's card: the fragment htmx swaps after an action, or a page."""
    generated = get_owned_or_404(GeneratedProject, generated_id)
    return render(
        "projects/generation.html",
        "projects/_generation.html",
        project=db.session.get(Project, generated.project_id),
        item=projects.generation_panel(generated),
        oob=False,
    )


def _back_to(generated: GeneratedProject):
    """After an action: htmx swaps the generation's card, a plain form reloads the page."""
    if is_partial_request():
        return redirect(url_for("projects.generation", generated_id=generated.id), code=303)
    return redirect(url_for("projects.detail", project_id=generated.project_id), code=303)


@bp.post("/generations/<int:generated_id>/cancel")
@login_required
def cancel(generated_id: int):
    generated = get_owned_or_404(GeneratedProject, generated_id)
    try:
        projects.cancel_generation(generated.id, current_user.email)
        db.session.commit()
        flash(f"Generation #{generated.id} cancelled.", "info")
    except projects.TransitionError as exc:
        db.session.rollback()
        flash(str(exc), "error")
    return _back_to(generated)


@bp.post("/generations/<int:generated_id>/retry")
@login_required
def retry(generated_id: int):
    generated = get_owned_or_404(GeneratedProject, generated_id)
    try:
        retried = projects.retry_generation(generated.id)
        enqueue("generate_project", retried.id)
        db.session.commit()
    except projects.TransitionError as exc:
        db.session.rollback()
        flash(str(exc), "error")
        return _back_to(generated)
    flash(f"Generation #{retried.id} retries #{generated.id}.", "info")
    return redirect(url_for("projects.detail", project_id=generated.project_id), code=303)


@bp.post("/exports/<int:export_id>/cancel")
@login_required
def cancel_export(export_id: int):
    export_row = get_owned_or_404(RepositoryExport, export_id)
    try:
        exports.cancel_export(export_row.id, current_user.email)
        db.session.commit()
        flash(f"Export #{export_row.id} cancelled.", "info")
    except exports.ExportError as exc:
        db.session.rollback()
        flash(str(exc), "error")
    return _back_to(db.session.get(GeneratedProject, export_row.generated_project_id))


@bp.post("/exports/<int:export_id>/retry")
@login_required
def retry_export(export_id: int):
    export_row = get_owned_or_404(RepositoryExport, export_id)
    generated = db.session.get(GeneratedProject, export_row.generated_project_id)
    try:
        exports.retry_export(export_row.id)
        enqueue("build_export", export_row.id)
        db.session.commit()
    except exports.ExportError as exc:
        db.session.rollback()
        flash(str(exc), "error")
        return _back_to(generated)
    flash(f"Building the {export_row.format} export again…", "info")
    return _back_to(generated)


@bp.post("/generations/<int:generated_id>/export")
@login_required
def export(generated_id: int):
    generated = get_owned_or_404(GeneratedProject, generated_id)
    try:
        row = exports.request_export(generated, request.form.get("format", ""), current_user.id)
        enqueue("build_export", row.id)
        db.session.commit()
    except exports.ExportError as exc:
        db.session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("projects.detail", project_id=generated.project_id), code=303)
    flash(f"Building the {row.format} export…", "info")
    return redirect(url_for("projects.detail", project_id=generated.project_id), code=303)


@bp.get("/exports/<int:export_id>/download")
@login_required
def download(export_id: int):
    export_row = get_owned_or_404(RepositoryExport, export_id)
    if export_row.status != "completed" or not export_row.artifact:
        abort(404)
    path = exports.exports_path() / export_row.artifact
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
