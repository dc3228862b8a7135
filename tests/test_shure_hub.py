"""The Shure client's connections share one I/O thread per service (the hub), over real TCP
against simulated receivers: few threads for many receivers, no wake-ups while nothing
happens, and no receiver (silent, unreachable, flooding, restarting) holding up the others."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import replace

import pytest

from models.devices import DeviceEndpoint
from services import netpolicy
from services.manufacturers.shure import ShureService, ShureSettings
from services.manufacturers.simulator import Fleet
from tests.helpers import wait_for
from tests.test_shure_families import FAST as FAMILIES_FAST

# The families' fast settings, metering once a second (these tests count wake-ups and CPU)
# and with room for a loaded machine's connects.
FAST = replace(FAMILIES_FAST, meter_rate_ms=1000, silence_timeout=3.0, connect_timeout=3.0)


def shure_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("shure")]


def socket_count() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def endpoints_of(addresses) -> list[DeviceEndpoint]:
    return [DeviceEndpoint(host=host, port=port) for host, port in addresses]


def online(reports) -> dict[int, bool]:
    return {r.port: r.online for r in reports if r.kind == "receiver"}


@contextlib.contextmanager
def shure_service(settings: ShureSettings = FAST):
    service = ShureService(settings)
    # The policy the app has while it runs simulated receivers (they listen on loopback).
    service.address_problem = netpolicy.device_checker({"DEVICES_SIMULATOR_RECEIVERS": 1})
    try:
        yield service
    finally:
        service.shutdown()


@contextlib.contextmanager
def silent_receiver():
    """Takes the TCP connection (the kernel's backlog) and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=8)
    try:
        yield listener.getsockname()
    finally:
        listener.close()


@contextlib.contextmanager
def unreachable_receiver():
    """A connect that hangs: its accept queue is full, so the SYNs go unanswered."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=1)
    try:
        yield listener.getsockname()
    finally:
        filler.close()
        listener.close()


@contextlib.contextmanager
def flooding_receiver():
    """Sends property changes and meter samples as fast as the client reads them."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    chunk = (b"< REP 1 TX_TYPE ULXD2 >< SAMPLE 1 ALL AB 098 039 >< REP 1 BATT_BARS 004 >") * 800

    def serve() -> None:
        clients = []
        try:
            while not stop.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                client.settimeout(0.1)
                clients.append(client)
                while not stop.is_set():
                    try:
                        client.sendall(chunk)
                    except TimeoutError:
                        continue
                    except OSError:
                        break
        finally:
            for client in clients:
                client.close()

    thread = threading.Thread(target=serve, name="test flood", daemon=True)
    thread.start()
    try:
        yield listener.getsockname()
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.fixture(autouse=True)
def no_shure_threads_before():
    """Other tests' connector threads end on their own within seconds: counted from none."""
    assert wait_for(lambda: not shure_threads(), 5.0), shure_threads()


def test_fifty_receivers_are_served_by_a_handful_of_threads():
    with Fleet(50, seed=11) as fleet, shure_service() as service:
        endpoints = endpoints_of(fleet.endpoints)
        assert all(online(service.fetch(endpoints, 3.0)).values())
        assert all(online(service.fetch(endpoints, 1.0)).values())
        # The connector threads go once every receiver is connected; the hub stays.
        assert wait_for(lambda: len(shure_threads()) == 1, 6.0), shure_threads()
        assert all(s.state == "connected" for s in service.status())


def test_idle_connections_cost_no_wake_ups():
    """Meters off and a long watchdog: nothing is due for seconds, so nothing runs."""
    quiet = ShureSettings(
        meter_rate_ms=0, silence_timeout=20.0, connect_timeout=1.0, identify_timeout=0.3
    )
    with Fleet(20, seed=12) as fleet, shure_service(quiet) as service:
        endpoints = endpoints_of(fleet.endpoints)
        assert all(online(service.fetch(endpoints, 3.0)).values())
        wait_for(lambda: len(shure_threads()) <= 1, 6.0)  # the connectors have gone

        def switches() -> int:
            total = 0
            for thread in shure_threads():
                with contextlib.suppress(OSError):
                    with open(f"/proc/self/task/{thread.native_id}/status") as status:
                        for line in status:
                            if line.startswith("voluntary_ctxt_switches"):
                                total += int(line.split()[1])
            return total

        before = switches()
        time.sleep(1.5)
        # A thread per receiver that looks 4 times a second would switch 120 times here.
        assert switches() - before <= 5
        assert len(shure_threads()) == 1


def test_silent_and_unreachable_receivers_never_delay_the_others():
    with (
        Fleet(4, seed=13) as fleet,
        silent_receiver() as silent,
        unreachable_receiver() as unreachable,
        shure_service() as service,
    ):
        endpoints = endpoints_of([silent, unreachable, *fleet.endpoints])
        started = time.monotonic()
        reports = service.fetch(endpoints, timeout=1.0)
        took = time.monotonic() - started
        assert took < 1.4, took
        assert online(reports) == {
            silent[1]: False,
            unreachable[1]: False,
            **{port: True for _, port in fleet.endpoints},
        }
        status = {s.port: s for s in service.status()}
        assert status[unreachable[1]].state == "connecting"  # still trying, elsewhere
        assert status[silent[1]].state == "connected"
        # Again, while the connect still hangs and the silent one is being asked again.
        started = time.monotonic()
        reports = service.fetch(endpoints, timeout=1.0)
        assert time.monotonic() - started < 1.4
        assert all(online(reports)[port] for _, port in fleet.endpoints)


def test_many_unplugged_receivers_do_not_hold_up_the_live_ones():
    """A venue where a third of the receivers are switched off: every connect to them hangs
    for connect_timeout, and the live ones listed after them still answer the first poll."""
    with contextlib.ExitStack() as stack:
        unplugged = [stack.enter_context(unreachable_receiver()) for _ in range(40)]
        fleet = stack.enter_context(Fleet(3, seed=16))
        # Each hung connect takes 1 s: forty of them one batch after another outlast the poll.
        service = stack.enter_context(shure_service(replace(FAST, connect_timeout=1.0)))
        reports = service.fetch(endpoints_of([*unplugged, *fleet.endpoints]), timeout=1.5)
        answered = online(reports)
        assert all(answered[port] for _, port in fleet.endpoints), answered
        assert not any(answered[port] for _, port in unplugged)


def test_a_flooding_receiver_does_not_starve_the_others():
    with Fleet(5, seed=14) as fleet, flooding_receiver() as flood, shure_service() as service:
        endpoints = endpoints_of([flood, *fleet.endpoints])
        service.fetch(endpoints, timeout=1.0)
        for _ in range(5):
            started = time.monotonic()
            reports = service.fetch(endpoints, timeout=1.0)
            # Bounded by its 1 s timeout (with room for a loaded machine), however fast the
            # flood comes; a starved hub shows as the others offline.
            assert time.monotonic() - started < 3.0
            assert all(online(reports)[port] for _, port in fleet.endpoints), online(reports)
            time.sleep(0.1)
        status = {s.port: s for s in service.status()}
        assert status[flood[1]].frames > 10_000  # it was being read all along


def test_shutdown_closes_every_socket_and_ends_the_hub():
    with Fleet(6, seed=15) as fleet:
        sockets_before = socket_count()
        service = ShureService(FAST)
        service.address_problem = netpolicy.device_checker({"DEVICES_SIMULATOR_RECEIVERS": 1})
        endpoints = endpoints_of(fleet.endpoints)
        try:
            assert all(online(service.fetch(endpoints, 2.0)).values())
            assert all(r.client_count == 1 for r in fleet.receivers)
            # One connection stopped alone: its socket closes, the others stay.
            first = service.connection(*fleet.endpoints[0])
            first.stop()
            assert first.status().state == "stopped" and not first.alive
            assert wait_for(lambda: fleet.receivers[0].client_count == 0, 2.0)
            assert all(r.client_count == 1 for r in fleet.receivers[1:])
        finally:
            service.shutdown()
        assert not [t for t in threading.enumerate() if t.name == "shure hub"]
        assert all(s.state == "stopped" for s in service.status()) or not service.status()
        assert wait_for(lambda: all(r.client_count == 0 for r in fleet.receivers), 2.0)
        assert wait_for(lambda: socket_count() == sockets_before, 2.0)
        assert wait_for(lambda: not shure_threads(), 4.0), shure_threads()

        # The service is usable again after a shutdown (tests and the CLI reuse it).
        try:
            assert all(online(service.fetch(endpoints, 2.0)).values())
        finally:
            service.shutdown()
        # (The simulated receivers' ends close when their loop sees ours go: on a loaded
        # machine that can take a moment.)
        assert wait_for(lambda: all(r.client_count == 0 for r in fleet.receivers), 5.0)
        assert wait_for(lambda: socket_count() == sockets_before, 5.0), (
            socket_count(),
            sockets_before,
        )


@pytest.mark.parametrize("down_for", [0.0, 1.0])
def test_a_restarted_receiver_comes_back_after_back_off(down_for):
    with Fleet(3, seed=16) as fleet, shure_service() as service:
        endpoints = endpoints_of(fleet.endpoints)
        gone, *others = fleet.receivers
        assert all(online(service.fetch(endpoints, 2.0)).values())
        gone.drop()
        reports = service.fetch(endpoints, timeout=1.0)
        assert online(reports) == {
            gone.port: False,
            **{r.port: True for r in others},
        }
        status = {s.port: s for s in service.status()}[gone.port]
        assert status.state in {"backoff", "connecting"} and status.failures >= 1
        time.sleep(down_for)  # a few failed attempts in between
        failures = {s.port: s for s in service.status()}[gone.port].failures
        if down_for:
            assert failures >= 3  # retried, with back-off capped at 0.3 s
        gone.restore()
        reports = service.fetch(endpoints, timeout=2.0)
        assert all(online(reports).values())
        status = {s.port: s for s in service.status()}[gone.port]
        assert status.state == "connected" and status.connects == 2


def test_a_poll_is_not_answered_by_an_attempt_that_began_before_it():
    """A receiver that comes back while a reconnect attempt (begun while it was down) is
    still under way: the poll that asks after it comes back waits for the next attempt,
    instead of reporting the receiver offline because that older attempt failed."""
    with Fleet(1, seed=18) as fleet, shure_service() as service:
        endpoints = endpoints_of(fleet.endpoints)
        (receiver,) = fleet.receivers
        assert all(online(service.fetch(endpoints, 2.0)).values())
        receiver.drop()
        assert not any(online(service.fetch(endpoints, timeout=1.0)).values())

        # The next attempt stalls in its address check (a slow resolver, say) and fails.
        allowed = service.address_problem
        entered, release = threading.Event(), threading.Event()

        def stalling(address):
            if not release.is_set():
                entered.set()
                release.wait(5.0)
                return "the receiver was down when this attempt began"
            return allowed(address)

        service.address_problem = stalling
        conn = service.connection(*fleet.endpoints[0])
        assert entered.wait(3.0)
        receiver.restore()
        asked_at = conn.last_used
        polled: list = []
        poll = threading.Thread(target=lambda: polled.extend(service.fetch(endpoints, 3.0)))
        poll.start()
        assert wait_for(lambda: conn.last_used > asked_at, 2.0)  # the poll is waiting
        release.set()  # only now does the older attempt fail
        poll.join(5.0)
        assert online(polled) == {receiver.port: True}


def test_a_forked_child_opens_its_own_connections():
    """A process forked while connected (a worker started from a warm parent) has no hub
    thread: its copies of the parent's connections count as stopped, new ones work."""
    with Fleet(2, seed=17) as fleet, shure_service() as service:
        endpoints = endpoints_of(fleet.endpoints)
        assert all(online(service.fetch(endpoints, 2.0)).values())
        pid = os.fork()
        if pid == 0:  # the child: never back into pytest
            code = 1
            try:
                ok = all(online(service.fetch(endpoints, 2.0)).values())
                code = 0 if ok and all(s.connects == 1 for s in service.status()) else 2
                service.shutdown()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's connections were not disturbed by the child.
        assert all(online(service.fetch(endpoints, 1.0)).values())
        assert all(s.connects == 1 for s in service.status())


def test_a_receiver_that_reads_nothing_is_dropped_without_blocking_the_others():
    slow = replace(
        FAST,
        silence_timeout=30.0,
        connect_timeout=0.5,
        identify_timeout=0.1,
        backoff_initial=5.0,
        backoff_max=5.0,
    )
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)  # taken by the kernel, never read
    deaf = listener.getsockname()
    with listener, Fleet(2, seed=18) as fleet, shure_service(slow) as service:
        endpoints = endpoints_of([deaf, *fleet.endpoints])
        service.fetch(endpoints, 1.0)
        conn = service.connection(*deaf)
        # A small send buffer, so a few kilobytes of unread commands fill it (setting it
        # from this thread is safe: the kernel serialises socket options).
        conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2048)
        deadline = time.monotonic() + 3.0
        while "send" not in conn.status().last_error and time.monotonic() < deadline:
            for _ in range(50):
                conn.request_probe()  # each one a hello: it was never answered
            time.sleep(0.01)
        assert "send timed out" in conn.status().last_error
        started = time.monotonic()
        reports = service.fetch(endpoints, 1.0)
        assert time.monotonic() - started < 1.4
        assert all(online(reports)[port] for _, port in fleet.endpoints)
