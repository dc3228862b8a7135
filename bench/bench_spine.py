"""The spine against raw Dramatiq, side by side, in production mode (issue 2).

One throwaway PostgreSQL database, one Redis namespace, and the same `dramatiq tasks.worker`
processes (2 × 8 threads, as the Procfile) for every figure:

- no-op actor: M messages of an actor that does nothing, sent on the app's RedisBroker (same
  middleware as the spine's actors); done when every message is acknowledged.
- spine: M events, one transaction each (`events.emit` + `commit`, which dispatches them),
  committed from a few threads on a topic with a trivial handler; done when every handler of
  every event (the trivial one plus the `*` handlers every event has: live_feed and
  webhooks.fanout) has recorded its ProcessedEvent. Each event is a Dramatiq message of
  its own and a handler transaction of its own.
- spine, K per commit: the same with K events per transaction, as a device poll commits
  them (DEVICES_POLL_COMMIT_EVERY, 50): one message per handler queue carries a commit's
  events (EVENTS_BATCH) and its handlers run them in one transaction.
- Each twice: *backlog* — sent or committed while the workers are paused (SIGSTOP), timed
  from resuming them, so it is the workers' rate alone; and *live* — workers running, timed
  from the first send or commit, so senders and workers share the CPUs as in production.
- latency: gunicorn serves the console; a client logs in and opens the dashboard's /ws/live
  socket (topics signed by the page). Frames are published straight onto the live bus at a
  steady rate (the web process's relay alone), then events are committed at the same rate
  and the `live_feed` handler in the workers publishes their frames (the whole spine).
  Latency runs from just before the publish or the `session.commit()` to the socket message
  that carries the frame. Twice, with a web server each: with production's LIVE_COALESCE_MS
  (the relay waits that long to batch frames) and with 0 (the spine's own latency).
  "commit → handler" is the part before the live_feed handler starts (its ProcessedEvent's
  processed_at, taken in the worker).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import threading
import time

from bench.common import (
    BenchError,
    CpuMeter,
    LiveClient,
    ProdEnv,
    Workers,
    create_tenant_user,
    dramatiq_workers,
    note,
    prod_app,
    result,
    sized,
    summarize,
    wait_until,
    web_server,
)
from bench.spine_handlers import SPINE_TOPIC, declare_noop

NAME = "spine"
DESCRIPTION = "spine events/s vs a no-op Dramatiq actor, and commit → live frame latency"

DEFAULTS = {
    # name: (full run, --quick)
    "messages": (6000, 1000),
    "events": (800, 150),
    "seconds": (6.0, 2.0),
}
MARK = re.compile(r"bench-live (c\d+)-(\w+):(\d+)\b")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("spine")
    group.add_argument(
        "--spine-messages", type=int, help="no-op messages per run (default 6000; --quick 1000)"
    )
    group.add_argument(
        "--spine-events", type=int, help="events per throughput run (default 800; --quick 150)"
    )
    group.add_argument(
        "--spine-producers", type=int, default=4, help="threads committing events (default 4)"
    )
    group.add_argument(
        "--spine-per-commit",
        type=int,
        default=50,
        help="events per transaction of the batched figures (default 50, as a poll commits)",
    )
    group.add_argument(
        "--spine-rate",
        type=float,
        default=50.0,
        help="commits/s for the latency figures (default 50)",
    )
    group.add_argument(
        "--spine-seconds", type=float, help="seconds per latency phase (default 6; --quick 2)"
    )
    group.add_argument(
        "--spine-worker-processes", type=int, default=2, help="dramatiq --processes (default 2)"
    )
    group.add_argument(
        "--spine-worker-threads", type=int, default=8, help="dramatiq --threads (default 8)"
    )
    group.add_argument(
        "--spine-coalesce-ms",
        type=int,
        help="LIVE_COALESCE_MS of the web server (default: the production default, then 0; "
        "--quick: the production default only)",
    )


def _size(args: argparse.Namespace, name: str):
    return sized(args, name, DEFAULTS, NAME)


def run(args: argparse.Namespace) -> list[dict]:
    messages, events, seconds = (_size(args, n) for n in ("messages", "events", "seconds"))
    per_commit_many = args.spine_per_commit
    procs, threads, producers = (
        args.spine_worker_processes,
        args.spine_worker_threads,
        args.spine_producers,
    )
    rows: list[dict] = []
    with prod_app("spine", actor_modules=["bench.spine_handlers"]) as penv:
        user = create_tenant_user(penv)
        default_ms = penv.app.config["LIVE_COALESCE_MS"]
        if args.spine_coalesce_ms is not None:
            settings = [args.spine_coalesce_ms]
        else:  # production's coalescing, and none (the spine's own latency); quick: the former
            settings = [default_ms] if args.quick or default_ms == 0 else [default_ms, 0]
        note(
            f"starting gunicorn (gthread) ×{len(settings)} and `dramatiq tasks.worker` with "
            f"{procs} processes × {threads} threads"
        )
        with contextlib.ExitStack() as stack:
            # The web servers boot alongside the workers and idle until the latency figures.
            webs = {
                ms: stack.enter_context(
                    web_server(penv, env={"LIVE_COALESCE_MS": str(ms)}, wait=False)
                )
                for ms in settings
            }
            workers = stack.enter_context(dramatiq_workers(penv, processes=procs, threads=threads))
            spine = _Spine(penv, workers, user.tenant_id)
            spine.warm_up()
            for backlog in (True, False):
                mode = "backlog" if backlog else "live"
                noop = _noop_throughput(penv, workers, messages, backlog=backlog)
                how = (
                    f"sent ({messages / noop['send_s']:,.0f}/s) while the workers were paused; "
                    "from resuming them"
                    if backlog
                    else f"from the first send (sending took {noop['send_s']:.1f} s)"
                )
                rows.append(
                    result(
                        f"no-op actor, {mode}",
                        noop["rate"],
                        "msg/s",
                        detail=f"{messages} messages {how} until all acknowledged",
                    )
                )
                for per_commit in (1, per_commit_many):
                    count = events if per_commit == 1 else events * 3
                    ev = spine.throughput(count, producers, backlog=backlog, per_commit=per_commit)
                    how = (
                        f"committed ({count / ev['commit_s']:,.0f}/s) while the workers were "
                        "paused; from resuming them"
                        if backlog
                        else f"from the first commit (commits took {ev['commit_s']:.1f} s, the "
                        f"last handled {ev['elapsed_s'] - ev['commit_s']:.1f} s after)"
                    )
                    failed = f"; {ev['failed']} handler runs failed" if ev["failed"] else ""
                    each = "one per commit" if per_commit == 1 else f"{per_commit} per commit"
                    rows.append(
                        result(
                            f"spine, {mode}" + ("" if per_commit == 1 else f", {each}"),
                            ev["rate"],
                            "events/s",
                            ratio=ev["rate"] / noop["rate"],
                            vs=f"no-op {mode}",
                            detail=(
                                f"{count} events ({each}) from {producers} threads {how} until "
                                f"each handler ({', '.join(ev['handlers'])}) recorded{failed}"
                            ),
                        )
                    )
                    if not backlog and ev["commit_s"] >= 0.9 * ev["elapsed_s"]:
                        note("the commits finished last: the live spine figure is producer-bound")

            for ms, web in webs.items():
                note(f"subscribing a socket to the tenant's feed ({ms} ms coalescing)")
                rows += _Latency(penv, workers, user, web, ms).run(args.spine_rate, seconds)
    return rows


# ---------------------------------------------------------------- throughput


def _noop_throughput(
    penv: ProdEnv, workers: Workers, count: int, *, backlog: bool, cpu: CpuMeter | None = None
) -> dict:
    """The no-op actor's rate: `count` messages until all acknowledged. `cpu`, if given,
    measures the CPU used from the first send (after the warm-up) to the end."""
    actor = declare_noop(penv.broker)
    queue = actor.queue_name
    qsize = penv.broker.do_qsize
    # Warm-up: every worker thread's first message pays for its connections.
    for _ in range(200):
        actor.send()
    penv.drain()
    note(f"no-op actor, {'backlog' if backlog else 'live'}: {count} messages")
    if backlog:
        workers.pause()
    if cpu is not None:
        cpu.start()
    try:
        start = time.perf_counter()
        for _ in range(count):
            actor.send()
        sent = time.perf_counter() - start
        if backlog:
            start = time.perf_counter()
            workers.resume()
    finally:
        workers.resume()

    def done() -> bool:
        workers.check_alive()
        return qsize(queue) == 0  # queued + delayed + unacknowledged

    end = wait_until(done, max(60.0, count / 50), 0.005)
    if cpu is not None:
        cpu.stop()
    if end is None:
        raise BenchError(f"no-op messages left after the timeout: {qsize(queue)}")
    return {"rate": count / (end - start), "send_s": sent, "elapsed_s": end - start}


class _Spine:
    """Commits bench.spine events and waits for their handlers' ProcessedEvent rows."""

    def __init__(self, penv: ProdEnv, workers: Workers, tenant_id: int) -> None:
        from events.registry import registry

        self.penv, self.workers, self.tenant_id = penv, workers, tenant_id
        self.handlers = registry.handler_names_for(SPINE_TOPIC)
        self.groups = registry.groups_for(self.handlers, SPINE_TOPIC)
        if "bench_noop_handler" not in self.handlers:
            raise BenchError(f"{SPINE_TOPIC} has no bench handler: {self.handlers}")

    def commit_events(self, count: int, label: str, per_commit: int = 1) -> None:
        from events import emit
        from extensions import db

        with self.penv.app.app_context():
            try:
                for n in range(count):
                    emit(SPINE_TOPIC, tenant_id=self.tenant_id, payload={"label": label})
                    if (n + 1) % per_commit == 0 or n == count - 1:
                        db.session.commit()
            finally:
                db.session.remove()

    def commit_from_threads(
        self, count: int, producers: int, label: str, per_commit: int = 1
    ) -> None:
        share = [count // producers + (i < count % producers) for i in range(producers)]
        errors: list[BaseException] = []

        def producer(n: int) -> None:
            try:
                self.commit_events(n, label, per_commit)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=producer, args=(n,), daemon=True) for n in share]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise BenchError(f"a producer failed: {errors[0]!r}") from errors[0]

    def last_event_id(self) -> int:
        from sqlalchemy import func, select

        from extensions import db
        from models.events import OutboxEvent

        with self.penv.app.app_context(), db.engine.connect() as conn:
            return int(conn.scalar(select(func.max(OutboxEvent.id))) or 0)

    def processed_after(self, first_id: int, status: str | None = None) -> int:
        from sqlalchemy import func, select

        from extensions import db
        from models.events import ProcessedEvent

        query = select(func.count()).select_from(ProcessedEvent)
        query = query.where(ProcessedEvent.event_id > first_id)
        if status:
            query = query.where(ProcessedEvent.status == status)
        with self.penv.app.app_context(), db.engine.connect() as conn:
            return int(conn.scalar(query) or 0)

    def warm_up(self) -> None:
        self.commit_from_threads(60, 4, "bench warm-up")
        self.penv.drain()

    def throughput(self, count: int, producers: int, *, backlog: bool, per_commit: int = 1) -> dict:
        first_id = self.last_event_id()
        expected = count * len(self.handlers)
        note(f"spine, {'backlog' if backlog else 'live'}: {count} events")
        if backlog:
            self.workers.pause()
        try:
            start = time.perf_counter()
            self.commit_from_threads(count, producers, "bench spine", per_commit)
            committed = time.perf_counter() - start
            if backlog:
                start = time.perf_counter()
                self.workers.resume()
        finally:
            self.workers.resume()

        def done() -> bool:
            self.workers.check_alive()
            return self.processed_after(first_id) >= expected

        end = wait_until(done, max(120.0, count / 10), 0.02)
        if end is None:
            got = self.processed_after(first_id)
            raise BenchError(f"only {got} of {expected} handler runs recorded")
        return {
            "rate": count / (end - start),
            "elapsed_s": end - start,
            "commit_s": committed,
            "handlers": self.handlers,
            "groups": len(self.groups),
            "failed": self.processed_after(first_id, "failed"),
        }


# ---------------------------------------------------------------- latency


def _paced(rate: float, count: int, fn) -> None:
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        fn(i)


class _Latency:
    """One web server, one subscribed socket: bus → socket, then commit → frame."""

    def __init__(self, penv: ProdEnv, workers: Workers, user, web, coalesce_ms: int) -> None:
        from services.live import tenant_topic

        self.penv, self.workers, self.user, self.web = penv, workers, user, web
        self.coalesce_ms = coalesce_ms
        self.tag = f"c{coalesce_ms}"  # frames of another web server never match
        self.topic = tenant_topic(user.tenant_id, "feed")
        self.sent: dict[str, dict[int, float]] = {"bus": {}, "spine": {}}
        self.sent_wall: dict[int, float] = {}  # to compare with the workers' clock
        self.received: dict[str, dict[int, float]] = {"bus": {}, "spine": {}}
        self.messages = {"bus": 0, "spine": 0}
        self.lock = threading.Lock()

    def on_frame(self, at: float, text: str) -> None:
        phases = set()
        with self.lock:
            for tag, phase, n in MARK.findall(text):
                if tag == self.tag and phase in self.received:
                    self.received[phase].setdefault(int(n), at)
                    phases.add(phase)
            for phase in phases:
                self.messages[phase] += 1

    def label(self, phase: str, n: int) -> str:
        return f"bench-live {self.tag}-{phase}:{n}"

    def publish_frame(self, n: int, phase: str = "bus") -> None:
        from services.live import publish

        html = (
            f'<ol id="feed-list" hx-swap-oob="afterbegin"><li id="bench-{self.tag}-{phase}-{n}">'
            f"{self.label(phase, n)}</li></ol>"
        )
        if phase in self.sent:
            self.sent[phase][n] = time.perf_counter()
        publish(self.topic, f"bench-{phase}-{n}", html=html)

    def commit_event(self, n: int, phase: str = "spine") -> None:
        from events import emit
        from extensions import db

        emit(SPINE_TOPIC, tenant_id=self.user.tenant_id, payload={"label": self.label(phase, n)})
        if phase in self.sent:
            self.sent_wall[n] = time.time()
            self.sent[phase][n] = time.perf_counter()
        db.session.commit()

    def handler_starts(self, after_id: int) -> dict[int, float]:
        """When live_feed started on each spine event (its ProcessedEvent's processed_at)."""
        from sqlalchemy import select

        from extensions import db
        from models.events import OutboxEvent, ProcessedEvent

        query = (
            select(OutboxEvent.payload, ProcessedEvent.processed_at)
            .join(ProcessedEvent, ProcessedEvent.event_id == OutboxEvent.id)
            .where(OutboxEvent.id > after_id, ProcessedEvent.handler == "live_feed")
        )
        starts = {}
        for payload, at in db.session.execute(query):
            for tag, phase, n in MARK.findall(str((payload or {}).get("label", ""))):
                if tag == self.tag and phase == "spine":
                    starts[int(n)] = at.timestamp()
        db.session.rollback()
        return starts

    def run(self, rate: float, seconds: float) -> list[dict]:
        from sqlalchemy import func, select

        from extensions import db
        from models.events import OutboxEvent

        count = max(1, int(rate * seconds))
        rows: list[dict] = []
        stats: dict[str, dict] = {}
        setting = f"LIVE_COALESCE_MS={self.coalesce_ms}"
        with LiveClient(self.web.wait_ready().url) as live, self.penv.app.app_context():
            live.login(self.user.email, self.user.password)
            if 'id="feed-list"' not in live.subscribe("/", on_frame=self.on_frame):
                raise BenchError("the dashboard socket's snapshot has no feed")
            try:
                # Warm-up: the web process's first frames, the handlers' first renders.
                _paced(rate, 20, lambda n: self.publish_frame(n, "warm"))
                _paced(rate, 20, lambda n: self.commit_event(n, "warm"))
                self.penv.drain()
                time.sleep(0.5)
                first_id = db.session.scalar(select(func.max(OutboxEvent.id))) or 0
                db.session.rollback()

                for phase, fn, what in (
                    ("bus", self.publish_frame, "bus → socket"),
                    ("spine", self.commit_event, "commit → frame"),
                ):
                    note(f"{what}, {setting}: {count} at {rate:g}/s for {seconds:g}s")
                    _paced(rate, count, fn)
                    live.wait_for(lambda p=phase: len(self.received[p]) >= count, timeout=10.0)
                    self.workers.check_alive()
                    if live.error is not None:
                        raise BenchError(f"the live socket closed: {live.error!r}")
                    with self.lock:
                        got = dict(self.received[phase])
                        socket_messages = self.messages[phase]
                    lat = [(got[n] - t) * 1000 for n, t in self.sent[phase].items() if n in got]
                    if not lat:
                        raise BenchError(f"{what}: no frame arrived")
                    stats[phase] = st = summarize(lat)
                    bus = stats["bus"] if phase != "bus" else None
                    rows.append(
                        result(
                            f"{what} p50, coalesce {self.coalesce_ms}",
                            st["p50"],
                            "ms",
                            ratio=st["p50"] / bus["p50"] if bus else None,
                            vs="bus → socket" if bus else "",
                            detail=(
                                f"{len(got)}/{count} frames received ({rate:g}/s for "
                                f"{seconds:g}s) in {socket_messages} socket messages; {setting}"
                            ),
                        )
                    )
                    rows.append(
                        result(
                            f"{what} p99, coalesce {self.coalesce_ms}",
                            st["p99"],
                            "ms",
                            ratio=st["p99"] / bus["p99"] if bus else None,
                            vs="bus → socket" if bus else "",
                            detail=f"min {st['min']:.0f} ms, max {st['max']:.0f} ms",
                        )
                    )
                self.penv.drain()
                starts = self.handler_starts(first_id)
                waits = [(starts[n] - t) * 1000 for n, t in self.sent_wall.items() if n in starts]
                if waits:
                    queued = summarize(waits)
                    rows.append(
                        result(
                            f"commit → handler p50, coalesce {self.coalesce_ms}",
                            queued["p50"],
                            "ms",
                            ratio=queued["p50"] / stats["spine"]["p50"],
                            vs="commit → frame",
                            detail=(
                                f"p99 {queued['p99']:.0f} ms; until live_feed starts: commit, "
                                "dispatch, Redis, a worker taking the message"
                            ),
                        )
                    )
            finally:
                db.session.remove()
        return rows
