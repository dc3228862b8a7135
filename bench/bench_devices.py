"""Device lifecycle events through the spine, against a no-op Dramatiq actor (issue 5).

Production mode: one throwaway PostgreSQL database and Redis namespace, `dramatiq
tasks.worker` with 2 processes × 8 threads (as the Procfile), one gunicorn (gthread) web
process. A simulated Shure fleet (`Fleet(200, seed=5)`, --quick 30; 1, 2 or 4 channels per
receiver) runs in a **child process** (`python -m bench.bench_devices`, commanded over a Unix
socket), so its ~200 receiver threads and their meter samples stay off the GIL of the bench
process, where the Shure client, the polls and the socket reader's timestamps are
(--devices-fleet thread runs it in the bench process instead). Its receivers are the
DeviceEndpoints of a bench tenant (one location, offline alerts off) with
DEVICES_AUTO_PROVISION=1 and DEVICES_OFFLINE_AFTER_MISSES=1. The workers' scheduled poll is
held off (the bench takes its Redis lock), so the only polls are the bench's: each is one
`poll_service(tenant, "shure")` in the bench process, in the app context, with the Shure
client's production settings (meters every 1 s) except a short reconnect back-off
(DEVICES_SHURE_BACKOFF_INITIAL=0.1, _MAX=0.5), so restored receivers answer the next poll.

- no-op actor: M messages of bench.spine_handlers' no-op actor on the same RedisBroker and
  workers, sent while they run, until all acknowledged (bench_spine's "live" figure).
- discovery: one poll over the whole fleet → one device.discovered event per receiver and per
  transmitter (poll_service commits every DEVICES_POLL_COMMIT_EVERY reports, 200). The poll's
  duration; the time from its
  start until every device row exists (the device_discovered handlers); events/s = the poll's
  device.* events ÷ the time until every handler of them, *and of the events their handlers
  emit* (device_record.created, …), has recorded its ProcessedEvent. Also as Dramatiq
  messages/s (one message per handler queue per event, cascades included), the figure that
  compares with the no-op rate like for like.
- steady state, one poll per change: *update* (the first poll after discovery: every
  transmitter's first meter levels, and half of them report another battery — one
  device.updated each), *drop* (10% of the receivers go down: they and their transmitters go
  offline), *restore* (they come back: online again). The same figures, summed over the
  rounds, and the time the polls themselves took.
- sustained: after the steady state, for --devices-sustained-seconds (8 s, --quick 3; 0
  skips it), every transmitter's battery (bars and minutes, all above
  DEVICES_LOW_BATTERY_BARS: no alerts) changes to another value with one set_battery command
  of the fleet, then one poll, and again, back to back, without waiting for the handlers; then
  until every handler of the phase's events (and their cascades) has recorded. A change is
  one device.updated event, committed by the poll or by the meter pump applying the
  receiver's pushed change (the events table counts both, the committing thread says which;
  a poll that cannot take the poll lock while the pump applies skips its turn, and a change
  the next one overwrote before either applied it is lost: a note says so). events/s = the
  phase's device events ÷ the time from its first change until all handled; the CPU per
  device event as below, with how many cores were busy; and what set the rate: how long the
  handlers took after the loop (a backlog, or the loop set the rate), the loop's time in
  polls (the Shure client's fetch apart) and in the fleet's commands, and the CPU of the
  bench process and of its polling thread meanwhile (one GIL: near a core, the poll loop is
  the limit). The dashboard latency is each device's last change of the phase to its card in
  that state. Issue 23's headline figures come from this phase, the one that measures the
  cost of an event rather than of a poll: `FIGURES["device_event_cpu_ms"]` (every process
  counted), `["device_event_cpu_ms_own"]` (less the fleet and the dashboard client) and
  `["device_events_per_s"]`.
- dashboard: a LiveClient logged in as the tenant's admin has /devices/ open (its signed
  /ws/live socket; production's LIVE_COALESCE_MS). For each device with an event, latency runs
  from just before the commit of the poll transaction that carried its latest event of the
  round (a session `before_commit` listener in the bench process) to the first socket message
  with `device-card-{id}` in the device's final state (online flag, battery bars and minutes,
  RF and audio levels, as the database has them once handled). Coalescing merges several
  updates of one card into one frame, so a card counts as delivered when its final state
  arrives: "delivered" is cards in their final state / cards expected. "the device handler
  started" is the part before its device_* handler ran (its ProcessedEvent's processed_at).
  A discovered device has no card on an open dashboard (which page it belongs on depends on
  the viewer's filters): the page shows a "new devices were discovered" notice instead, so
  discovery reports when the first and the last notice arrived.
- CPU: the CPU seconds every process of the run used (workers, web, the fleet's process, this
  process with its poll, and every `postgres` and `redis-server` process on the machine, their
  reaped connections included), from /proc, over the no-op figure's sends and over each round,
  per no-op message and per device event. Their ratio says how far the events/s figure can
  go on these cores at best: the "CPU-bound ceiling" is the core count ÷ the CPU per device
  event, reached only if the cores did nothing else and never waited. The steady state's
  figure is also given net of the background: the CPU the same processes use per second with
  no poll running (live meters and pushed levels flow all the time; the machine's postgres
  and redis may serve others), measured for BACKGROUND_SECONDS before the rounds.
  `FIGURES["device_event_cpu_ms_steady"]` (and `_steady_net`) hold the steady state's
  figures: three small rounds, where a poll's fixed costs (every report read and compared,
  a few hundred events) weigh more than the events.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

from bench.common import (
    BenchError,
    CpuMeter,
    LiveClient,
    ProdEnv,
    Workers,
    create_tenant_user,
    dramatiq_workers,
    log_tail,
    note,
    percentile,
    prod_app,
    result,
    shielded,
    sized,
    start_process,
    stop_process,
    wait_until,
    web_server,
)

NAME = "devices"
DESCRIPTION = (
    "device lifecycle events/s from polls of a simulated Shure fleet vs a no-op Dramatiq "
    "actor, and poll commit → dashboard card latency"
)

DEFAULTS = {
    # name: (full run, --quick)
    "receivers": (200, 30),
    "noop_messages": (5000, 1000),
    "sustained_seconds": (8.0, 3.0),
}
# The workers' config and the bench process's poll share these (prod_app passes them to both).
APP_ENV = {
    "DEVICES_AUTO_PROVISION": "1",
    "DEVICES_OFFLINE_AFTER_MISSES": "1",
    "DEVICES_POLL_INTERVAL": "3600",
    "DEVICES_SHURE_BACKOFF_INITIAL": "0.1",
    "DEVICES_SHURE_BACKOFF_MAX": "0.5",
    # The benchmark's simulated receivers listen on loopback.
    "DEVICES_ALLOWED_NETWORKS": "127.0.0.0/8",
}
DEVICE_QUEUE = "devices"
# Summary figures for RESULTS.md, filled by run(): the steady state's and the sustained
# phase's CPU per device event, every process of the run counted (ms), and the sustained
# phase's device events/s.
FIGURES: dict[str, float] = {}
BACKGROUND_SECONDS = 3.0
FLEET_KEY_ENV = "SWITCHBOARD_BENCH_FLEET_KEY"

CARD = re.compile(
    r'<article id="device-card-(\d+)"[^>]*?data-online="(true|false)"[^>]*>(.*?)</article>', re.S
)
BARS = re.compile(r'title="(\d+) of 5 bars"')
MINUTES = re.compile(r'<span class="muted">(\d+h \d\dm)</span>')
# The level as reported (the meter's value is a share of a range; its title has the dBm/dBFS).
RF = re.compile(r'<dt>RF</dt><dd><meter[^>]*title="(-?\d+) dBm"')
AUDIO = re.compile(r'<dt>Audio</dt><dd><meter[^>]*title="(-?\d+) dBFS"')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("devices")
    group.add_argument(
        "--devices-receivers", type=int, help="simulated receivers (default 200; --quick 30)"
    )
    group.add_argument("--devices-seed", type=int, default=5, help="fleet seed (default 5)")
    group.add_argument(
        "--devices-noop-messages",
        type=int,
        help="no-op actor messages (default 5000; --quick 1000)",
    )
    group.add_argument(
        "--devices-battery-share",
        type=float,
        default=0.5,
        help="share of transmitters whose battery changes (default 0.5)",
    )
    group.add_argument(
        "--devices-drop-share",
        type=float,
        default=0.1,
        help="share of receivers dropped and restored (default 0.1)",
    )
    group.add_argument(
        "--devices-sustained-seconds",
        type=float,
        help="how long the sustained phase changes batteries and polls back to back "
        "(default 8; --quick 3; 0 skips it)",
    )
    group.add_argument(
        "--devices-fleet",
        choices=("process", "thread"),
        default="process",
        help="run the simulated fleet in a child process (default) or in the bench process",
    )
    group.add_argument(
        "--devices-paused",
        action="store_true",
        help="pause the workers during the discovery poll and time the handlers from their "
        "resumption (their own rate, without the poll on the CPUs); no discovery latency",
    )
    group.add_argument(
        "--devices-worker-processes", type=int, default=2, help="dramatiq --processes (default 2)"
    )
    group.add_argument(
        "--devices-worker-threads", type=int, default=8, help="dramatiq --threads (default 8)"
    )


def _size(args: argparse.Namespace, name: str):
    return sized(args, name, DEFAULTS, NAME)


# ---------------------------------------------------------------- the simulated fleet


def _fleet_info(fleet) -> list[dict[str, Any]]:
    return [
        {
            "index": index,
            "device_id": rx.device_id,
            "address": rx.address,
            "channels": {n: ch.tx_on for n, ch in rx.channels.items()},
        }
        for index, rx in enumerate(fleet.receivers)
    ]


def _fleet_command(fleet, command: str, items: list) -> None:
    if command == "set_battery":
        for index, channel, bars, minutes in items:
            fleet.receivers[index].set_battery(channel, bars, minutes)
    elif command == "drop":
        for index in items:
            fleet.receivers[index].drop()
    elif command == "restore":
        for index in items:
            fleet.receivers[index].restore()
    else:
        raise ValueError(f"unknown fleet command {command!r}")


def _fleet_main(address: str, receivers: int, seed: int) -> None:
    """The fleet process (`python -m bench.bench_devices ADDRESS RECEIVERS SEED`): a Fleet,
    driven by the bench over a Unix socket until "stop" or the bench goes away."""
    from multiprocessing.connection import Listener

    from services.manufacturers.simulator import Fleet

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the bench stops us in order
    key = bytes.fromhex(os.environ.pop(FLEET_KEY_ENV))
    fleet = Fleet(receivers, seed=seed)
    try:
        with Listener(address, "AF_UNIX", authkey=key) as listener, listener.accept() as conn:
            conn.send(("ok", _fleet_info(fleet)))
            while True:
                try:
                    command, items = conn.recv()
                except EOFError:
                    break
                if command == "stop":
                    break
                try:
                    _fleet_command(fleet, command, items)
                    conn.send(("ok", None))
                except Exception as exc:  # noqa: BLE001 - reported to the bench
                    conn.send(("error", repr(exc)))
    finally:
        fleet.stop()


class _FleetProcess:
    """The fleet in a child process (started like the workers: own session, output to a
    log, stopped with the bench), commanded over a Unix socket."""

    def __init__(self, penv: ProdEnv, receivers: int, seed: int) -> None:
        from multiprocessing.connection import Client

        address = str(penv.tmpdir / f"fleet-{uuid.uuid4().hex[:6]}.sock")
        key = secrets.token_bytes(16)
        env = dict(penv.env)
        env[FLEET_KEY_ENV] = key.hex()
        self.log_path = penv.tmpdir / "fleet.log"
        cmd = [sys.executable, "-m", "bench.bench_devices", address, str(receivers), str(seed)]
        self.proc = start_process(cmd, env, self.log_path)
        self.conn = None
        try:

            def connected() -> bool:
                self._check_alive()
                try:
                    self.conn = Client(address, "AF_UNIX", authkey=key)
                except (FileNotFoundError, ConnectionRefusedError):
                    return False
                return True

            if wait_until(connected, 60.0, 0.05) is None:
                raise BenchError(f"the fleet process did not listen:\n{log_tail(self.log_path)}")
            self.receivers = self._reply(timeout=60)
        except BaseException:
            self.stop()
            raise

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(
                f"the fleet process exited with {self.proc.returncode}:\n" + log_tail(self.log_path)
            )

    def _reply(self, timeout: float = 30):
        if not self.conn.poll(timeout):
            self._check_alive()
            raise BenchError(f"the fleet process did not answer in {timeout:.0f}s")
        try:
            status, value = self.conn.recv()
        except EOFError:
            self._check_alive()
            raise BenchError("the fleet process closed its socket") from None
        if status != "ok":
            raise BenchError(f"fleet command failed: {value}")
        return value

    def command(self, command: str, items: list) -> None:
        self.conn.send((command, items))
        self._reply()

    def stop(self) -> None:
        with shielded():
            if self.conn is not None:
                with contextlib.suppress(OSError, ValueError):
                    self.conn.send(("stop", None))
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=10)  # its receivers close their sockets
                self.conn.close()
            stop_process(self.proc, timeout=5)


class _FleetThreads:
    def __init__(self, receivers: int, seed: int) -> None:
        from services.manufacturers.simulator import Fleet

        self.fleet = Fleet(receivers, seed=seed)
        self.receivers = _fleet_info(self.fleet)

    def command(self, command: str, items: list) -> None:
        _fleet_command(self.fleet, command, items)

    def stop(self) -> None:
        with shielded():
            self.fleet.stop()


@contextlib.contextmanager
def _fleet(penv: ProdEnv, receivers: int, seed: int, where: str):
    if where == "process":
        fleet = _FleetProcess(penv, receivers, seed)
    else:
        fleet = _FleetThreads(receivers, seed)
    try:
        yield fleet
    finally:
        fleet.stop()


@contextlib.contextmanager
def _shure_client():
    """The Shure client of this process: its connections are closed at the end, whatever
    happens, and its settings (changed from the bench app's config) restored."""
    from services.manufacturers.shure import service

    settings = service.settings
    try:
        yield service
    finally:
        with shielded():
            service.shutdown()
            service.settings = settings


# ---------------------------------------------------------------- dashboard cards


def _card_state(online: bool, state: dict | None) -> tuple:
    """What a device card shows, as _card.html renders it (and the parser below reads it)."""
    s = state or {}
    bars = s.get("battery_bars")
    shown = bars is not None and bars <= 5
    minutes = s.get("battery_minutes") if shown else None
    return (
        bool(online),
        bars if shown else None,
        f"{minutes // 60}h {minutes % 60:02d}m" if minutes is not None else None,
        s.get("rf_level"),
        s.get("audio_level"),
    )


def _parsed_cards(text: str) -> list[tuple[int, tuple]]:
    cards = []
    for pk, online, body in CARD.findall(text):
        bars, minutes = BARS.search(body), MINUTES.search(body)
        rf, audio = RF.search(body), AUDIO.search(body)
        cards.append(
            (
                int(pk),
                (
                    online == "true",
                    int(bars.group(1)) if bars else None,
                    minutes.group(1) if minutes else None,
                    int(rf.group(1)) if rf else None,
                    int(audio.group(1)) if audio else None,
                ),
            )
        )
    return cards


class _Cards:
    """Every device card that arrives on the socket: (received_at, device pk, shown state)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cards: list[tuple[float, int, tuple]] = []
        self.messages: list[float] = []
        self.snapshots: list[float] = []
        self.notices: list[float] = []

    def on_frame(self, received_at: float, text: str) -> None:
        parsed = _parsed_cards(text)
        with self.lock:
            self.messages.append(received_at)
            if 'id="device-grid"' in text:  # a snapshot (this client fell behind)
                self.snapshots.append(received_at)
            if 'id="devices-new"' in text:  # the "new devices were discovered" notice
                self.notices.append(received_at)
            self.cards.extend((received_at, pk, shown) for pk, shown in parsed)

    def delivered(self, since: float, wanted: dict[int, tuple[float, tuple]]) -> dict[int, float]:
        """{pk: first arrival at or after its commit in its final state} for wanted cards."""
        found: dict[int, float] = {}
        with self.lock:
            cards = [c for c in self.cards if c[0] >= since]
        for at, pk, shown in cards:
            want = wanted.get(pk)
            if want is not None and pk not in found and at >= want[0] and shown == want[1]:
                found[pk] = at
        return found

    def counts(self, since: float) -> tuple[int, int, int]:
        with self.lock:
            return (
                sum(1 for t in self.messages if t >= since),
                sum(1 for c in self.cards if c[0] >= since),
                sum(1 for t in self.snapshots if t >= since),
            )


@contextlib.contextmanager
def _commit_stamps(stamps: dict):
    """{event uuid: (time.perf_counter(), time.time(), committing thread's name) just before
    the commit that carries it}, for every commit this process makes meanwhile (the polls, and
    the meter pump's pushed changes)."""
    from sqlalchemy import event as sa_event
    from sqlalchemy.orm import Session

    from events.outbox import EVENT_IDS

    def before_commit(session) -> None:
        ids = session.info.get(EVENT_IDS)
        if ids:
            now = (time.perf_counter(), time.time(), threading.current_thread().name)
            for event_id in ids:
                stamps.setdefault(event_id, now)

    sa_event.listen(Session, "before_commit", before_commit)
    try:
        yield stamps
    finally:
        sa_event.remove(Session, "before_commit", before_commit)


# ---------------------------------------------------------------- polls and their handling

PROGRESS_SQL = """
SELECT o.topic, count(DISTINCT o.id) AS events, count(p.id) AS results,
       count(p.id) FILTER (WHERE p.status = 'failed') AS failed,
       count(p.id) FILTER (WHERE p.handler = ANY(:device_handlers)) AS device_results
FROM outbox o LEFT JOIN processed_events p ON p.event_id = o.id
WHERE o.id > :first GROUP BY o.topic
"""


class _Devices:
    def __init__(
        self, penv: ProdEnv, workers: Workers, tenant_id: int, fleet, cards: _Cards, cpu
    ) -> None:
        from events.registry import registry

        self.penv, self.workers, self.tenant_id = penv, workers, tenant_id
        self.fleet, self.cards = fleet, cards
        self.cpu = cpu  # () -> a new CpuMeter over every process of the run
        self.registry = registry
        self.device_handlers = sorted(
            name for name, spec in registry.handlers.items() if spec.queue == DEVICE_QUEUE
        )

    # -- database

    def _scalar(self, sql: str, **params):
        from sqlalchemy import text

        from extensions import db

        with self.penv.app.app_context(), db.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def last_event_id(self) -> int:
        return int(self._scalar("SELECT coalesce(max(id), 0) FROM outbox") or 0)

    def progress(self, first_id: int) -> dict[str, Any]:
        """Events after first_id, by topic, and how many of their handler results exist."""
        from sqlalchemy import text

        from extensions import db

        with self.penv.app.app_context(), db.engine.connect() as conn:
            rows = conn.execute(
                text(PROGRESS_SQL), {"first": first_id, "device_handlers": self.device_handlers}
            ).all()
        out = {
            "events": Counter(),
            "results": 0,
            "expected": 0,
            "device_results": 0,
            "device_expected": 0,
            "failed": 0,
            "messages": 0,
        }
        for topic, events, results, failed, device_results in rows:
            names = self.registry.handler_names_for(topic)
            out["events"][topic] = events
            out["results"] += results
            out["expected"] += events * len(names)
            out["failed"] += failed
            out["device_results"] += device_results
            out["device_expected"] += events * sum(
                1 for n in names if self.registry.handlers[n].queue == DEVICE_QUEUE
            )
            out["messages"] += events * len(self.registry.groups_for(names, topic))
        return out

    def round_events(self, first_id: int) -> list[tuple]:
        """(event uuid, topic, device pk or None, api device id, when its device handler
        started) of the polls' events."""
        from sqlalchemy import and_, select

        from extensions import db
        from models.events import OutboxEvent, ProcessedEvent

        with self.penv.app.app_context():
            try:
                rows = db.session.execute(
                    select(
                        OutboxEvent.event_id,
                        OutboxEvent.topic,
                        OutboxEvent.entity_id,
                        OutboxEvent.payload,
                        ProcessedEvent.processed_at,
                    )
                    .outerjoin(
                        ProcessedEvent,
                        and_(
                            ProcessedEvent.event_id == OutboxEvent.id,
                            ProcessedEvent.handler.in_(self.device_handlers),
                        ),
                    )
                    .where(OutboxEvent.id > first_id, OutboxEvent.topic.like("device.%"))
                    .order_by(OutboxEvent.id)
                ).all()
            finally:
                db.session.remove()
        return [(u, t, pk, (p or {}).get("device_id"), at) for u, t, pk, p, at in rows]

    def devices(self) -> dict[str, Any]:
        """{api_device_id: (pk, card state)} of the tenant's devices."""
        from sqlalchemy import select

        from extensions import db
        from models.devices import Device

        with self.penv.app.app_context():
            try:
                rows = db.session.execute(
                    select(Device.api_device_id, Device.id, Device.is_online, Device.state).where(
                        Device.tenant_id == self.tenant_id
                    )
                ).all()
            finally:
                db.session.remove()
        return {api: (pk, _card_state(online, state)) for api, pk, online, state in rows}

    # -- one round: change, poll, wait until handled and shown

    def poll(self) -> Any:
        from extensions import db
        from services.devices import poll_service

        with self.penv.app.app_context():
            try:
                return poll_service(self.tenant_id, "shure")
            finally:
                db.session.remove()

    def device_count(self) -> int:
        return int(
            self._scalar("SELECT count(*) FROM devices WHERE tenant_id = :t", t=self.tenant_id)
        )

    def round(
        self,
        name: str,
        *,
        polls: int = 1,
        until=None,
        provisions: bool = False,
        paused: bool = False,
        change=None,
        seconds: float | None = None,
    ) -> dict[str, Any]:
        """Poll (up to `polls` times, until `until(topics)`), then wait for every handler of
        the polls' events and their cascades, then for the dashboard's cards.

        `provisions`: the device handlers are done once a device row exists per
        device.discovered event. `paused`: the workers are paused (SIGSTOP) during the polls,
        and the handling is timed from their resumption: the handlers' own rate, without the
        polls on the CPUs. `change(k)`: called before the k-th poll (k from 0), makes changes
        on the fleet and returns how many. `seconds`: poll back to back until that long after
        the start has passed, whatever `polls` and `until` say."""
        first_id = self.last_event_id()
        initial_rows = self.device_count() if provisions else 0
        stamps: dict = {}
        poll_seconds, change_seconds, changes, results = 0.0, 0.0, 0, []
        cpu = self.cpu()
        cpu.start()
        start = time.perf_counter()
        # This process's CPU while it polls, and its polling thread's own: whether the poll
        # loop (one thread, under the GIL) is what limits a sustained rate.
        process_cpu, thread_cpu = sum(os.times()[:2]), time.thread_time()
        if paused:
            self.workers.pause()
        # A timed round's last changes may still be committed after its polls (the meter
        # pump applies pushed changes): its commits are stamped until all is handled.
        stamping = contextlib.ExitStack()
        stamping.enter_context(_commit_stamps(stamps))
        try:
            with stamping if seconds is None else contextlib.nullcontext():
                while True:
                    if change is not None:
                        began = time.perf_counter()
                        changes += change(len(results))
                        change_seconds += time.perf_counter() - began
                    began = time.perf_counter()
                    results.append(self.poll())
                    poll_seconds += time.perf_counter() - began
                    if seconds is not None:
                        if time.perf_counter() - start >= seconds:
                            break
                    elif (
                        len(results) >= polls
                        or until is None
                        or until(self.progress(first_id)["events"])
                    ):
                        break
        except BaseException:
            stamping.close()
            raise
        finally:
            polled = time.perf_counter()
            process_cpu = sum(os.times()[:2]) - process_cpu
            thread_cpu = time.thread_time() - thread_cpu
            if paused:
                self.workers.resume()
        handling_from = polled if paused else start
        marks: dict[str, float] = {}

        def handled() -> bool:
            self.workers.check_alive()
            p = self.progress(first_id)
            now = time.perf_counter()
            if "devices" not in marks and p["device_results"] >= p["device_expected"]:
                wanted = p["events"].get("device.discovered", 0) + initial_rows
                if not provisions or self.device_count() >= wanted:
                    marks["devices"] = now
            return p["results"] >= p["expected"]

        timeout = max(60.0, sum(r.events for r in results) / 5)
        try:
            end = wait_until(handled, timeout, 0.1)
        finally:
            stamping.close()
        cpu.stop()
        final = self.progress(first_id)
        if end is not None and "devices" not in marks:
            raise BenchError(
                f"{name}: the device handlers recorded results, but only "
                f"{self.device_count() - initial_rows} of "
                f"{final['events'].get('device.discovered', 0)} discovered devices have a row: "
                "handler effects are lost"
            )
        if end is None:
            raise BenchError(
                f"{name}: {final['results']} of {final['expected']} handler results after "
                f"{timeout:.0f}s"
            )

        # The dashboard: the latest event of each device in this round, its final state.
        devices = self.devices()
        by_pk = {pk: shown for pk, shown in devices.values()}
        wanted: dict[int, tuple[float, tuple]] = {}
        queued: list[float] = []  # commit → its device handler started (worker's clock)
        unstamped = 0
        committers: Counter = Counter()  # device events by the thread that committed them
        for event_id, topic, pk, api_id, started in self.round_events(first_id):
            if topic == "device.synced":
                continue
            if pk is None:  # discovered: the handler made the row
                pk = devices.get(api_id, (None,))[0]
            committed = stamps.get(event_id)
            if committed is None:
                committers["another process"] += 1
            else:
                committers["meter pump" if committed[2] == "meter pump" else "poll"] += 1
            if pk is None or committed is None:
                unstamped += 1
                continue
            if not provisions:  # a discovered device gets a notice, not a card
                wanted[pk] = (committed[0], by_pk.get(pk))
            if started is not None:
                queued.append((started.timestamp() - committed[1]) * 1000)
        if provisions:
            last_row = marks.get("devices", end)

            def noticed() -> bool:
                with self.cards.lock:
                    return any(t >= last_row for t in self.cards.notices)

            live_ok = wait_until(noticed, 15.0, 0.05)
        else:
            live_ok = wait_until(
                lambda: len(self.cards.delivered(start, wanted)) >= len(wanted), 15.0, 0.05
            )
        got = self.cards.delivered(start, wanted)
        latencies = [(got[pk] - wanted[pk][0]) * 1000 for pk in got]
        messages, card_count, snapshots = self.cards.counts(start)
        topics = Counter({t: n for t, n in final["events"].items() if t.startswith("device.")})
        lifecycle = sum(topics.values())
        out = {
            "name": name,
            "polls": len(results),
            "poll_s": poll_seconds,
            "change_s": change_seconds,
            "changes": changes,
            "loop_s": polled - start,
            "loop_cpu": process_cpu,
            "poll_thread_cpu": thread_cpu,
            "committers": committers,
            "polled_at": polled,
            "started_at": start,
            "paused": paused,
            "devices_s": marks.get("devices", end) - handling_from,
            "handled_s": end - handling_from,
            "topics": topics,
            "events": lifecycle,
            "cascaded": sum(final["events"].values()) - lifecycle,
            "all_events": sum(final["events"].values()),
            "handler_runs": final["expected"],
            "messages": final["messages"],
            "failed": final["failed"],
            "reports": results[-1].device_count,
            "online": results[-1].online_count,
            "statuses": [r.status for r in results],
            "latencies": latencies,
            "queued": queued,
            "expected_cards": len(wanted),
            "delivered": len(got),
            "socket_messages": messages,
            "cards_received": card_count,
            "snapshots": snapshots,
            "unstamped": unstamped,
            "late": live_ok is None,
            "cpu": cpu,
        }
        rate = out["events"] / out["handled_s"]
        note(
            f"{name}: {len(results)} poll(s) {poll_seconds:.2f}s, {dict(topics)} + "
            f"{out['cascaded']} cascaded; devices handled at {out['devices_s']:.2f}s, all at "
            f"{out['handled_s']:.2f}s ({rate:.1f} events/s); cards {len(got)}/{len(wanted)}"
        )
        self.penv.drain()
        return out


# ---------------------------------------------------------------- the benchmark


def _topics_text(topics: Counter) -> str:
    return ", ".join(f"{n} {t.removeprefix('device.')}" for t, n in sorted(topics.items()))


def _cpu_rows(
    label: str,
    rounds: list[dict],
    noop: dict,
    noop_cpu: CpuMeter,
    rows: list[dict],
    background: CpuMeter | None = None,
) -> tuple[float, float | None, float]:
    """CPU per device event, every process of the run counted, next to the no-op actor's CPU
    per message: whether the events/s figure is bound by the CPUs, and by whose. With
    `background` (the same processes measured while no poll ran), also net of what they use
    anyway in that time (live meters, pushed levels, other work on the machine's postgres):
    (per event, net per event, per event less the fleet and the measuring client)."""
    events = sum(r["events"] for r in rounds)
    used: Counter = Counter()
    seconds = 0.0
    for r in rounds:
        used.update(r["cpu"].used)
        seconds += r["cpu"].seconds
    total = sum(used.values())
    per_event = total * 1000 / events
    per_message = noop_cpu.total * 1000 / noop["count"]
    cores = os.cpu_count() or 1
    breakdown = ", ".join(f"{name} {cpu * 1000 / events:.2f}" for name, cpu in used.most_common())
    net, net_used, idle = None, {}, {}
    if background is not None and background.seconds > 0:
        idle = {name: cpu / background.seconds for name, cpu in background.used.items()}
        net_used = {name: cpu - idle.get(name, 0.0) * seconds for name, cpu in used.items()}
        net = sum(net_used.values()) * 1000 / events
    rows.append(
        result(
            f"{label}: CPU per device event",
            per_event,
            "ms",
            ratio=per_event / per_message,
            vs="no-op message's CPU",
            detail=(
                f"{total:.1f} CPU-s over {seconds:.1f} s ({total / seconds:.2f} of {cores} "
                f"cores busy) for {events} device events, cascades and all their handlers "
                f"included; ms per event by process: {breakdown} (bench: the poll and the "
                "Shure client; client: the dashboard socket's reader, a thread of the bench "
                "process; postgres and redis-server: every process of those names on the "
                "machine)"
            ),
        )
    )
    own = total - used.get("fleet", 0.0) - used.get("client", 0.0)
    own_per_event = own * 1000 / events
    rows.append(
        result(
            f"{label}: CPU per device event, Switchboard's processes",
            own_per_event,
            "ms",
            ratio=own_per_event / per_message,
            vs="no-op message's CPU",
            detail=(
                "the same, less the simulated receivers (fleet) and the dashboard client that "
                "measures the cards (client): in a deployment those are Shure hardware and a "
                "browser elsewhere, and the rest is what Switchboard's machine spends: "
                f"{own:.1f} CPU-s over {seconds:.1f} s ({own / seconds:.2f} cores)"
            ),
        )
    )
    ceiling = cores * 1000 / per_event
    rows.append(
        result(
            f"{label}: CPU-bound ceiling",
            ceiling,
            "events/s",
            ratio=ceiling / noop["rate"],
            vs="no-op msg/s",
            detail=(
                f"{cores} cores ÷ {per_event:.2f} ms of CPU per device event: the rate if every "
                f"core did nothing else; a no-op message costs {per_message:.2f} ms of CPU "
                f"({noop_cpu.per(noop['count'])})"
                ", so a device event's handling may cost at most twice that for 0.5× no-op"
            ),
        )
    )
    if net is not None:
        rows.append(
            result(
                f"{label}: CPU per device event, net of background",
                net,
                "ms",
                ratio=net / per_message,
                vs="no-op message's CPU",
                detail=(
                    "the CPU per device event less what the same processes used per second "
                    f"while no poll ran ({background.seconds:.1f} s measured just before the "
                    "rounds: "
                    + ", ".join(
                        f"{name} {rate * 1000:.0f} ms/s"
                        for name, rate in sorted(idle.items(), key=lambda item: -item[1])
                    )
                    + ") times the rounds' duration; ms per event by process: "
                    + ", ".join(
                        f"{name} {cpu * 1000 / events:.2f}"
                        for name, cpu in sorted(net_used.items(), key=lambda item: -item[1])
                    )
                ),
            )
        )
    return per_event, net, own_per_event


def _latency_rows(label: str, rounds: list[dict], rows: list[dict]) -> None:
    latencies = [x for r in rounds for x in r["latencies"]]
    queued = [x for r in rounds for x in r["queued"]]
    expected = sum(r["expected_cards"] for r in rounds)
    delivered = sum(r["delivered"] for r in rounds)
    messages = sum(r["socket_messages"] for r in rounds)
    cards = sum(r["cards_received"] for r in rounds)
    snapshots = sum(r["snapshots"] for r in rounds)
    if not latencies:
        raise BenchError(f"{label}: no device card arrived on the dashboard socket")
    extra = f"; {snapshots} snapshot(s) resent (fell behind)" if snapshots else ""
    rows.append(
        result(
            f"{label}: commit → card p50",
            percentile(latencies, 50),
            "ms",
            detail=(
                f"{delivered}/{expected} cards delivered in their final state; {cards} cards in "
                f"{messages} socket messages{extra}"
            ),
        )
    )
    per_round = ""
    if len(rounds) > 1:
        per_round = "; p50 by round: " + ", ".join(
            f"{r['name']} {percentile(r['latencies'], 50):.0f} ms" for r in rounds
        )
    rows.append(
        result(
            f"{label}: commit → card p99",
            percentile(latencies, 99),
            "ms",
            detail=(
                f"min {min(latencies):.0f} ms, max {max(latencies):.0f} ms; the device handler "
                f"started {percentile(queued, 50):.0f} ms (p50) / {percentile(queued, 99):.0f} "
                f"ms (p99) after the commit{per_round}"
            ),
        )
    )


def _notice_rows(found: dict, cards: _Cards, rows: list[dict]) -> None:
    with cards.lock:
        notices = [t - found["started_at"] for t in cards.notices if t >= found["started_at"]]
    if not notices:
        raise BenchError("discovery: no 'new devices' notice arrived on the dashboard socket")
    rows.append(
        result(
            "discovery: first 'new devices' notice",
            notices[0],
            "s",
            detail=f"after the poll's start; {len(notices)} notice frames in all (one key: "
            "coalesced while they come faster than the coalescing window)",
        )
    )
    rows.append(
        result(
            "discovery: last notice after the last device row",
            notices[-1] - found["devices_s"],
            "s",
            detail=f"last notice {notices[-1]:.1f} s after the poll's start; every device row "
            f"existed at {found['devices_s']:.1f} s",
        )
    )


def _throughput_rows(label: str, rounds: list[dict], noop_rate: float, rows: list[dict]) -> None:
    events = sum(r["events"] for r in rounds)
    seconds = sum(r["handled_s"] for r in rounds)
    messages = sum(r["messages"] for r in rounds)
    cascaded = sum(r["cascaded"] for r in rounds)
    runs = sum(r["handler_runs"] for r in rounds)
    failed = sum(r["failed"] for r in rounds)
    topics = sum((r["topics"] for r in rounds), Counter())
    failures = f"; {failed} handler runs FAILED" if failed else ""
    if len(rounds) == 1:
        r = rounds[0]
        how = (
            f"poll {r['poll_s']:.1f} s, device handlers done at {r['devices_s']:.1f} s, "
            f"all at {r['handled_s']:.1f} s"
        )
        if r["paused"]:
            how = (
                f"the workers were paused during the poll ({r['poll_s']:.1f} s); from resuming "
                f"them, device handlers done at {r['devices_s']:.1f} s, all at "
                f"{r['handled_s']:.1f} s"
            )
    else:
        how = "; ".join(
            f"{r['name']}: {_topics_text(r['topics'])} handled in {r['handled_s']:.1f} s "
            f"(poll {r['poll_s']:.1f} s)"
            for r in rounds
        )
    rows.append(
        result(
            f"{label}: device events",
            events / seconds,
            "events/s",
            ratio=events / seconds / noop_rate,
            vs="no-op msg/s",
            detail=(
                f"{_topics_text(topics)}, until all {runs} handler runs "
                f"(theirs and {cascaded} cascaded events') recorded; {how}{failures}"
            ),
        )
    )
    rows.append(
        result(
            f"{label}: handler runs",
            runs / seconds,
            "runs/s",
            ratio=runs / seconds / noop_rate,
            vs="no-op msg/s",
            detail=(
                f"{runs} handler runs ({runs / events:.1f} per device event, cascades "
                f"included), in {messages} (event, handler queue) pairs: a Dramatiq message "
                "per queue carries up to EVENTS_BATCH events of one commit"
            ),
        )
    )


def run(args: argparse.Namespace) -> list[dict]:
    from bench.bench_spine import _noop_throughput

    # The polls run in this process, and a device discovered, online or offline is logged at
    # INFO for operators: hundreds of lines a round would bury the figures.
    logging.getLogger("services.devices").setLevel(logging.WARNING)

    receivers = _size(args, "receivers")
    noop_messages = _size(args, "noop_messages")
    procs, threads = args.devices_worker_processes, args.devices_worker_threads
    rng = random.Random(args.devices_seed)
    rows: list[dict] = []
    FIGURES.clear()
    with (
        prod_app("devices", actor_modules=["bench.spine_handlers"], env=APP_ENV) as penv,
        contextlib.ExitStack() as stack,
    ):
        user = create_tenant_user(penv, name="Bench Venue")
        # The workers' scheduler polls every tenant with endpoints, first right at boot:
        # hold its lock, so the only polls are the bench's own.
        with contextlib.closing(penv.redis()) as client:
            client.set(penv.prefix + "sched:poll_devices", "bench", px=3_600_000)
        note(
            f"starting {receivers} simulated receivers ({args.devices_fleet}), gunicorn, and "
            f"`dramatiq tasks.worker` with {procs} processes × {threads} threads"
        )
        web = stack.enter_context(web_server(penv, wait=False))
        fleet = stack.enter_context(_fleet(penv, receivers, args.devices_seed, args.devices_fleet))
        stack.enter_context(_shure_client())
        workers = stack.enter_context(dramatiq_workers(penv, processes=procs, threads=threads))
        _attach(penv, user.tenant_id, fleet)

        reader: dict[str, tuple[str, int]] = {}  # the dashboard client's thread, once open

        def cpu_meter() -> CpuMeter:
            return CpuMeter(
                workers=workers.proc.pid,
                postgres="postgres",
                bench="self",
                web=web.proc.pid,
                redis="redis-server",
                **({"fleet": fleet.proc.pid} if hasattr(fleet, "proc") else {}),
                **reader,
            )

        noop_cpu = cpu_meter()
        noop = _noop_throughput(penv, workers, noop_messages, backlog=False, cpu=noop_cpu)
        noop["count"] = noop_messages
        noop_rate = noop["rate"]
        rows.append(
            result(
                "no-op actor",
                noop_rate,
                "msg/s",
                detail=(
                    f"{noop_messages} messages from the first send (sending took "
                    f"{noop['send_s']:.1f} s) until all acknowledged, same broker and workers"
                ),
            )
        )

        cards = _Cards()
        live = stack.enter_context(LiveClient(web.wait_ready().url))
        live.login(user.email, user.password)
        if 'id="device-grid"' not in live.subscribe("/devices/", on_frame=cards.on_frame):
            raise BenchError("the devices dashboard's snapshot has no grid")
        reader["client"] = ("thread", live.reader_ident())
        bench = _Devices(penv, workers, user.tenant_id, fleet, cards, cpu_meter)

        # Discovery.
        expected = sum(1 + sum(r["channels"].values()) for r in fleet.receivers)
        note(f"discovery: polling {receivers} receivers ({expected} devices)")
        found = bench.round("discovery", provisions=True, paused=args.devices_paused)
        if found["topics"]["device.discovered"] != expected:
            note(
                f"!! discovery reported {found['topics']['device.discovered']} of {expected} "
                f"devices (poll status {found['statuses']})"
            )
        rows.append(
            result(
                "discovery: poll",
                found["poll_s"],
                "s",
                detail=(
                    f"one poll_service over {receivers} receivers: {found['reports']} reports, "
                    f"{found['topics']['device.discovered']} device.discovered events, a "
                    f"commit per {penv.app.config['DEVICES_POLL_COMMIT_EVERY']} reports "
                    f"({found['poll_s'] / max(1, found['reports']) * 1000:.1f} ms per report)"
                    + ("; the workers paused meanwhile" if found["paused"] else "")
                ),
            )
        )
        rows.append(
            result(
                "discovery: every device row exists",
                found["devices_s"],
                "s",
                ratio=found["devices_s"] / found["poll_s"],
                vs="poll",
                detail=(
                    "from resuming the workers after the poll"
                    if found["paused"]
                    else "from the poll's start"
                )
                + " until every device_discovered handler recorded",
            )
        )
        _throughput_rows("discovery", [found], noop_rate, rows)
        _cpu_rows("discovery", [found], noop, noop_cpu, rows)
        if not found["paused"]:  # paused, a notice waits for the poll: no latency to speak of
            _notice_rows(found, cards, rows)

        # Steady state. The first poll after discovery brings every transmitter's first
        # meter levels; half of them also report another battery: one update per transmitter.
        time.sleep(max(0.0, 2.0 - (time.perf_counter() - found["polled_at"])))
        # What the processes use with no poll running (meters, pushed levels, whatever else
        # uses the machine's postgres and redis), to report the rounds' CPU net of it too.
        background = cpu_meter()
        background.start()
        time.sleep(BACKGROUND_SECONDS)
        background.stop()
        transmitters = [
            (r["index"], n) for r in fleet.receivers for n, on in r["channels"].items() if on
        ]
        changed = rng.sample(
            transmitters, max(1, round(len(transmitters) * args.devices_battery_share))
        )
        changes = []
        for k, (index, channel) in enumerate(changed):
            bars = 2 + k % 3  # never at or below DEVICES_LOW_BATTERY_BARS: no alerts
            changes.append((index, channel, bars, bars * 100 + 5 * (k % 20)))
        fleet.command("set_battery", changes)
        note(f"update: {len(changes)} of {len(transmitters)} transmitters get another battery")
        steady = [bench.round("update")]

        dropped = rng.sample(
            range(len(fleet.receivers)), max(1, round(receivers * args.devices_drop_share))
        )
        down = sum(1 + sum(fleet.receivers[i]["channels"].values()) for i in dropped)
        fleet.command("drop", dropped)
        note(f"drop: {len(dropped)} receivers down ({down} devices)")
        steady.append(bench.round("drop"))
        fleet.command("restore", dropped)
        steady.append(
            bench.round(
                "restore",
                polls=5,
                until=lambda topics: topics.get("device.online", 0) >= down,
            )
        )
        if steady[-1]["topics"]["device.online"] < down:
            note(f"!! only {steady[-1]['topics']['device.online']} of {down} devices back online")
        _throughput_rows("steady state", steady, noop_rate, rows)
        per_event, net, _own = _cpu_rows("steady state", steady, noop, noop_cpu, rows, background)
        FIGURES["device_event_cpu_ms_steady"] = per_event
        if net is not None:
            FIGURES["device_event_cpu_ms_steady_net"] = net
        _latency_rows("steady state", steady, rows)
        rows.append(
            result(
                "steady state: polling",
                sum(r["poll_s"] for r in steady),
                "s",
                ratio=sum(r["poll_s"] for r in steady) / sum(r["handled_s"] for r in steady),
                vs="until handled",
                detail="; ".join(
                    f"{r['name']}: {r['polls']} poll(s) of {r['reports']} reports, "
                    f"{r['poll_s']:.1f} s"
                    for r in steady
                )
                + f"; a poll commits once per {penv.app.config['DEVICES_POLL_COMMIT_EVERY']} "
                "reports, its events go to the handlers in messages of up to "
                f"{penv.app.config['EVENTS_BATCH']}",
            )
        )

        sustained_seconds = _size(args, "sustained_seconds")
        if sustained_seconds > 0:
            low = penv.app.config["DEVICES_LOW_BATTERY_BARS"]
            if low >= min(SUSTAINED_BARS):
                raise BenchError(
                    f"DEVICES_LOW_BATTERY_BARS={low}: the sustained phase's batteries "
                    f"({min(SUSTAINED_BARS)}+ bars) would raise alerts"
                )
            note(
                f"sustained: the battery of all {len(transmitters)} transmitters changes before "
                f"each poll, back to back for {sustained_seconds:g} s"
            )
            with _timed_fetch() as fetched:
                sustained = bench.round(
                    "sustained",
                    change=_battery_cycle(fleet, transmitters, changes),
                    seconds=sustained_seconds,
                )
            sustained["fetch_s"] = fetched[0]
            updated = sustained["topics"]["device.updated"]
            if updated != sustained["changes"]:
                note(
                    f"!! sustained: {updated} device.updated events for {sustained['changes']} "
                    "battery changes: the next change overwrote some before a poll or a push "
                    "applied them"
                )
            _sustained_rows(sustained, per_event, noop_rate, rows)
            FIGURES["device_events_per_s"] = sustained["events"] / sustained["handled_s"]
            (
                FIGURES["device_event_cpu_ms"],
                _,
                FIGURES["device_event_cpu_ms_own"],
            ) = _cpu_rows("sustained", [sustained], noop, noop_cpu, rows)
            if sustained["latencies"]:
                _latency_rows("sustained", [sustained], rows)
            else:
                note("!! sustained: no device card arrived on the dashboard socket")
    return rows


@contextlib.contextmanager
def _timed_fetch():
    """[seconds] the Shure client's fetch took (the receivers' part of the polls: leases,
    probes, snapshots), while in the block; the rest of a poll is its database work."""
    from services.manufacturers.shure import service

    spent = [0.0]
    fetch = service.fetch

    def timed(*args, **kwargs):
        began = time.perf_counter()
        try:
            return fetch(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - began

    service.fetch = timed
    try:
        yield spent
    finally:
        del service.fetch  # the class's method again


# The sustained phase's battery bars, in turn for each transmitter: each change differs from
# the one before (and from a fresh pack's 5 bars), all above DEVICES_LOW_BATTERY_BARS.
SUSTAINED_BARS = (2, 3, 4)


def _battery_cycle(fleet, transmitters: list[tuple[int, int]], changes: list[tuple]):
    """change(k) for the sustained phase (see _Devices.round): every transmitter gets the
    next battery of its cycle, in one set_battery command of the fleet, made before the poll
    (made during it, the next change would overwrite some before a poll or a push carries
    them); returns how many changed. `changes`: the update round's batteries."""
    bars = {(index, channel): b for index, channel, b, _ in changes}

    def change(k: int) -> int:
        items = []
        for n, key in enumerate(transmitters):
            was = bars.get(key, 5)
            now = SUSTAINED_BARS[
                (SUSTAINED_BARS.index(was) + 1) % len(SUSTAINED_BARS)
                if was in SUSTAINED_BARS
                else 0
            ]
            bars[key] = now
            items.append((*key, now, now * 100 + 5 * ((k + n) % 20)))
        fleet.command("set_battery", items)
        return len(items)

    return change


def _sustained_rows(r: dict, steady_cpu_ms: float, noop_rate: float, rows: list[dict]) -> None:
    events, seconds = r["events"], r["handled_s"]
    loop = r["loop_s"]
    drain = seconds - loop
    cores = os.cpu_count() or 1
    busy = r["cpu"].total / r["cpu"].seconds
    committers = ", ".join(f"{n} by {who}" for who, n in r["committers"].most_common())
    if drain <= 0.5 + 0.1 * loop:
        limit = (
            f"the handlers kept up (all done {drain:.1f} s after the loop): the change-and-poll "
            f"loop set the rate, {cores - busy:.2f} cores idle"
        )
    else:
        limit = f"the handlers fell behind the loop: its backlog took {drain:.1f} s more"
    if r["loop_cpu"] / loop >= 0.85:
        limit += (
            f"; the bench process was busy {r['loop_cpu'] / loop:.0%} of a core during the "
            "loop (the poll, the Shure client, the meter pump, the socket reader: one GIL), "
            "so the poll loop itself limits what is offered"
        )
    failed = f"; {r['failed']} handler runs FAILED" if r["failed"] else ""
    skipped = r["statuses"].count("skipped")
    if skipped:
        # poll_service skips its turn when it cannot take the poll lock within PUSH_LOCK_WAIT
        # (the meter pump holds it while applying pushed changes).
        skipped = f", {skipped} of them skipped (the poll lock was held)"
    else:
        skipped = ""
    rows.append(
        result(
            "sustained: device events",
            events / seconds,
            "events/s",
            ratio=events / seconds / noop_rate,
            vs="no-op msg/s",
            detail=(
                f"{_topics_text(r['topics'])} ({committers}; device.updated from "
                f"{r['changes']} battery changes) from the first change until all "
                f"{r['handler_runs']} handler runs (theirs and {r['cascaded']} cascaded "
                f"events') recorded, {seconds:.1f} s; the loop ran {loop:.1f} s: {r['polls']} "
                f"polls{skipped} ({r['poll_s'] / loop:.0%} of it; their fetch from the "
                f"receivers {r['fetch_s'] / loop:.0%}, the rest applying the reports), each "
                f"after a set_battery of every transmitter ({r['change_s'] / loop:.0%} of it); "
                "the bench process used "
                f"{r['loop_cpu'] / loop:.2f} cores meanwhile, its polling thread "
                f"{r['poll_thread_cpu'] / loop:.2f}; {busy:.2f} of {cores} cores busy over "
                f"the phase, {r['cpu'].total * 1000 / events:.2f} ms of CPU per device event "
                f"(steady state {steady_cpu_ms:.2f}); {limit}{failed}"
            ),
        )
    )


def _attach(penv: ProdEnv, tenant_id: int, fleet) -> None:
    from extensions import db
    from models.devices import Location
    from services.manufacturers.simulator import attach_endpoints

    with penv.app.app_context():
        try:
            stage = Location(tenant_id=tenant_id, name="Bench stage")
            db.session.add(stage)
            db.session.flush()
            attach_endpoints(
                tenant_id, [tuple(r["address"]) for r in fleet.receivers], location_id=stage.id
            )
            db.session.commit()
        finally:
            db.session.remove()
    penv.drain()


if __name__ == "__main__":
    _fleet_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
