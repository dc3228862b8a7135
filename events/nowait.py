"""Non-blocking socket calls that keep the GIL.

CPython releases the GIL around every socket call, even one that cannot block. A thread
that serves hundreds of sockets in a round (the web's senders, the assistant's stream loop,
the Shure receivers' hub)
then gives the interpreter away at every call while other threads have work, and waits up to
the switch interval (5 ms) to get it back: rounds that needed milliseconds of CPU took
hundreds of milliseconds (bench/RESULTS.md, eighth stop). libc's send(2) and recv(2) called
through ctypes.PyDLL keep the GIL; with MSG_DONTWAIT they never wait, so the other threads
lose microseconds, not the sender milliseconds.

Linux only (elsewhere the socket's own methods are used), and only for sockets in
non-blocking use: a call that can block must let other threads run.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys
import threading
from typing import Any

_SEND_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
_RECV_FLAGS = socket.MSG_DONTWAIT


def _libc(name: str, argtypes: list[Any]) -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.PyDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_ssize_t
    return function


_SEND = _libc("send", [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int])
_RECV = _libc("recv", [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])


def _raise_errno() -> None:
    code = ctypes.get_errno()
    if code in (errno.EAGAIN, errno.EWOULDBLOCK):
        raise BlockingIOError(code, os.strerror(code))
    if code == errno.EINTR:
        raise InterruptedError(code, os.strerror(code))
    raise OSError(code, os.strerror(code))


def send_nowait(sock: socket.socket, data: bytes | bytearray | memoryview) -> int:
    """sock.send(data, MSG_DONTWAIT), keeping the GIL. Raises as socket.send does:
    BlockingIOError when the socket takes nothing now, InterruptedError, or OSError (a
    closed or reset socket)."""
    if _SEND is None:
        return sock.send(data, socket.MSG_DONTWAIT)
    if type(data) is not bytes:
        view = memoryview(data)
        whole = view.obj
        # A view of a whole bytes object (the usual queued message) needs no copy.
        data = whole if type(whole) is bytes and len(whole) == view.nbytes else view.tobytes()
    sent = _SEND(sock.fileno(), data, len(data), _SEND_FLAGS)
    if sent < 0:
        _raise_errno()
    return sent


_buffers = threading.local()
_RECV_BUFFER = 256 * 1024  # asyncio's largest read


def recv_nowait(sock: socket.socket, size: int) -> bytes:
    """sock.recv(size) on a non-blocking socket, keeping the GIL: what is there now (b"" at
    the peer's end). Raises as socket.recv does: BlockingIOError when nothing is, OSError."""
    if _RECV is None:
        return sock.recv(size)
    buffer = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = ctypes.create_string_buffer(_RECV_BUFFER)
    got = _RECV(sock.fileno(), buffer, min(size, _RECV_BUFFER), _RECV_FLAGS)
    if got < 0:
        _raise_errno()
    return ctypes.string_at(buffer, got)


class NowaitSocket(socket.socket):
    """A socket whose recv and recv_into keep the GIL, for a non-blocking socket read by an
    event loop (asyncio calls them only when the socket is readable, and a loop that reads
    hundreds of streams otherwise queues for the interpreter after every read)."""

    __slots__ = ()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if _RECV is None or flags or self.gettimeout() != 0.0:
            return super().recv(bufsize, flags)
        return recv_nowait(self, bufsize)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer)
        if _RECV is None or flags or self.gettimeout() != 0.0 or view.readonly:
            return super().recv_into(buffer, nbytes, flags)
        size = min(nbytes or view.nbytes, view.nbytes)
        if size == 0:
            return 0
        try:
            target = (ctypes.c_char * view.nbytes).from_buffer(view.cast("B"))
        except (TypeError, ValueError):  # not one writable run of bytes
            return super().recv_into(buffer, nbytes, flags)
        got = _RECV(self.fileno(), target, size, _RECV_FLAGS)
        if got < 0:
            _raise_errno()
        return got
