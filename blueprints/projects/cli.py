"""`flask projects …`: generate, recount totals, export, cancel, retry, sweep."""

from __future__ import annotations

import getpass

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
    project = _project(ref)
    try:
        generated = projects.start_generation(project, prompt)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    db.session.commit()
    _run_generation_here(generated.id, f"Generation #{generated.id} of {project.name!r}")


def _run_generation_here(generated_id: int, label: str) -> None:
    from services.generator import run_generation

    click.echo(f"{label}: generating…")
    try:
        generated = run_generation(generated_id, progress=lambda path: click.echo(f"  + {path}"))
    except KeyboardInterrupt:  # run_generation has failed the row already
        raise click.ClickException(f"Generation #{generated_id} interrupted.") from None
    if generated.status != "completed":
        raise click.ClickException(f"Generation #{generated.id} failed: {_one_line(generated)}")
    click.echo(
        f"Completed: {generated.total_files} files, {generated.total_size} bytes "
        f"(generation #{generated.id})."
    )


def _one_line(row) -> str:
    return " ".join((row.error or row.status).split())


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
    _build_here(export.id)


def _build_here(export_id: int) -> None:
    click.echo(f"Building export #{export_id}…")
    export = exports.build(export_id)
    if export.status != "completed":
        raise click.ClickException(f"Export #{export.id} failed: {_one_line(export)}")
    click.echo(str(exports.exports_dir() / export.artifact))


def _who() -> str:
    try:
        return f"{getpass.getuser()} (command line)"
    except (KeyError, OSError):
        return "the command line"


def _one_target(generated_id: int | None, export_id: int | None) -> None:
    if (generated_id is None) == (export_id is None):
        raise click.UsageError("Name one --generation or one --export.")


@projects_cli.command("cancel")
@click.option("--generation", "generated_id", type=int, help="A pending or generating one.")
@click.option("--export", "export_id", type=int, help="A pending or running one.")
@with_appcontext
def cancel_command(generated_id: int | None, export_id: int | None) -> None:
    """Cancel a generation or an export (it ends failed, "Cancelled by …")."""
    _one_target(generated_id, export_id)
    try:
        if generated_id is not None:
            projects.cancel_generation(generated_id, _who())
        else:
            exports.cancel_export(export_id, _who())
    except (projects.TransitionError, exports.ExportError) as exc:
        db.session.rollback()
        raise click.ClickException(str(exc)) from exc
    db.session.commit()
    what = f"Generation #{generated_id}" if generated_id is not None else f"Export #{export_id}"
    click.echo(f"{what} cancelled.")


@projects_cli.command("retry")
@click.option("--generation", "generated_id", type=int, help="A failed generation.")
@click.option("--export", "export_id", type=int, help="A failed export.")
@with_appcontext
def retry_command(generated_id: int | None, export_id: int | None) -> None:
    """Run a failed generation again (as a new one, same prompt) or a failed export, here."""
    _one_target(generated_id, export_id)
    try:
        if generated_id is not None:
            retried = projects.retry_generation(generated_id)
        else:
            exports.retry_export(export_id)
    except (projects.TransitionError, exports.ExportError) as exc:
        db.session.rollback()
        raise click.ClickException(str(exc)) from exc
    db.session.commit()
    if generated_id is not None:
        _run_generation_here(retried.id, f"Generation #{retried.id} (retry of #{generated_id})")
    else:
        _build_here(export_id)


@projects_cli.command("sweep")
@with_appcontext
def sweep_command() -> None:
    """Fail generations and exports stuck for longer than PROJECT_STALE_AFTER_SECONDS."""
    report = projects.sweep_stale()
    db.session.commit()
    if not report.generations and not report.exports:
        click.echo("Nothing to sweep.")
        return
    click.echo(
        f"Failed {len(report.generations)} generation(s) "
        f"{_ids(report.generations)} and {len(report.exports)} export(s) "
        f"{_ids(report.exports)} that made no progress."
    )


def _ids(ids: list[int]) -> str:
    return "(" + ", ".join(f"#{i}" for i in ids) + ")" if ids else ""
