"""Production supervision: the shipped supervisord configuration runs the Procfile's processes,
and a `dramatiq` worker process killed with -9 costs a restart of that program only — the web
keeps answering and every event is handled.

`dramatiq` ends all its worker processes and exits when one of them dies, leaving the restart
to its supervisor (dramatiq/cli.py, "exited unexpectedly ... Shutting down"); under `honcho
start` that exit stops web and assistant too, which is why honcho is for development only."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import xmlrpc.client
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

import tests.spine_handlers  # noqa: F401 - registers the test_counter handler
from events import emit
from models.devices import ActivityLog
from tests.conftest import free_port
from tests.helpers import wait_for, worker_process_env

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS_CONF = ROOT / "deploy" / "supervisor" / "switchboard.conf"
VENV_BIN = Path(sys.executable).parent


def procfile_process_types() -> list[str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return [line.split(":", 1)[0].strip() for line in lines if ":" in line and line[:1] != "#"]


def children_of(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited while we looked
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state
        if parent == pid:
            children.append(int(entry.name))
    return children


class Supervisord:
    """supervisord running the shipped program definitions, with its socket, pid file and logs
    in a private folder, so runs never meet each other or a real deployment."""

    def __init__(self, env: dict[str, str]) -> None:
        # A short path of its own: a unix socket path may not exceed ~100 bytes.
        self.run_dir = Path(tempfile.mkdtemp(prefix="sb-supervise-"))
        self.socket = self.run_dir / "supervisor.sock"
        self.config = self.run_dir / "supervisord.conf"
        self.config.write_text(
            f"[supervisord]\n"
            f"logfile={self.run_dir}/supervisord.log\n"
            f"pidfile={self.run_dir}/supervisord.pid\n"
            f"childlogdir={self.run_dir}\n"
            f"[unix_http_server]\nfile={self.socket}\nchmod=0700\n"
            f"[rpcinterface:supervisor]\n"
            f"supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
            f"[include]\nfiles = {PROGRAMS_CONF}\n"
        )
        self.env = env
        self.process: subprocess.Popen | None = None
        self.program_pids: set[int] = set()

    def start(self) -> Supervisord:
        self.process = subprocess.Popen(
            [str(VENV_BIN / "supervisord"), "--nodaemon", "--configuration", str(self.config)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        return self

    def programs(self) -> dict[str, dict]:
        """name -> supervisord's process info (statename, pid, start, ...); {} until it answers."""
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        try:
            infos = xmlrpc.client.ServerProxy(
                "http://127.0.0.1", transport=transport
            ).supervisor.getAllProcessInfo()
        except (OSError, xmlrpc.client.Fault):
            return {}
        finally:
            transport.close()
        self.program_pids |= {info["pid"] for info in infos if info["pid"]}
        return {info["name"]: info for info in infos}

    def all_running(self, names) -> bool:
        programs = self.programs()
        return all(programs.get(name, {}).get("statename") == "RUNNING" for name in names)

    def logs(self) -> str:
        """The tail of every log, for a failure message."""
        parts = []
        for log in sorted(self.run_dir.glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop supervisord and its programs; kill whatever lingers, each program's process
        group included (supervisord gives every program a group of its own)."""
        if self.process is None:
            return
        self.programs()  # learn the latest pids while supervisord still answers
        if self.process.poll() is None:
            self.process.terminate()  # supervisord stops its programs, then exits
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.program_pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # stopped already, as it should have
                pass
        shutil.rmtree(self.run_dir, ignore_errors=True)


class HealthWatch:
    """Asks /healthz again and again in a thread, counting answers and failures."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with requests.Session() as http:
            while not self._stop.is_set():
                try:
                    response = http.get(self.url, timeout=5)
                    if response.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"HTTP {response.status_code}")
                except requests.RequestException as exc:
                    self.failures.append(type(exc).__name__)
                self._stop.wait(0.05)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _healthy(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_worker_killed_with_sigkill_is_restarted_and_nothing_else_stops(
    prod_app, prod_factory, tmp_path
):
    from extensions import db

    port = free_port()
    env = worker_process_env(
        prod_app,
        tmp_path / "instance",
        EXTRA_ACTOR_MODULES="tests.spine_handlers",
        PORT=str(port),
        # Small, so three programs boot quickly on a shared machine.
        WEB_CONCURRENCY="1",
        WEB_THREADS="8",
        WORKER_PROCESSES="1",
        WORKER_THREADS="2",
        ASSISTANT_THREADS="2",
    )
    healthz = f"http://127.0.0.1:{port}/healthz"
    tenant = prod_factory.tenant()
    names = procfile_process_types()

    def emit_counted(numbers) -> None:
        for n in numbers:
            emit("test.counted", tenant_id=tenant.id, payload={"n": n})
        db.session.commit()

    def handled() -> list[str]:
        db.session.rollback()
        return db.session.scalars(
            select(ActivityLog.summary).where(ActivityLog.tenant_id == tenant.id)
        ).all()

    supervisor = Supervisord(env).start()
    try:
        with prod_app.app_context():
            assert wait_for(lambda: supervisor.all_running(names), timeout=25), supervisor.logs()
            # "Running" is five seconds up; booting the app (every template compiled at start)
            # took three programs up to 16 s on a slow 2-core host while other tests ran. This
            # test is about restarts, not boot time: the first answers may take that long.
            assert wait_for(lambda: _healthy(healthz), timeout=40), supervisor.logs()

            emit_counted(range(1, 6))
            assert wait_for(lambda: len(handled()) == 5, timeout=40), supervisor.logs()

            before = supervisor.programs()
            worker_master = before["worker"]["pid"]
            worker_processes = children_of(worker_master)
            assert worker_processes, "dramatiq started no worker process"

            with HealthWatch(healthz) as health:
                os.kill(worker_processes[0], signal.SIGKILL)
                emit_counted(range(6, 11))  # committed as dramatiq goes down and restarts

                def worker_restarted() -> bool:
                    worker = supervisor.programs().get("worker", {})
                    return worker.get("statename") == "RUNNING" and worker["pid"] != worker_master

                assert wait_for(worker_restarted, timeout=25), supervisor.logs()
                emit_counted(range(11, 16))
                assert wait_for(lambda: len(handled()) >= 15, timeout=15), (
                    sorted(handled()),
                    supervisor.logs(),
                )

            assert sorted(handled()) == sorted(f"counted {n}" for n in range(1, 16))
            assert health.failures == [] and health.ok > 10, (health.failures, health.ok)
            after = supervisor.programs()
            for name in names:
                if name != "worker":  # the others were never stopped
                    assert (after[name]["pid"], after[name]["start"]) == (
                        before[name]["pid"],
                        before[name]["start"],
                    ), name
            assert not Path(f"/proc/{worker_master}").exists()  # dramatiq did exit, as designed
    finally:
        supervisor.stop()


def test_every_procfile_process_has_a_supervised_program():
    """The stand-alone deploy/supervisord.conf loads the program definitions, and a process type
    added to the Procfile without a program (or a systemd instance) fails here."""
    from supervisor.options import ServerOptions

    options = ServerOptions()
    options.configfile = str(ROOT / "deploy" / "supervisord.conf")
    options.process_config(do_usage=False)
    assert options.parse_warnings == [] and options.parse_criticals == []
    programs = {
        program.name: program
        for group in options.process_group_configs
        for program in group.process_configs
    }
    names = procfile_process_types()
    assert sorted(programs) == sorted(names)
    for name, program in programs.items():
        assert program.command.endswith(f"scripts/procfile_run.py {name}")
        assert Path(program.directory).resolve() == ROOT

    target = (ROOT / "deploy" / "systemd" / "switchboard.target").read_text()
    wanted = next(line for line in target.splitlines() if line.startswith("Wants="))
    assert sorted(wanted.removeprefix("Wants=").split()) == sorted(
        f"switchboard@{name}.service" for name in names
    )


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    """The units as installed for a checkout at this path: systemd rejects unknown keys and an
    ExecStart that is not there."""
    for unit in ("switchboard@.service", "switchboard.target"):
        text = (ROOT / "deploy" / "systemd" / unit).read_text()
        text = text.replace("/srv/switchboard", str(ROOT))
        text = text.replace("User=switchboard", "User=root").replace("Group=switchboard", "")
        (tmp_path / unit).write_text(text)
    units = [f"switchboard@{name}.service" for name in procfile_process_types()]
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units, "switchboard.target"],
        cwd=tmp_path,
        env=dict(os.environ, SYSTEMD_UNIT_PATH=f"{tmp_path}:"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "switchboard" not in result.stderr, result.stderr


def test_the_launcher_refuses_an_unknown_process_type_in_one_line():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "procfile_run.py"), "webb"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"usage: procfile_run.py PROCESS_TYPE (one of: {', '.join(procfile_process_types())})"
    ]
