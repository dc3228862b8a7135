"""Exports never run or write anything the model chose (issue 17, section 1).

A model's answer is attacker-controlled: its paths and contents must not reach git's
configuration, hooks, attributes or another repository, neither through validation gaps nor
through rows that reach the database some other way; and the user who asked for an export hears
when it is ready.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import tempfile
import uuid
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import select

from models.projects import GeneratedProject, Project, ProjectFile, RepositoryExport
from services import exports, projects
from services.projects import PathError
from tests.conftest import csrf_token_from, drain, login
from tests.fake_openai import FakeOpenAI, Script

LIMITS = {"max_files": 50, "max_file_bytes": 10_000, "max_total_bytes": 100_000}


@pytest.fixture(autouse=True)
def private_exports_dir(app, tmp_path):
    """Each test's artifacts in its own folder, not the shared instance/exports."""
    app.config["EXPORTS_DIR"] = str(tmp_path / "exports")


def sandboxed_git_env(home: Path) -> dict[str, str]:
    """How the tests run git themselves: nothing from the machine's or anyone's config."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_TERMINAL_PROMPT": "0",
        "LC_ALL": "C",
    }


def _project(db, tenant_id: int, name: str = "Demo", created_by_id: int | None = None) -> Project:
    project = Project(tenant_id=tenant_id, name=name, created_by_id=created_by_id)
    db.session.add(project)
    db.session.commit()
    return project


def _completed_with_rows(db, project: Project, files: dict[str, str]) -> GeneratedProject:
    """A completed generation whose file rows are inserted directly, as if validation had
    been bypassed (an older release, a bug, a manual insert)."""
    generated = projects.start_generation(project, "rows inserted directly")
    db.session.commit()
    projects.transition(generated.id, "generating")
    db.session.commit()
    for path, content in files.items():
        db.session.add(
            ProjectFile(
                tenant_id=project.tenant_id,
                generated_project_id=generated.id,
                path=path,
                content=content,
                file_size=len(content.encode()),
            )
        )
    db.session.commit()
    projects.transition(generated.id, "completed")
    db.session.commit()
    return db.session.get(GeneratedProject, generated.id)


def _export(db, generated: GeneratedProject, fmt: str) -> RepositoryExport:
    row = exports.request_export(generated, fmt, None)
    db.session.commit()
    return exports.build(row.id)


def _real_repository(path: Path, env: dict[str, str]) -> str:
    """Another git repository on the server, with one commit; returns its HEAD."""
    path.mkdir()
    (path / "keep.txt").write_text("precious\n")
    commit_env = {
        **env,
        "GIT_AUTHOR_NAME": "Other",
        "GIT_AUTHOR_EMAIL": "other@example.com",
        "GIT_COMMITTER_NAME": "Other",
        "GIT_COMMITTER_EMAIL": "other@example.com",
    }
    for args in (["init", "-q", "-b", "main"], ["add", "keep.txt"], ["commit", "-q", "-m", "x"]):
        subprocess.run(["git", *args], cwd=path, env=commit_env, check=True, capture_output=True)
    return _head(path, env)


def _head(repo: Path, env: dict[str, str]) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


# ---------------------------------------------------------------- validation


GIT_PATHS = [
    ".git/config",
    "sub/.GIT/hooks/post-commit",
    ".git",
    ".Git",
    "src/.gIt",
    ".git./config",  # Windows drops trailing dots and spaces
    ".git /config",
    "git~1/config",  # the 8.3 short name of .git on Windows
    ".g\u200cit/config",  # macOS ignores zero-width joiners in names
]


@pytest.mark.parametrize("path", GIT_PATHS)
def test_validation_refuses_any_git_component_by_name(path):
    files = [{"path": "README.md", "content": "hi\n"}, {"path": path, "content": "x"}]
    with pytest.raises(PathError) as refused:
        projects.validate_files(files, **LIMITS)
    assert repr(path) in str(refused.value) and ".git" in str(refused.value)


def test_validation_keeps_ordinary_git_files():
    """.gitignore, .gitattributes and .gitmodules are ordinary files in a repository's tree."""
    files = [
        {"path": ".gitignore", "content": ".venv/\n"},
        {"path": ".gitattributes", "content": "* text=auto\n"},
        {"path": ".gitmodules", "content": ""},
        {"path": "docs/.github/workflow.yml", "content": "on: push\n"},
        {"path": "digit/file", "content": ""},
    ]
    assert len(projects.validate_files(files, **LIMITS)) == 5


@pytest.mark.parametrize("order", ["file first", "folder first"])
def test_validation_refuses_a_file_and_a_folder_of_the_same_name(order):
    files = [{"path": "a", "content": "file"}, {"path": "a/b", "content": "in a folder"}]
    if order == "folder first":
        files.reverse()
    with pytest.raises(PathError, match=r"both a file and a folder") as refused:
        projects.validate_files(files, **LIMITS)
    assert "'a'" in str(refused.value) or " a " in str(refused.value)


def test_validation_refuses_a_file_inside_a_deeper_file():
    files = [{"path": "x/y", "content": ""}, {"path": "x/y/z/w.txt", "content": ""}]
    with pytest.raises(PathError, match=r"both a file and a folder"):
        projects.validate_files(files, **LIMITS)


def test_validation_refuses_nul_and_invalid_text_in_content():
    with pytest.raises(PathError, match=r"bin\.dat.*NUL"):
        projects.validate_files([{"path": "bin.dat", "content": "a\x00b"}], **LIMITS)
    with pytest.raises(PathError, match=r"half\.txt.*not valid text"):
        projects.validate_files([{"path": "half.txt", "content": "\ud800"}], **LIMITS)


# ---------------------------------------------------------------- the real generation path


@pytest.fixture
def model_server(app):
    fake = FakeOpenAI(Script()).start()
    app.config.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="k")
    yield fake
    fake.stop()


def _generate(app, db, project: Project, answer: dict, model_server) -> GeneratedProject:
    model_server.script.json_reply = json.dumps(answer)
    generated = projects.start_generation(project, "make me a repository")
    db.session.commit()
    app.extensions["switchboard.tasks"].send("generate_project", generated.id)
    drain(app)
    db.session.expire_all()
    return db.session.get(GeneratedProject, generated.id)


@pytest.mark.parametrize(
    "path", [".git/config", "sub/.GIT/hooks/x", ".git", ".Git", "src/.git/HEAD"]
)
def test_a_generation_with_a_git_path_fails_and_stores_nothing(
    app, db, worker, factory, model_server, path
):
    project = _project(db, factory.tenant().id)
    answer = {
        "files": [
            {"path": "README.md", "content": "# hi\n"},
            {"path": path, "content": 'gitdir: /srv/other/.git\n[core]\n\tfsmonitor = "touch x"\n'},
        ]
    }
    generated = _generate(app, db, project, answer, model_server)
    assert generated.status == "failed"
    assert path in generated.error and ".git" in generated.error
    assert generated.total_files == 0
    stored = db.session.scalars(
        select(ProjectFile).where(ProjectFile.generated_project_id == generated.id)
    ).all()
    assert stored == []


def test_a_generation_with_a_file_and_folder_clash_or_nul_fails_clearly(
    app, db, worker, factory, model_server
):
    project = _project(db, factory.tenant().id)
    clash = _generate(
        app,
        db,
        project,
        {"files": [{"path": "pkg/a", "content": ""}, {"path": "pkg", "content": ""}]},
        model_server,
    )
    assert clash.status == "failed" and "both a file and a folder" in clash.error
    assert clash.total_files == 0
    nul = _generate(
        app,
        db,
        project,
        {"files": [{"path": "ok.txt", "content": "x"}, {"path": "b.bin", "content": "a\x00b"}]},
        model_server,
    )
    assert nul.status == "failed" and "b.bin" in nul.error and "NUL" in nul.error
    assert nul.total_files == 0


@pytest.fixture
def pg_model_server(prod_app):
    fake = FakeOpenAI(Script()).start()
    prod_app.config.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="k")
    yield fake
    fake.stop()


SECRET_CONTENT = "SECRET-CONTENT-\x00-do-not-echo"


def _pg_generation(prod_app, prod_factory, pg_model_server):
    from extensions import db
    from tasks.projects import generate_project

    tenant = prod_factory.tenant()
    pg_model_server.script.json_reply = json.dumps(
        {
            "files": [
                {"path": "ok.txt", "content": "fine\n"},
                {"path": "blob.bin", "content": SECRET_CONTENT},
            ]
        }
    )
    with prod_app.app_context():
        project = _project(db, tenant.id)
        gid = projects.start_generation(project, "nul please").id
        db.session.commit()
        # The actor itself, called in process: the worker's code path, without retries.
        generate_project(gid)
        db.session.expire_all()
        generated = db.session.get(GeneratedProject, gid)
        stored = db.session.scalars(
            select(ProjectFile.path).where(ProjectFile.generated_project_id == gid)
        ).all()
        return generated.status, generated.error, generated.total_files, stored


def test_nul_content_on_postgres_fails_with_a_clear_reason(prod_app, prod_factory, pg_model_server):
    status, error, total_files, stored = _pg_generation(prod_app, prod_factory, pg_model_server)
    assert status == "failed"
    assert "blob.bin" in error and "NUL" in error
    assert "SECRET-CONTENT" not in error and "INSERT" not in error and "SQL" not in error
    assert (total_files, stored) == (0, [])


def test_a_database_error_is_stored_as_a_short_reason_without_content(
    prod_app, prod_factory, pg_model_server, monkeypatch
):
    """Were validation ever to miss something, PostgreSQL's error (which quotes the SQL and
    the file content) is not what the user sees, and no half of the files stays behind."""

    def unchecked(files, **limits):
        return [projects.FileSpec(f["path"], f["content"]) for f in files]

    monkeypatch.setattr(projects, "validate_files", unchecked)
    status, error, total_files, stored = _pg_generation(prod_app, prod_factory, pg_model_server)
    assert status == "failed"
    assert "SECRET-CONTENT" not in error and "INSERT" not in error and "[SQL" not in error
    assert len(error) < 200
    assert (total_files, stored) == (0, [])


# ---------------------------------------------------------------- exports of hostile rows


def _no_marker_ever(marker: Path) -> None:
    assert not marker.exists(), f"the export ran a command chosen by the model ({marker})"


@pytest.mark.parametrize("fmt", ["git", "zip"])
def test_export_refuses_git_config_rows_and_runs_nothing(app, db, factory, tmp_path, fmt):
    marker = tmp_path / f"marker-{uuid.uuid4().hex}"
    hook = f"#!/bin/sh\ntouch {marker}\n"
    rows = {
        ".git/config": (
            "[core]\n"
            "\trepositoryformatversion = 0\n"
            "\tbare = false\n"
            f'\tfsmonitor = "touch {marker}"\n'
            f"\thooksPath = .git/hooks\n"
            '[filter "x"]\n'
            f"\tclean = touch {marker}\n"
            f"\tsmudge = touch {marker}\n"
        ),
        ".gitattributes": "* filter=x\n",
        ".git/hooks/pre-commit": hook,
        ".git/hooks/post-commit": hook,
        "README.md": "# hostile\n",
    }
    generated = _completed_with_rows(db, _project(db, factory.tenant().id), rows)
    export = _export(db, generated, fmt)
    _no_marker_ever(marker)
    assert export.status == "failed"
    assert ".git/config" in export.error
    assert list(exports.exports_dir().glob(f"export-{export.id}.*")) == []


@pytest.mark.parametrize("name", [".git", "sub/.GIT"])
def test_git_export_never_commits_into_another_repository(app, db, factory, tmp_path, name):
    env = sandboxed_git_env(tmp_path / "home")
    other = tmp_path / "other"
    before = _real_repository(other, env)
    rows = {name: f"gitdir: {other / '.git'}\n", "README.md": "# hi\n", "evil.txt": "x\n"}
    generated = _completed_with_rows(db, _project(db, factory.tenant().id), rows)
    export = _export(db, generated, "git")
    assert _head(other, env) == before
    log = subprocess.run(
        ["git", "-C", str(other), "log", "--all", "--oneline"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert len(log.stdout.splitlines()) == 1
    status = subprocess.run(
        ["git", "-C", str(other), "status", "--porcelain"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert status.stdout == ""
    assert export.status == "failed" and name in export.error


@pytest.mark.parametrize("fmt", ["git", "zip"])
def test_export_refuses_a_file_and_folder_clash_with_a_clear_reason(app, db, factory, fmt):
    rows = {"a": "file\n", "a/b": "inside\n"}
    generated = _completed_with_rows(db, _project(db, factory.tenant().id), rows)
    export = _export(db, generated, fmt)
    assert export.status == "failed"
    assert "both a file and a folder" in export.error
    assert tempfile.gettempdir() not in export.error


def _plant_config(path: Path, marker: Path, hooks: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[core]\n"
        f'\tfsmonitor = "touch {marker}"\n'
        f"\thooksPath = {hooks}\n"
        '[filter "x"]\n'
        f"\tclean = touch {marker}\n"
        f"\tsmudge = touch {marker}\n"
        "\trequired = true\n"
        "[alias]\n"
        f'\tbundle = "!touch {marker}"\n'
    )


@pytest.mark.parametrize(
    "where", ["shared temp dir", "HOME", "XDG_CONFIG_HOME", "GIT_CONFIG_GLOBAL", "GIT_CONFIG_COUNT"]
)
def test_git_export_ignores_every_config_but_its_own(
    app, db, factory, tmp_path, monkeypatch, where
):
    """A local user's .gitconfig in the shared temp dir (or the worker's own config and
    environment) must not make the export run filters, hooks or fsmonitor commands."""
    marker = tmp_path / f"marker-{uuid.uuid4().hex}"
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    for name in ("pre-commit", "post-commit", "commit-msg", "reference-transaction"):
        hook = hooks / name
        hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
        hook.chmod(0o755)
    # A shared temp directory of this test's own: never plant config in the real /tmp.
    shared_tmp = tmp_path / "shared-tmp"
    shared_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    if where == "shared temp dir":
        _plant_config(shared_tmp / ".gitconfig", marker, hooks)
    elif where == "HOME":
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        _plant_config(tmp_path / "home" / ".gitconfig", marker, hooks)
    elif where == "XDG_CONFIG_HOME":
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
        _plant_config(tmp_path / "xdg" / "git" / "config", marker, hooks)
    elif where == "GIT_CONFIG_GLOBAL":
        _plant_config(tmp_path / "global", marker, hooks)
        monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "global"))
    else:
        monkeypatch.setenv("GIT_CONFIG_COUNT", "2")
        monkeypatch.setenv("GIT_CONFIG_KEY_0", "core.hooksPath")
        monkeypatch.setenv("GIT_CONFIG_VALUE_0", str(hooks))
        monkeypatch.setenv("GIT_CONFIG_KEY_1", "filter.x.clean")
        monkeypatch.setenv("GIT_CONFIG_VALUE_1", f"touch {marker}")
    rows = {".gitattributes": "* filter=x\n", "README.md": "# ordinary\n", "src/a.py": "a = 1\n"}
    generated = _completed_with_rows(db, _project(db, factory.tenant().id), rows)
    export = _export(db, generated, "git")
    _no_marker_ever(marker)
    assert export.status == "completed", export.error
    clone = _clone(exports.exports_dir() / export.artifact, tmp_path / "clone", tmp_path)
    assert _checked_out(clone) == rows


def _clone(bundle: Path, dest: Path, tmp_path: Path) -> Path:
    subprocess.run(
        ["git", "clone", "-q", str(bundle), str(dest)],
        env=sandboxed_git_env(tmp_path / "clone-home"),
        check=True,
        capture_output=True,
    )
    return dest


def _checked_out(clone: Path) -> dict[str, str]:
    return {
        p.relative_to(clone).as_posix(): p.read_text(encoding="utf-8")
        for p in clone.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(clone).parts
    }


def test_git_bundle_clones_to_exactly_the_stored_files(app, db, factory, tmp_path):
    rows = {
        "README.md": "# Exported\n",
        "src/app.py": "print('ünïcode ok')\n",
        "src/deep/er/x.txt": "",
        "with space.txt": "spaces\n",
        '"quoted".txt': "quotes\n",
        "crlf.txt": "a\r\nb\r\n",
        ".gitattributes": "*.txt text eol=crlf\n",
        "run.sh": "#!/bin/sh\necho hi\n",
    }
    generated = _completed_with_rows(db, _project(db, factory.tenant().id), rows)
    export = _export(db, generated, "git")
    assert export.status == "completed", export.error
    env = sandboxed_git_env(tmp_path / "inspect-home")
    bundle = exports.exports_dir() / export.artifact
    clone = tmp_path / "clone"
    subprocess.run(
        ["git", "clone", "-q", "--no-checkout", str(bundle), str(clone)],
        env=env,
        check=True,
        capture_output=True,
    )
    # Compare the committed blobs byte for byte (a checkout would apply the eol attribute).
    tree = subprocess.run(
        ["git", "-C", str(clone), "ls-tree", "-r", "-z", "HEAD"],
        env=env,
        check=True,
        capture_output=True,
    ).stdout.decode()
    entries = [line for line in tree.split("\0") if line]
    committed = {}
    for entry in entries:
        meta, path = entry.split("\t", 1)
        mode, kind, sha = meta.split()
        assert (mode, kind) == ("100644", "blob")
        committed[path] = subprocess.run(
            ["git", "-C", str(clone), "cat-file", "blob", sha],
            env=env,
            check=True,
            capture_output=True,
        ).stdout.decode()
    assert committed == rows
    branch = subprocess.run(
        ["git", "-C", str(clone), "rev-parse", "--abbrev-ref", "HEAD"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert branch == "main"
    count = subprocess.run(
        ["git", "-C", str(clone), "rev-list", "--count", "HEAD"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert count == "1"
    fsck = subprocess.run(
        ["git", "-C", str(clone), "fsck", "--strict"], env=env, capture_output=True, text=True
    )
    assert fsck.returncode == 0, fsck.stderr


# ---------------------------------------------------------------- zip layout


@pytest.mark.parametrize(
    ("name", "folder"),
    [
        ("Shop API", "shop-api"),
        ("Café ☕ / ../etc", "cafe-etc"),
        (".git", "git"),
        ("../..", None),
        ("☕☕", None),
    ],
)
def test_zip_has_one_project_folder_and_regular_modes(app, db, factory, name, folder):
    project = _project(db, factory.tenant().id, name=name)
    rows = {"README.md": "# hi\n", "src/app.py": "x = 1\n", "bin/run.sh": "#!/bin/sh\n"}
    generated = _completed_with_rows(db, project, rows)
    export = _export(db, generated, "zip")
    assert export.status == "completed", export.error
    folder = folder or f"project-{project.id}"
    with zipfile.ZipFile(exports.exports_dir() / export.artifact) as archive:
        infos = archive.infolist()
        assert {i.filename: archive.read(i).decode() for i in infos} == {
            f"{folder}/{path}": content for path, content in rows.items()
        }
        for info in infos:
            mode = info.external_attr >> 16
            assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o644, oct(mode)
            assert info.create_system == 3  # Unix, so unzip applies the mode


# ---------------------------------------------------------------- who hears about it


def test_the_agent_who_requested_an_export_is_notified(app, db, client, worker, factory):
    from models.notifications import Notification

    tenant = factory.tenant()
    creator = factory.user(tenant, role="agent")
    requester = factory.user(tenant, role="agent")
    project = _project(db, tenant.id, name="Notified", created_by_id=creator.id)
    generated = _completed_with_rows(db, project, {"README.md": "# hi\n"})
    hostile = _completed_with_rows(db, project, {".git/config": "[core]\n"})
    login(client, requester)
    token = csrf_token_from(client.get(f"/projects/{project.id}").data)
    for target, fmt in ((generated, "zip"), (hostile, "git")):
        response = client.post(
            f"/projects/generations/{target.id}/export",
            data={"format": fmt, "csrf_token": token},
        )
        assert response.status_code == 303
    drain(app)
    db.session.expire_all()
    titles = db.session.scalars(
        select(Notification.title).where(Notification.recipient_id == requester.id)
    ).all()
    assert any(t.startswith("Export ready") for t in titles), titles
    assert any(t.startswith("Export failed") for t in titles), titles
    # The creator still hears too.
    creator_titles = db.session.scalars(
        select(Notification.title).where(Notification.recipient_id == creator.id)
    ).all()
    assert any(t.startswith("Export ready") for t in creator_titles)
    page = client.get(f"/projects/{project.id}").get_data(as_text=True)
    assert ".git/config" in page  # the failed export says why


def test_downloaded_zip_opens_under_the_project_folder(app, db, client, worker, factory):
    tenant = factory.tenant()
    user = factory.user(tenant, role="agent")
    project = _project(db, tenant.id, name="Field Kit")
    generated = _completed_with_rows(db, project, {"README.md": "# hi\n"})
    login(client, user)
    token = csrf_token_from(client.get(f"/projects/{project.id}").data)
    client.post(
        f"/projects/generations/{generated.id}/export", data={"format": "zip", "csrf_token": token}
    )
    drain(app)
    export = db.session.scalar(select(RepositoryExport))
    db.session.refresh(export)
    download = client.get(f"/projects/exports/{export.id}/download")
    assert download.status_code == 200
    assert zipfile.ZipFile(io.BytesIO(download.data)).namelist() == ["field-kit/README.md"]
    download.close()
