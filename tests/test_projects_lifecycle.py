"""Projects never get stuck and never miscount (issue 18, the projects and exports part).

Totals stay exact when two sessions touch the same file; a stale status change cannot undo a
finished generation; PROJECT_GENERATION_TIMEOUT bounds the whole generation; exports and
generations always end (failed with a reason and a notification, never `running` for ever);
a sweeper ends what a dead worker left behind; users can cancel and retry.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import threading
import time
import warnings
from datetime import timedelta

import pytest
from sqlalchemy import event, func, select, text, update
from sqlalchemy.exc import SAWarning
from sqlalchemy.orm import Session

from models.base import utcnow
from models.notifications import Notification
from models.projects import (
    GeneratedProject,
    InvalidTransition,
    Project,
    ProjectFile,
    RepositoryExport,
)
from services import exports, projects
from tests.conftest import csrf_token_from, drain, login
from tests.fake_openai import FakeOpenAI, Script
from tests.helpers import wait_for

FILES_ANSWER = json.dumps(
    {"files": [{"path": f"src/m{n}.py", "content": f"print({n})\n"} for n in range(6)]}
)


@pytest.fixture(autouse=True)
def private_exports_dir(app, tmp_path):
    app.config["EXPORTS_DIR"] = str(tmp_path / "exports")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_app(request):
    """The embedded app, or the production one on PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("app")
    return request.getfixturevalue("prod_app")


def _factory(app):
    from tests.conftest import Factory

    return Factory(app)


_names = itertools.count(1)


def _project(db, tenant_id: int, name: str = "", created_by_id: int | None = None) -> Project:
    name = name or f"Demo {next(_names)}"
    project = Project(tenant_id=tenant_id, name=name, created_by_id=created_by_id)
    db.session.add(project)
    db.session.commit()
    return project


def _generating(db, tenant_id: int, created_by_id: int | None = None) -> GeneratedProject:
    project = _project(db, tenant_id, created_by_id=created_by_id)
    generated = projects.start_generation(project, "a tiny app")
    db.session.commit()
    projects.transition(generated.id, "generating")
    db.session.commit()
    return generated


def _completed(db, tenant_id: int, created_by_id: int | None = None) -> GeneratedProject:
    generated = _generating(db, tenant_id, created_by_id)
    projects.add_file(generated, "README.md", "# hi\n")
    projects.add_file(generated, "app.py", "print('hi')\n")
    db.session.commit()
    projects.transition(generated.id, "completed")
    db.session.commit()
    return generated


def _actual_totals(db, gid: int) -> tuple[int, int]:
    count, size = db.session.execute(
        select(func.count(), func.coalesce(func.sum(ProjectFile.file_size), 0)).where(
            ProjectFile.generated_project_id == gid
        )
    ).one()
    return count, size


def _stored_totals(db, gid: int) -> tuple[int, int]:
    db.session.expire_all()
    generated = db.session.get(GeneratedProject, gid)
    return generated.total_files, generated.total_size


# ---------------------------------------------------------------- exact totals


def test_two_sessions_deleting_the_same_file_subtract_once(any_app):
    from extensions import db

    tenant = _factory(any_app).tenant()
    with any_app.app_context():
        generated = _generating(db, tenant.id)
        projects.add_file(generated, "a.txt", "x" * 10)
        projects.add_file(generated, "b.txt", "y" * 5)
        projects.add_file(generated, "c.txt", "z" * 100)
        db.session.commit()
        gid = generated.id
        with Session(db.engine) as first, Session(db.engine) as second:
            path_a = select(ProjectFile).where(ProjectFile.path == "a.txt")
            seen_by_first = first.scalar(path_a)
            seen_by_second = second.scalar(path_a)
            first.delete(seen_by_first)
            first.commit()
            second.delete(seen_by_second)
            # In production SQLAlchemy only warns that nothing was deleted; the totals must
            # not move a second time either way.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SAWarning)
                second.commit()
        assert _stored_totals(db, gid) == _actual_totals(db, gid) == (2, 105)


def test_concurrent_deletes_of_one_file_subtract_once_on_postgres(prod_app):
    from extensions import db

    tenant = _factory(prod_app).tenant()
    with prod_app.app_context():
        generated = _generating(db, tenant.id)
        projects.add_file(generated, "a.txt", "x" * 10)
        projects.add_file(generated, "b.txt", "y" * 5)
        projects.add_file(generated, "c.txt", "z" * 100)
        db.session.commit()
        gid = generated.id
        errors: list[BaseException] = []
        with Session(db.engine) as first, Session(db.engine) as second:
            path_a = select(ProjectFile).where(ProjectFile.path == "a.txt")
            first.delete(first.scalar(path_a))
            first.flush()  # holds the row: the second DELETE waits for this transaction
            victim = second.scalar(path_a)

            def delete_too():
                try:
                    second.delete(victim)
                    second.commit()
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SAWarning)
                waiter = threading.Thread(target=delete_too)
                waiter.start()
                try:
                    assert wait_for(lambda: _blocked_backends(db) >= 1, timeout=10)
                finally:
                    first.commit()
                    waiter.join(timeout=30)
        assert not errors
        assert _stored_totals(db, gid) == _actual_totals(db, gid) == (2, 105)


def _blocked_backends(db) -> int:
    """How many connections to this test's database wait for a lock."""
    with db.engine.connect() as connection:
        return connection.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
        )


def test_a_stale_content_update_moves_the_size_by_the_stored_value(any_app):
    from extensions import db

    tenant = _factory(any_app).tenant()
    with any_app.app_context():
        generated = _generating(db, tenant.id)
        projects.add_file(generated, "a.txt", "x" * 10)
        db.session.commit()
        gid = generated.id
        with Session(db.engine) as first, Session(db.engine) as second:
            path_a = select(ProjectFile).where(ProjectFile.path == "a.txt")
            mine, theirs = first.scalar(path_a), second.scalar(path_a)
            mine.content = "x" * 100
            first.commit()
            theirs.content = "x" * 50  # this session still believes the file is 10 bytes
            second.commit()
        assert _stored_totals(db, gid) == _actual_totals(db, gid) == (1, 50)


def test_concurrent_content_updates_keep_the_size_exact_on_postgres(prod_app):
    from extensions import db

    tenant = _factory(prod_app).tenant()
    with prod_app.app_context():
        generated = _generating(db, tenant.id)
        projects.add_file(generated, "a.txt", "x" * 10)
        db.session.commit()
        gid = generated.id
        errors: list[BaseException] = []
        with Session(db.engine) as first, Session(db.engine) as second:
            path_a = select(ProjectFile).where(ProjectFile.path == "a.txt")
            mine, theirs = first.scalar(path_a), second.scalar(path_a)
            mine.content = "x" * 100
            first.flush()

            def update_too():
                try:
                    theirs.content = "x" * 50
                    second.commit()
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

            waiter = threading.Thread(target=update_too)
            waiter.start()
            try:
                assert wait_for(lambda: _blocked_backends(db) >= 1, timeout=10)
            finally:
                first.commit()
                waiter.join(timeout=30)
        assert not errors
        assert _stored_totals(db, gid) == _actual_totals(db, gid) == (1, 50)


def test_file_size_is_derived_from_the_content(db, factory):
    generated = _generating(db, factory.tenant().id)
    db.session.add(
        ProjectFile(
            tenant_id=generated.tenant_id,
            generated_project_id=generated.id,
            path="lie.txt",
            content="abc",
            file_size=999_999,
        )
    )
    db.session.commit()
    file = db.session.scalar(select(ProjectFile).where(ProjectFile.path == "lie.txt"))
    assert file.file_size == 3
    file.file_size = 0
    db.session.commit()
    file.content = "ünï"  # 5 bytes of UTF-8
    db.session.commit()
    db.session.expire_all()
    assert db.session.get(ProjectFile, file.id).file_size == 5
    assert _stored_totals(db, generated.id) == _actual_totals(db, generated.id) == (1, 5)


def test_recount_never_writes_an_older_count_on_postgres(prod_app):
    """A file added while recount runs is counted once, whatever the interleaving."""
    from extensions import db

    tenant = _factory(prod_app).tenant()
    with prod_app.app_context():
        generated = _generating(db, tenant.id)
        projects.add_file(generated, "a.txt", "x" * 10)
        db.session.commit()
        gid = generated.id
        db.session.execute(
            update(GeneratedProject).where(GeneratedProject.id == gid).values(total_files=7)
        )
        db.session.commit()
        main = threading.current_thread()
        writer_done = threading.Event()
        writer_errors: list[BaseException] = []

        def add_a_file():
            try:
                with prod_app.app_context():
                    row = db.session.get(GeneratedProject, gid)
                    projects.add_file(row, "b.txt", "y" * 5)
                    db.session.commit()
            except BaseException as exc:  # noqa: BLE001
                writer_errors.append(exc)
            finally:
                writer_done.set()

        started: list[threading.Thread] = []

        def between_statements(conn, cursor, statement, parameters, context, executemany):
            # Right after recount's first statement, another session adds a file.
            if threading.current_thread() is main and not started:
                thread = threading.Thread(target=add_a_file)
                started.append(thread)
                thread.start()
                writer_done.wait(timeout=2)  # it finishes here unless recount holds the row

        event.listen(db.engine, "after_cursor_execute", between_statements)
        try:
            projects.recount(fix=True)
            db.session.commit()
        finally:
            event.remove(db.engine, "after_cursor_execute", between_statements)
        started[0].join(timeout=30)
        assert not writer_errors
        assert _stored_totals(db, gid) == _actual_totals(db, gid) == (2, 15)


# ---------------------------------------------------------------- guarded status


def test_a_stale_orm_status_change_cannot_fail_a_completed_generation(any_app):
    from extensions import db

    tenant = _factory(any_app).tenant()
    with any_app.app_context():
        gid = _generating(db, tenant.id).id
        with Session(db.engine) as stale:
            loaded = stale.get(GeneratedProject, gid)
            assert loaded.status == "generating"
            projects.transition(gid, "completed")
            db.session.commit()
            loaded.status = "failed"
            loaded.error = "too late"
            with pytest.raises(InvalidTransition, match="completed"):
                stale.commit()
            stale.rollback()
        db.session.expire_all()
        row = db.session.get(GeneratedProject, gid)
        assert (row.status, row.error) == ("completed", None)


def test_a_stale_orm_status_change_cannot_reopen_a_finished_export(any_app):
    from extensions import db

    tenant = _factory(any_app).tenant()
    with any_app.app_context():
        generated = _completed(db, tenant.id)
        export_id = exports.request_export(generated, "zip", None).id
        db.session.commit()
        with Session(db.engine) as stale:
            loaded = stale.get(RepositoryExport, export_id)
            exports.build(export_id)
            loaded.status = "running"
            with pytest.raises(InvalidTransition, match="completed"):
                stale.commit()
            stale.rollback()
        db.session.expire_all()
        assert db.session.get(RepositoryExport, export_id).status == "completed"


# ---------------------------------------------------------------- a true deadline


@pytest.fixture
def model_server(app):
    fake = FakeOpenAI(Script(json_reply=FILES_ANSWER)).start()
    app.config.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="k")
    yield fake
    fake.stop()


def _queue_generation(app, db, tenant_id: int, created_by_id: int | None = None) -> int:
    project = _project(db, tenant_id, created_by_id=created_by_id)
    generated = projects.start_generation(project, "six modules")
    db.session.commit()
    app.extensions["switchboard.tasks"].send("generate_project", generated.id)
    return generated.id


def _status(db, gid: int) -> str:
    db.session.expire_all()
    return db.session.get(GeneratedProject, gid).status


@pytest.mark.parametrize("how", ["hangs", "trickles"])
def test_the_generation_timeout_bounds_the_whole_generation(
    app, db, worker, factory, model_server, how
):
    app.config["PROJECT_GENERATION_TIMEOUT"] = 1.0
    if how == "hangs":
        model_server.script.stall_seconds = 60
    else:
        model_server.script.trickle_seconds = 0.05  # the answer would take about a minute
    began = time.monotonic()
    gid = _queue_generation(app, db, factory.tenant().id)
    assert wait_for(lambda: _status(db, gid) == "failed", timeout=8), _status(db, gid)
    elapsed = time.monotonic() - began
    assert elapsed < 2.5, f"failed after {elapsed:.1f}s with a 1s deadline"
    row = db.session.get(GeneratedProject, gid)
    assert "1 s" in row.error and row.total_files == 0


def test_a_refused_request_is_not_retried(app, db, worker, factory, model_server):
    model_server.script.fail_first = 10
    model_server.script.fail_status = 400
    gid = _queue_generation(app, db, factory.tenant().id)
    assert wait_for(lambda: _status(db, gid) == "failed", timeout=15)
    drain(app)
    assert len(model_server.records) == 1
    assert "400" in db.session.get(GeneratedProject, gid).error


def test_a_rate_limited_request_is_retried_within_the_deadline(
    app, db, worker, factory, model_server
):
    model_server.script.fail_first = 1
    model_server.script.fail_status = 429
    gid = _queue_generation(app, db, factory.tenant().id)
    assert wait_for(lambda: _status(db, gid) in ("completed", "failed"), timeout=15)
    assert _status(db, gid) == "completed"
    assert len(model_server.records) == 2
    assert _stored_totals(db, gid) == (6, sum(len(f"print({n})\n") for n in range(6)))


def test_cli_generate_never_strands_a_generation(app, db, runner, factory, model_server):
    model_server.script.fail_first = 1000
    model_server.script.fail_status = 429
    app.config["PROJECT_GENERATION_TIMEOUT"] = 2.0
    project = _project(db, factory.tenant().id, name="Busy")
    result = runner.invoke(args=["projects", "generate", "--project", "Busy", "--prompt", "x"])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1 and "429" in error_lines[0]
    generated = db.session.scalar(
        select(GeneratedProject).where(GeneratedProject.project_id == project.id)
    )
    db.session.refresh(generated)
    assert generated.status == "failed" and "429" in generated.error


# ---------------------------------------------------------------- exports always end


def _export_notifications(db, user_id: int) -> list[Notification]:
    db.session.expire_all()
    return db.session.scalars(
        select(Notification).where(
            Notification.recipient_id == user_id, Notification.type == "export_failed"
        )
    ).all()


def _queue_export(app, db, generated, fmt: str, user_id: int) -> int:
    export_id = exports.request_export(generated, fmt, user_id).id
    db.session.commit()
    app.extensions["switchboard.tasks"].send("build_export", export_id)
    drain(app)
    return export_id


@pytest.mark.parametrize("fmt", ["zip", "git"])
def test_an_export_folder_that_cannot_be_created_fails_the_export(
    app, db, worker, factory, tmp_path, fmt
):
    tenant = factory.tenant()
    agent = factory.user(tenant, role="agent")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the export folder should be")
    app.config["EXPORTS_DIR"] = str(blocker / "exports")
    export_id = _queue_export(app, db, _completed(db, tenant.id), fmt, agent.id)
    export = db.session.get(RepositoryExport, export_id)
    assert export.status == "failed"
    assert export.error and len(export.error) < 200 and str(tmp_path) not in export.error
    assert len(_export_notifications(db, agent.id)) == 1


@pytest.fixture
def read_only_dir(tmp_path):
    if not shutil.which("chattr"):
        pytest.skip("chattr not installed")
    folder = tmp_path / "read-only"
    folder.mkdir()
    # Immutable: even root cannot create or remove anything inside it.
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("this file system cannot make a folder immutable")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("fmt", ["zip", "git"])
def test_a_read_only_export_folder_fails_the_export(app, db, worker, factory, read_only_dir, fmt):
    tenant = factory.tenant()
    agent = factory.user(tenant, role="agent")
    app.config["EXPORTS_DIR"] = str(read_only_dir)
    export_id = _queue_export(app, db, _completed(db, tenant.id), fmt, agent.id)
    export = db.session.get(RepositoryExport, export_id)
    assert export.status == "failed" and export.error
    assert len(_export_notifications(db, agent.id)) == 1


def test_download_with_a_missing_export_folder_is_a_404_not_a_500(
    app, db, client, factory, tmp_path
):
    tenant = factory.tenant()
    user = factory.user(tenant)
    generated = _completed(db, tenant.id)
    export = exports.build(exports.request_export(generated, "zip", user.id).id)
    db.session.commit()
    blocker = tmp_path / "gone"
    blocker.write_text("")
    app.config["EXPORTS_DIR"] = str(blocker / "exports")
    login(client, user)
    assert client.get(f"/projects/exports/{export.id}/download").status_code == 404


# ---------------------------------------------------------------- the sweeper


def test_sweep_ends_stale_rows_with_a_reason_and_a_notification(app, db, runner, factory):
    tenant = factory.tenant()
    agent = factory.user(tenant, role="agent")
    stale = _generating(db, tenant.id, created_by_id=agent.id)
    fresh = _generating(db, tenant.id)
    projects.add_file(stale, "half.txt", "written before the worker died")
    db.session.commit()
    long_ago = utcnow() - timedelta(seconds=app.config["PROJECT_STALE_AFTER_SECONDS"] + 5)
    db.session.execute(
        update(GeneratedProject).where(GeneratedProject.id == stale.id).values(started_at=long_ago)
    )
    export_id = exports.request_export(_completed(db, tenant.id), "zip", agent.id).id
    db.session.commit()
    exports.set_status(export_id, "running")
    db.session.execute(
        update(RepositoryExport).where(RepositoryExport.id == export_id).values(updated_at=long_ago)
    )
    db.session.commit()

    result = runner.invoke(args=["projects", "sweep"])
    assert result.exit_code == 0, result.output
    assert "1 generation" in result.output and "1 export" in result.output
    db.session.expire_all()
    swept = db.session.get(GeneratedProject, stale.id)
    assert swept.status == "failed" and "no progress" in swept.error
    assert _stored_totals(db, stale.id) == _actual_totals(db, stale.id) == (0, 0)
    assert db.session.get(GeneratedProject, fresh.id).status == "generating"
    export = db.session.get(RepositoryExport, export_id)
    assert export.status == "failed" and "no progress" in export.error

    app.extensions["switchboard.tasks"].start_embedded_worker()  # relays the events

    def kinds() -> set[str]:
        db.session.expire_all()
        return set(
            db.session.scalars(
                select(Notification.type).where(Notification.recipient_id == agent.id)
            )
        )

    assert wait_for(lambda: {"generation_failed", "export_failed"} <= kinds(), timeout=15)
    assert "Nothing to sweep." in runner.invoke(args=["projects", "sweep"]).output


# ---------------------------------------------------------------- cancel and retry


def _token(client, project_id: int) -> str:
    return csrf_token_from(client.get(f"/projects/{project_id}").data)


def test_cancel_and_retry_a_generation_from_the_page(app, db, client, factory):
    tenant = factory.tenant()
    user = factory.user(tenant)
    login(client, user)
    project = _project(db, tenant.id, created_by_id=user.id)
    pending = projects.start_generation(project, "a queue worker")
    db.session.commit()
    page = client.get(f"/projects/{project.id}").get_data(as_text=True)
    cancel_url = f"/projects/generations/{pending.id}/cancel"
    assert f'action="{cancel_url}"' in page
    token = _token(client, project.id)

    stranger = app.test_client()
    login(stranger, factory.user(factory.tenant()))
    stranger_token = csrf_token_from(stranger.get("/projects/").data)
    assert stranger.post(cancel_url, data={"csrf_token": stranger_token}).status_code == 404
    assert client.post(cancel_url).status_code == 400  # no CSRF token
    assert _status(db, pending.id) == "pending"

    response = client.post(cancel_url, data={"csrf_token": token})
    assert response.status_code == 303
    row = db.session.get(GeneratedProject, pending.id)
    assert row.status == "failed" and row.error == f"Cancelled by {user.email}."
    again = client.post(cancel_url, data={"csrf_token": token}, follow_redirects=True)
    assert b"cannot be cancelled" in again.data

    retry_url = f"/projects/generations/{pending.id}/retry"
    assert stranger.post(retry_url, data={"csrf_token": stranger_token}).status_code == 404
    response = client.post(retry_url, data={"csrf_token": token})
    assert response.status_code == 303
    rows = db.session.scalars(
        select(GeneratedProject).where(GeneratedProject.project_id == project.id)
    ).all()
    assert len(rows) == 2
    retried = max(rows, key=lambda g: g.id)
    assert (retried.status, retried.prompt) == ("pending", "a queue worker")
    # A generation that did not fail has nothing to retry.
    refused = client.post(
        f"/projects/generations/{retried.id}/retry",
        data={"csrf_token": token},
        follow_redirects=True,
    )
    assert b"only a failed generation" in refused.data


def test_htmx_cancel_answers_with_the_generation_card(app, db, client, factory):
    tenant = factory.tenant()
    user = factory.user(tenant)
    login(client, user)
    project = _project(db, tenant.id)
    pending = projects.start_generation(project, "an htmx app")
    db.session.commit()
    token = _token(client, project.id)
    response = client.post(
        f"/projects/generations/{pending.id}/cancel",
        headers={"HX-Request": "true", "X-CSRFToken": token},
    )
    assert response.status_code == 303
    card = client.get(response.headers["Location"], headers={"HX-Request": "true"})
    html = card.get_data(as_text=True)
    assert card.status_code == 200 and "Vary" in card.headers
    assert html.lstrip().startswith(f'<article id="generation-{pending.id}"')
    assert 'data-status="failed"' in html and "Cancelled by" in html
    full = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "<html" in full and f'id="generation-{pending.id}"' in full


def test_cancel_and_retry_an_export_from_the_page(app, db, client, factory):
    tenant = factory.tenant()
    user = factory.user(tenant)
    login(client, user)
    generated = _completed(db, tenant.id, created_by_id=user.id)
    export = exports.request_export(generated, "zip", user.id)
    db.session.commit()
    token = _token(client, generated.project_id)
    cancel_url = f"/projects/exports/{export.id}/cancel"
    stranger = app.test_client()
    login(stranger, factory.user(factory.tenant()))
    stranger_token = csrf_token_from(stranger.get("/projects/").data)
    assert stranger.post(cancel_url, data={"csrf_token": stranger_token}).status_code == 404

    assert client.post(cancel_url, data={"csrf_token": token}).status_code == 303
    db.session.expire_all()
    row = db.session.get(RepositoryExport, export.id)
    assert row.status == "failed" and row.error == f"Cancelled by {user.email}."

    retry_url = f"/projects/exports/{export.id}/retry"
    assert stranger.post(retry_url, data={"csrf_token": stranger_token}).status_code == 404
    assert client.post(retry_url, data={"csrf_token": token}).status_code == 303
    db.session.expire_all()
    row = db.session.get(RepositoryExport, export.id)
    assert (row.status, row.error) == ("pending", None)
    # The build was enqueued with the retry; with no worker at commit it waits for the relay.
    app.extensions["switchboard.tasks"].start_embedded_worker()

    def built() -> bool:
        drain(app)
        db.session.expire_all()
        return db.session.get(RepositoryExport, export.id).status == "completed"

    assert wait_for(built, timeout=20)


def test_cancel_and_retry_from_the_command_line(app, db, runner, factory):
    tenant = factory.tenant()
    project = _project(db, tenant.id)
    pending = projects.start_generation(project, "a cli tool")
    db.session.commit()
    result = runner.invoke(args=["projects", "cancel", "--generation", str(pending.id)])
    assert result.exit_code == 0, result.output
    assert _status(db, pending.id) == "failed"
    assert "Cancelled by" in db.session.get(GeneratedProject, pending.id).error
    refused = runner.invoke(args=["projects", "cancel", "--generation", str(pending.id)])
    assert refused.exit_code != 0 and "cannot be cancelled" in refused.output

    result = runner.invoke(args=["projects", "retry", "--generation", str(pending.id)])
    assert result.exit_code == 0, result.output
    retried = db.session.scalar(select(GeneratedProject).where(GeneratedProject.id > pending.id))
    assert retried.status == "completed" and retried.prompt == "a cli tool"

    export = exports.request_export(retried, "zip", None)
    db.session.commit()
    assert runner.invoke(args=["projects", "cancel", "--export", str(export.id)]).exit_code == 0
    result = runner.invoke(args=["projects", "retry", "--export", str(export.id)])
    assert result.exit_code == 0, result.output
    db.session.expire_all()
    assert db.session.get(RepositoryExport, export.id).status == "completed"
    assert runner.invoke(args=["projects", "retry", "--export", "999999"]).exit_code != 0


def test_a_cancelled_generation_stops_storing_files(app, db, factory, model_server):
    from services.generator import run_generation

    gid = projects.start_generation(_project(db, factory.tenant().id), "six modules").id
    db.session.commit()
    stored: list[str] = []

    def cancel_after_the_first_file(path: str) -> None:
        stored.append(path)
        if len(stored) == 1:
            with app.app_context():  # another session, as the web request would be
                projects.cancel_generation(gid, "Ada")
                from extensions import db as other

                other.session.commit()

    result = run_generation(gid, progress=cancel_after_the_first_file)
    assert stored == ["src/m0.py"]
    assert result.status == "failed" and result.error == "Cancelled by Ada."
    assert _stored_totals(db, gid) == _actual_totals(db, gid) == (0, 0)
