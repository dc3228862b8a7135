"""Non-blocking socket calls that keep the GIL (events.nowait): the senders' writes and the
assistant's stream reads give the same bytes and errors as the socket's own methods,
without handing the interpreter to other threads at every call."""

from __future__ import annotations

import select
import socket
import sys
import threading

import pytest

from events.fanout import QueuedWriter
from events.nowait import NowaitSocket, recv_nowait, send_nowait


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _read_all(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def _another_thread_ran_during(calls):
    """(whether a thread made runnable just before `calls` ran before they ended, their
    result), with a switch interval long enough that only a released GIL would let it."""
    go = threading.Event()
    ran = threading.Event()
    thread = threading.Thread(target=lambda: (go.wait(), ran.set()))
    thread.start()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(5.0)
    try:
        go.set()  # the other thread may now run whenever this one lets go of the GIL
        result = calls()
        return ran.is_set(), result
    finally:
        sys.setswitchinterval(interval)
        go.set()
        thread.join(10)


def test_bytes_and_slices_arrive_as_sent(pair):
    a, b = pair
    data = b"\x81\x05hello" + bytes(range(256)) * 4
    assert send_nowait(a, data) == len(data)
    view = memoryview(b"0123456789")
    assert send_nowait(a, view[3:]) == 7
    assert send_nowait(a, bytearray(b"\x00tail\x00")) == 6
    assert _read_all(b) == data + b"3456789" + b"\x00tail\x00"


def test_a_full_socket_takes_what_fits_then_raises_blocking(pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    chunk = b"x" * 65536
    total = 0
    with pytest.raises(BlockingIOError):
        for _ in range(1000):  # the peer reads nothing: the buffers fill up
            total += send_nowait(a, chunk)
    assert 0 < total < 1000 * len(chunk)
    received = b""
    while len(received) < total:
        received += b.recv(1 << 20)
    assert received == b"x" * total  # nothing lost, nothing doubled


def test_a_closed_peer_or_socket_raises_oserror(pair):
    a, b = pair
    b.close()
    with pytest.raises(OSError):
        for _ in range(3):  # the first write may still be taken before the reset is seen
            send_nowait(a, b"hello")
    a.close()
    with pytest.raises(OSError):
        send_nowait(a, b"hello")


def test_writes_do_not_hand_the_interpreter_to_other_threads(pair):
    """A sender writing to hundreds of sockets must not wait behind busy threads after each
    write: no other thread runs during a round of writes (with a switch interval long
    enough that only a released GIL would let it)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the GIL-holding send is Linux's")
    a, b = pair
    ran, _ = _another_thread_ran_during(lambda: [send_nowait(a, b"frame") for _ in range(200)])
    assert not ran
    assert _read_all(b) == b"frame" * 200


def test_queued_writer_keeps_order_across_a_backlog(pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    backlogs = []
    writer = QueuedWriter(a, 1 << 26, backlogs.append)
    parts = [bytes([65 + i % 26]) * 30000 for i in range(40)]
    for part in parts:
        writer.send(part)
    assert backlogs  # the kernel could not take it all at once
    received = b""
    while len(received) < sum(map(len, parts)):
        writer.flush()
        b.settimeout(5)
        received += b.recv(1 << 20)
    assert received == b"".join(parts)


@pytest.fixture
def nowait_pair():
    a, b = socket.socketpair()
    reader = NowaitSocket(a.family, a.type, a.proto, fileno=a.detach())
    reader.setblocking(False)
    yield reader, b
    reader.close()
    b.close()


def test_nowait_reads_give_what_was_sent_then_the_end(nowait_pair):
    reader, b = nowait_pair
    with pytest.raises(BlockingIOError):
        reader.recv(1024)  # nothing yet
    payload = bytes(range(256)) * 1000
    writer = threading.Thread(target=b.sendall, args=(payload,))
    writer.start()
    got = b""
    while len(got) < len(payload):
        try:
            got += reader.recv(100_000)
        except BlockingIOError:
            select.select([reader], [], [], 5)
    writer.join(10)
    assert got == payload
    b.sendall(b"\x00into\x00")
    buffer = bytearray(64)
    view = memoryview(buffer)
    assert reader.recv_into(view[10:], 4) == 4
    assert bytes(buffer[10:14]) == b"\x00int"
    assert reader.recv_into(buffer) == 2
    assert bytes(buffer[:2]) == b"o\x00"
    b.close()
    assert reader.recv(1024) == b""  # the peer's end


def test_nowait_reads_do_not_hand_the_interpreter_to_other_threads(nowait_pair):
    if not sys.platform.startswith("linux"):
        pytest.skip("the GIL-holding recv is Linux's")
    reader, b = nowait_pair
    b.sendall(b"x" * 200)
    ran, got = _another_thread_ran_during(lambda: b"".join(reader.recv(1) for _ in range(200)))
    assert not ran
    assert got == b"x" * 200


def test_recv_nowait_reads_a_plain_socket_without_waiting(pair):
    a, b = pair
    a.setblocking(False)
    with pytest.raises(BlockingIOError):
        recv_nowait(a, 100)
    b.sendall(b"REP 1 BATT_CHARGE 080\r\n> < REP 2")
    assert recv_nowait(a, 10) == b"REP 1 BATT"
    assert recv_nowait(a, 1000) == b"_CHARGE 080\r\n> < REP 2"
    b.close()
    assert recv_nowait(a, 100) == b""
