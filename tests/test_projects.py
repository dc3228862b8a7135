"""Projects: the checked lifecycle, exact totals, safe paths, generation and exports."""

from __future__ import annotations

import io
import json
import subprocess
import threading
import zipfile

import pytest
from sqlalchemy import func, select

from models.events import OutboxEvent
from models.projects import TRANSITIONS, GeneratedProject, InvalidTransition, Project, ProjectFile
from services import exports, projects
from services.projects import PathError, TransitionError
from tests.conftest import csrf_token_from, drain, login
from tests.fake_openai import FakeOpenAI, Script

STATUSES = list(TRANSITIONS)


def _project(db, tenant_id: int, name: str = "Demo") -> Project:
    project = Project(tenant_id=tenant_id, name=name)
    db.session.add(project)
    db.session.commit()
    return project


def _generation_in(db, project: Project, status: str) -> GeneratedProject:
    """Walk a new generation to `status` through the real lifecycle."""
    path = {
        "pending": [],
        "generating": ["generating"],
        "completed": ["generating", "completed"],
        "failed": ["generating", "failed"],
        "archived": ["generating", "completed", "archived"],
    }[status]
    generated = projects.start_generation(project, "a tiny app")
    db.session.commit()
    for step in path:
        projects.transition(generated.id, step)
        db.session.commit()
    return db.session.get(GeneratedProject, generated.id)


@pytest.mark.parametrize("source", STATUSES)
@pytest.mark.parametrize("target", STATUSES)
def test_every_transition_is_checked(db, factory, source, target):
    tenant = factory.tenant()
    generated = _generation_in(db, _project(db, tenant.id), source)
    before = db.session.scalar(select(func.count()).select_from(OutboxEvent))
    allowed = target in TRANSITIONS[source]
    if allowed:
        projects.transition(generated.id, target)
        db.session.commit()
        assert db.session.get(GeneratedProject, generated.id).status == target
        topics = db.session.scalars(
            select(OutboxEvent.topic).where(OutboxEvent.id > 0).order_by(OutboxEvent.id.desc())
        ).all()[: db.session.scalar(select(func.count()).select_from(OutboxEvent)) - before]
        assert projects.EVENT_FOR_STATUS[target] in topics
    else:
        with pytest.raises(TransitionError):
            projects.transition(generated.id, target)
        db.session.rollback()
        # The ORM refuses the same change, whichever code path tries it.
        row = db.session.get(GeneratedProject, generated.id)
        if target != source:
            with pytest.raises(InvalidTransition):
                row.status = target
        db.session.rollback()
        assert db.session.get(GeneratedProject, generated.id).status == source


def test_concurrent_transitions_have_one_winner_on_postgres(prod_app, prod_factory):
    from extensions import db

    tenant = prod_factory.tenant()
    with prod_app.app_context():
        generated = _generation_in(db, _project(db, tenant.id), "pending")
        gid = generated.id
    for _ in range(5):  # repeat: a race that only sometimes shows is still a race
        with prod_app.app_context():
            gid = _generation_in(db, db.session.get(GeneratedProject, gid).project, "pending").id
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def attempt(gid=gid, barrier=barrier, outcomes=outcomes):
            with prod_app.app_context():
                barrier.wait()
                try:
                    projects.transition(gid, "generating")
                    db.session.commit()
                    outcomes.append("won")
                except TransitionError:
                    db.session.rollback()
                    outcomes.append("lost")

        threads = [threading.Thread(target=attempt) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(outcomes) == ["lost", "won"]
        with prod_app.app_context():
            started = db.session.scalar(
                select(func.count())
                .select_from(OutboxEvent)
                .where(
                    OutboxEvent.topic == "project.generation_started", OutboxEvent.entity_id == gid
                )
            )
            assert started == 1


def test_totals_stay_exact_with_eight_threads_on_postgres(prod_app, prod_factory):
    from extensions import db

    tenant = prod_factory.tenant()
    with prod_app.app_context():
        gid = _generation_in(db, _project(db, tenant.id), "generating").id
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with prod_app.app_context():
                generated = db.session.get(GeneratedProject, gid)
                for i in range(25):
                    projects.add_file(generated, f"w{n}/file{i}.txt", "x" * (n + i + 1))
                    db.session.commit()
                    if i % 3 == 0:  # and delete some again
                        victim = db.session.scalar(
                            select(ProjectFile).where(
                                ProjectFile.generated_project_id == gid,
                                ProjectFile.path == f"w{n}/file{i}.txt",
                            )
                        )
                        db.session.delete(victim)
                        db.session.commit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    with prod_app.app_context():
        generated = db.session.get(GeneratedProject, gid)
        count, size = db.session.execute(
            select(func.count(), func.coalesce(func.sum(ProjectFile.file_size), 0)).where(
                ProjectFile.generated_project_id == gid
            )
        ).one()
        assert (generated.total_files, generated.total_size) == (count, size)
        assert count == 8 * (25 - 9)
        assert projects.recount(fix=False) == []


@pytest.mark.parametrize(
    "path",
    ["../evil.py", "/etc/passwd", "a/../../b.txt", "C:\\windows\\x", "..", "./", "a/\x00b", ""],
)
def test_paths_escaping_the_project_are_refused(path):
    with pytest.raises(PathError):
        projects.clean_path(path)


def test_limits_are_checked_before_anything_is_stored():
    ok = [{"path": "a.txt", "content": "x"}]
    assert projects.validate_files(ok, max_files=1, max_file_bytes=10, max_total_bytes=10)
    with pytest.raises(PathError, match="limit"):
        projects.validate_files(ok * 2, max_files=1, max_file_bytes=10, max_total_bytes=10)
    with pytest.raises(PathError, match="bytes"):
        projects.validate_files(
            [{"path": "a", "content": "x" * 11}],
            max_files=5,
            max_file_bytes=10,
            max_total_bytes=100,
        )
    with pytest.raises(PathError, match="twice"):
        projects.validate_files(
            [{"path": "a", "content": ""}, {"path": "./a", "content": ""}],
            max_files=5,
            max_file_bytes=10,
            max_total_bytes=100,
        )


def test_offline_generation_completes_with_a_real_project(app, db, worker, factory):
    tenant = factory.tenant()
    project = _project(db, tenant.id)
    generated = projects.start_generation(project, "A notes API")
    db.session.commit()
    app.extensions["switchboard.tasks"].send("generate_project", generated.id)
    drain(app)
    db.session.expire_all()
    done = db.session.get(GeneratedProject, generated.id)
    assert done.status == "completed" and done.total_files >= 5
    paths = db.session.scalars(
        select(ProjectFile.path).where(ProjectFile.generated_project_id == done.id)
    ).all()
    assert "README.md" in paths and "pyproject.toml" in paths


def test_status_changes_notify_the_projects_members(app, db, worker, factory):
    from models.notifications import Notification

    tenant = factory.tenant()
    creator = factory.user(tenant, role="agent")
    outsider = factory.user(factory.tenant(), role="admin")
    project = _project(db, tenant.id)
    project.created_by_id = creator.id
    db.session.commit()
    ok = projects.start_generation(project, "A notes API")
    db.session.commit()
    app.extensions["switchboard.tasks"].send("generate_project", ok.id)
    broken = _generation_in(db, project, "generating")
    projects.transition(broken.id, "failed", error="the model gave up")
    db.session.commit()
    drain(app)
    db.session.expire_all()
    mine = db.session.scalars(
        select(Notification).where(Notification.recipient_id == creator.id)
    ).all()
    kinds = sorted(n.type for n in mine)
    assert kinds.count("generation_started") == 2
    assert "generation_completed" in kinds and "generation_failed" in kinds
    failed = next(n for n in mine if n.type == "generation_failed")
    assert "the model gave up" in failed.body
    assert all(n.link == f"/projects/{project.id}" for n in mine)
    assert not db.session.scalars(
        select(Notification).where(Notification.recipient_id == outsider.id)
    ).all()


@pytest.fixture
def model_server(app):
    fake = FakeOpenAI(Script()).start()
    app.config.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="k")
    yield fake
    fake.stop()


def test_generation_from_the_model_and_a_malicious_answer(app, db, worker, factory, model_server):
    tenant = factory.tenant()
    project = _project(db, tenant.id)
    model_server.script.json_reply = json.dumps(
        {
            "files": [
                {"path": "main.py", "content": "print('hi')\n"},
                {"path": "docs/README.md", "content": "# Hi\n"},
            ]
        }
    )
    good = projects.start_generation(project, "hello world")
    db.session.commit()
    app.extensions["switchboard.tasks"].send("generate_project", good.id)
    drain(app)
    sent = model_server.records[-1].body
    assert sent["response_format"]["type"] == "json_schema"
    db.session.expire_all()
    assert db.session.get(GeneratedProject, good.id).status == "completed"
    assert db.session.get(GeneratedProject, good.id).total_files == 2

    model_server.script.json_reply = json.dumps(
        {"files": [{"path": "ok.py", "content": ""}, {"path": "../../etc/cron.d/x", "content": ""}]}
    )
    bad = projects.start_generation(project, "escape please")
    db.session.commit()
    app.extensions["switchboard.tasks"].send("generate_project", bad.id)
    drain(app)
    db.session.expire_all()
    failed = db.session.get(GeneratedProject, bad.id)
    assert failed.status == "failed" and "leaves the project" in failed.error
    assert failed.total_files == 0  # nothing was stored


def _completed_with_files(db, tenant_id: int) -> GeneratedProject:
    generated = _generation_in(db, _project(db, tenant_id, "Exported"), "generating")
    projects.add_file(generated, "README.md", "# Exported\n")
    projects.add_file(generated, "src/app.py", "print('ünïcode ok')\n")
    db.session.commit()
    projects.transition(generated.id, "completed")
    db.session.commit()
    return generated


def test_zip_and_git_exports_open_with_standard_tools(app, db, factory, tmp_path):
    tenant = factory.tenant()
    generated = _completed_with_files(db, tenant.id)
    stored = {"README.md": "# Exported\n", "src/app.py": "print('ünïcode ok')\n"}

    zip_export = exports.request_export(generated, "zip", None)
    db.session.commit()
    zip_export = exports.build(zip_export.id)
    assert zip_export.status == "completed"
    with zipfile.ZipFile(exports.exports_dir() / zip_export.artifact) as archive:
        assert {n: archive.read(n).decode() for n in archive.namelist()} == {
            f"exported/{path}": content for path, content in stored.items()
        }

    git_export = exports.request_export(generated, "git", None)
    db.session.commit()
    git_export = exports.build(git_export.id)
    assert git_export.status == "completed"
    clone = tmp_path / "clone"
    subprocess.run(
        ["git", "clone", "-q", str(exports.exports_dir() / git_export.artifact), str(clone)],
        check=True,
    )
    files = {
        str(p.relative_to(clone)): p.read_text()
        for p in clone.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(clone).parts
    }
    assert files == stored
    log = subprocess.run(
        ["git", "-C", str(clone), "log", "--oneline"], capture_output=True, text=True, check=True
    )
    assert len(log.stdout.strip().splitlines()) == 1
    topics = db.session.scalars(select(OutboxEvent.topic)).all()
    assert topics.count("project.export_completed") == 2


def test_export_of_an_unfinished_generation_is_refused(db, factory):
    tenant = factory.tenant()
    generated = _generation_in(db, _project(db, tenant.id), "generating")
    with pytest.raises(exports.ExportError):
        exports.request_export(generated, "zip", None)


def test_project_pages_generate_export_download_and_isolation(app, db, client, worker, factory):
    tenant = factory.tenant()
    user = factory.user(tenant)
    login(client, user)
    token = csrf_token_from(client.get("/projects/").data)
    response = client.post("/projects/", data={"name": "Shop API", "csrf_token": token})
    assert response.status_code == 303
    project = db.session.scalar(select(Project).where(Project.name == "Shop API"))
    assert project.created_by_id == user.id
    response = client.post(
        f"/projects/{project.id}/generate", data={"prompt": "A shop API", "csrf_token": token}
    )
    assert response.status_code == 303
    drain(app)
    generated = db.session.scalar(
        select(GeneratedProject).where(GeneratedProject.project_id == project.id)
    )
    db.session.refresh(generated)
    assert generated.status == "completed"
    page = client.get(f"/projects/{project.id}").get_data(as_text=True)
    assert "README.md" in page and 'data-status="completed"' in page

    file = db.session.scalar(select(ProjectFile).where(ProjectFile.path.like("%routes.py")))
    view = client.get(f"/projects/files/{file.id}").get_data(as_text=True)
    assert 'class="hl' in view and "Blueprint" in view

    client.post(
        f"/projects/generations/{generated.id}/export", data={"format": "zip", "csrf_token": token}
    )
    drain(app)
    export = db.session.scalar(select(exports.RepositoryExport))
    db.session.refresh(export)
    download = client.get(f"/projects/exports/{export.id}/download")
    assert download.status_code == 200
    assert "attachment" in download.headers["Content-Disposition"]
    names = zipfile.ZipFile(io.BytesIO(download.data)).namelist()
    assert "shop-api/README.md" in names
    download.close()

    stranger = app.test_client()
    login(stranger, factory.user(factory.tenant()))
    assert stranger.get(f"/projects/{project.id}").status_code == 404
    assert stranger.get(f"/projects/files/{file.id}").status_code == 404
    assert stranger.get(f"/projects/exports/{export.id}/download").status_code == 404

    archive = client.post(
        f"/projects/generations/{generated.id}/archive", data={"csrf_token": token}
    )
    assert archive.status_code == 303
    again = client.post(
        f"/projects/generations/{generated.id}/archive",
        data={"csrf_token": token},
        follow_redirects=True,
    )
    assert b"cannot become archived" in again.data


def test_recount_repairs_drift(app, db, runner, factory):
    tenant = factory.tenant()
    generated = _completed_with_files(db, tenant.id)
    db.session.execute(
        GeneratedProject.__table__.update()
        .where(GeneratedProject.id == generated.id)
        .values(total_files=9, total_size=1)
    )
    db.session.commit()
    result = runner.invoke(args=["projects", "recount"])
    assert f"generation #{generated.id}: files 9 → 2" in result.output
    db.session.expire_all()
    assert db.session.get(GeneratedProject, generated.id).total_files == 2
    assert "All totals are exact." in runner.invoke(args=["projects", "recount"]).output
