"""The senders' non-blocking socket writes (events.fanout.send_nowait): the same bytes and
errors as socket.send, without handing the GIL to other threads at every write."""

from __future__ import annotations

import socket
import sys
import threading

import pytest

from events.fanout import QueuedWriter, send_nowait


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
    go = threading.Event()
    ran = threading.Event()

    def other() -> None:
        go.wait()
        ran.set()

    thread = threading.Thread(target=other)
    thread.start()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(5.0)
    try:
        go.set()  # the other thread may now run whenever this one lets go of the GIL
        for _ in range(200):
            send_nowait(a, b"frame")
        ran_during_writes = ran.is_set()
    finally:
        sys.setswitchinterval(interval)
        go.set()
        thread.join(10)
    assert not ran_during_writes
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
