"""`flask projects …`: generate, recount totals, export."""

from __future__ import annotations

import click
from flask.cli import with_appcontext
from sqlalchemy import select

from extensions import db
from models.projects import GeneratedProject, Project
from services import exports, projects

projects_cli = click.Group("projects", help="Projects: generation, totals and exports.")


def _project(ref: str) -> Project:
    project = db.session.get(Project, int(ref)) if ref.isdigit() else None
    if project is None:
        matches = db.session.scalars(select(Project).where(Project.name == ref)).all()
        if len(matches) > 1:
            raise click.ClickException(f"Several projects are named {ref!r}; use the number.")
        project = matches[0] if matches else None
    if project is None:
        raise click.ClickException(f"No project {ref!r}.")
    return project


@projects_cli.command("generate")
@click.option("--project", "ref", required=True, help="Project number or name.")
@click.option("--prompt", required=True)
@with_appcontext
def generate_command(ref: str, prompt: str) -> None:
    """Generate a project here and now, showing each file as it is stored."""
    from tasks.projects import run_generation

    project = _project(ref)
    try:
        generated = projects.start_generation(project, prompt)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    db.session.commit()
    click.echo(f"Generation #{generated.id} of {project.name!r}: generating…")
    generated = run_generation(generated.id, progress=lambda path: click.echo(f"  + {path}"))
    if generated.status != "completed":
        raise click.ClickException(f"Generation #{generated.id} failed: {generated.error}")
    click.echo(
        f"Completed: {generated.total_files} files, {generated.total_size} bytes "
        f"(generation #{generated.id})."
    )


@projects_cli.command("recount")
@click.option("--dry-run", is_flag=True, help="Report drift without repairing it.")
@with_appcontext
def recount_command(dry_run: bool) -> None:
    """Check every generation's file totals against its files and repair drift."""
    fixes = projects.recount(fix=not dry_run)
    db.session.commit()
    if not fixes:
        click.echo("All totals are exact.")
        return
    verb = "Would fix" if dry_run else "Fixed"
    for fix in fixes:
        click.echo(
            f"{verb} generation #{fix.generated_id}: files {fix.files[0]} → {fix.files[1]}, "
            f"size {fix.size[0]} → {fix.size[1]}"
        )
    click.echo(f"{verb} {len(fixes)} generation(s).")


@projects_cli.command("export")
@click.option("--generated-project", "generated_id", required=True, type=int)
@click.option("--format", "fmt", type=click.Choice(["zip", "git"]), required=True)
@with_appcontext
def export_command(generated_id: int, fmt: str) -> None:
    """Build a zip or git export of a completed generation and print where it is."""
    generated = db.session.get(GeneratedProject, generated_id)
    if generated is None:
        raise click.ClickException(f"No generation #{generated_id}.")
    try:
        export = exports.request_export(generated, fmt, None)
    except exports.ExportError as exc:
        raise click.ClickException(str(exc)) from exc
    db.session.commit()
    click.echo(f"Building {fmt} export #{export.id}…")
    export = exports.build(export.id)
    if export.status != "completed":
        raise click.ClickException(f"Export failed: {export.error}")
    click.echo(str(exports.exports_dir() / export.artifact))
