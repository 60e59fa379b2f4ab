"""Messages between a daemon and a worker it started, over two pipes (one each way)
instead of a ZeroMQ socket: no I/O thread on either end, so a message costs one write
and one read. Only the two processes hold the pipes (inherited at the worker's start), so
no handshake or key is needed. A hand-started worker still connects over ZeroMQ.

A message on a pipe: its frame count (u32), each frame's length (u64), the frames.
``WorkerPipe`` is the worker's end (blocking, as a ZeroMQ socket it stands in for);
``DaemonPipe`` the daemon's (never blocks its loop: what a full pipe cannot take now
waits for the pipe to be writable)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
from collections import deque
from typing import Any

#: Bytes asked of the kernel for each pipe (a message that fits is one write).
PIPE_BYTES = 1 << 20

#: Buffers handed to one writev (below the system's IOV_MAX).
_WRITEV_MAX = 512

_COUNT = struct.Struct("<I")
_LENGTH = 8
_READ_BYTES = 1 << 16
#: Messages up to this size are joined into one buffer before they are written.
_JOIN_BYTES = 1 << 14


class PipeClosed(ConnectionError):
    """The other end of the pipe is gone."""


def make_pipe() -> tuple[int, int]:
    """A pipe of ``PIPE_BYTES`` (where the kernel allows) whose ends are not inherited."""
    r, w = os.pipe()
    with contextlib.suppress(OSError, AttributeError):  # Linux >= 2.6.35 only
        fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ"), PIPE_BYTES)
    return r, w


def encode(frames: list[Any]) -> list[Any]:
    """The buffers that make one message: a header, then the frames (not copied; a
    message of small frames is joined into one buffer, as one write takes it anyway)."""
    views = [f if type(f) is bytes else memoryview(f).cast("B") for f in frames]
    lengths = [len(v) for v in views]
    header = struct.pack(f"<I{len(views)}Q", len(views), *lengths)
    if sum(lengths) <= _JOIN_BYTES:
        return [b"".join([header, *views])]
    return [header, *views]


class _Reader:
    """Complete messages out of the bytes read so far."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()
        self.pos = 0  # where the unparsed bytes start
        self.need = _COUNT.size  # bytes from ``pos`` the next step of parsing needs

    def fill(self) -> int:
        """Read what the pipe has (one read): 0 at end of file, 1 when the read took all
        the pipe had (it asked for more), 2 when more may wait."""
        if self.pos and self.pos == len(self.buf):
            self.buf.clear()
            self.pos = 0
        wanted = max(_READ_BYTES, self.need - (len(self.buf) - self.pos))
        data = os.read(self.fd, wanted)
        if not data:
            return 0
        if self.pos > len(self.buf) // 2:  # keep the buffer from growing with parsed bytes
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += data
        return 2 if len(data) == wanted else 1

    def take(self) -> list[bytes] | None:
        """The first complete message in the buffer; else None."""
        buf, pos = self.buf, self.pos
        have = len(buf) - pos
        if have < _COUNT.size:
            self.need = _COUNT.size
            return None
        (count,) = _COUNT.unpack_from(buf, pos)
        head = _COUNT.size + _LENGTH * count
        if have < head:
            self.need = head
            return None
        lengths = struct.unpack_from(f"<{count}Q", buf, pos + _COUNT.size)
        total = head + sum(lengths)
        if have < total:
            self.need = total
            return None
        frames, at = [], pos + head
        with memoryview(buf) as view:
            for length in lengths:
                frames.append(bytes(view[at:at + length]))
                at += length
        self.pos = pos + total
        self.need = _COUNT.size
        return frames


def _write_all(fd: int, buffers: list[Any]) -> list[Any]:
    """Write ``buffers`` until done or, on a non-blocking ``fd``, the pipe is full;
    returns what is left (views of the unwritten rest)."""
    if len(buffers) == 1 and type(buffers[0]) is bytes:  # a small message, joined
        data = buffers[0]
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            return buffers
        return [] if written == len(data) else [memoryview(data)[written:]]
    pending = deque(memoryview(b).cast("B") for b in buffers)
    while pending:
        try:
            written = os.writev(fd, list(pending)[:_WRITEV_MAX])
        except BlockingIOError:
            break
        while written and pending:
            head = pending[0]
            if written >= head.nbytes:
                written -= head.nbytes
                pending.popleft()
            else:
                pending[0] = head[written:]
                written = 0
    return list(pending)


class WorkerPipe:
    """The worker's end: the subset of a ZeroMQ DEALER socket the worker uses. Blocking;
    raises PipeClosed once the daemon has gone."""

    def __init__(self, read_fd: int, write_fd: int):
        self.reader = _Reader(read_fd)
        self.write_fd = write_fd
        self.inbox: deque[list[bytes]] = deque()
        self.closed = False
        self.poller = select.poll()
        self.poller.register(read_fd, select.POLLIN)

    @classmethod
    def from_spec(cls, spec: str) -> WorkerPipe:
        """From ``pipe:READ_FD,WRITE_FD`` (what the daemon passes a worker it starts)."""
        read_fd, write_fd = (int(fd) for fd in spec.removeprefix("pipe:").split(","))
        return cls(read_fd, write_fd)

    def poll(self, timeout_ms: int = 0) -> bool:
        """Whether a message (or the end) is there, waiting up to ``timeout_ms``."""
        if self.inbox or self.closed:
            return True
        if not self.poller.poll(timeout_ms):
            return False
        if not self.reader.fill():
            self.closed = True
            return True
        while (frames := self.reader.take()) is not None:
            self.inbox.append(frames)
        return bool(self.inbox)

    def recv_multipart(self, flags: int = 0, copy: bool = False) -> list[bytes]:
        """The next message (waits for it)."""
        while not self.inbox:
            if self.closed:
                raise PipeClosed("the daemon's end of the pipe is closed")
            self.poll(-1)
        return self.inbox.popleft()

    def send_multipart(self, frames: list[Any], flags: int = 0, copy: bool = False) -> None:
        """Send one message (waits while the pipe is full; with ``flags`` set, gives up
        then instead: a goodbye must not wait for a daemon that stopped reading)."""
        left = encode(frames)
        try:
            if flags:  # the one write that must not wait: the pipe is non-blocking for it
                os.set_blocking(self.write_fd, False)
                try:
                    left = _write_all(self.write_fd, left)
                finally:
                    os.set_blocking(self.write_fd, True)
                if left:
                    raise PipeClosed("the daemon does not read")
            while left:  # a blocking write takes all it can; the rest goes next round
                left = _write_all(self.write_fd, left)
        except BrokenPipeError as exc:
            raise PipeClosed("the daemon's end of the pipe is closed") from exc

    def close(self, linger: int = 0) -> None:
        for fd in (self.reader.fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class DaemonPipe:
    """The daemon's end of the pipes of its worker ``pid``; never blocks. ``ident`` names
    the worker in the daemon's books as a ZeroMQ routing id would."""

    def __init__(self, read_fd: int, write_fd: int, pid: int):
        self.pid = pid
        self.ident = b"pipe-%d" % pid
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self.reader = _Reader(read_fd)
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.pending: list[Any] = []  # what the pipe could not take yet
        self.closed = False

    def receive(self) -> list[list[bytes]]:
        """The messages that arrived complete (reads what the pipe has); at the end of
        the pipe ``closed`` becomes True."""
        messages = []
        try:
            while True:
                got = self.reader.fill()
                if not got:
                    self.closed = True
                    break
                while (frames := self.reader.take()) is not None:
                    messages.append(frames)
                if got == 1:  # the pipe is empty: no second read only to hear so
                    break
        except BlockingIOError:
            pass
        return messages

    def put(self, frames: list[Any]) -> None:
        """Queue one message; what the pipe takes now goes at once. Dropped when the
        worker has gone (its exit is noticed by the supervisor)."""
        if self.closed:
            return
        if self.pending:
            self.pending += encode(frames)
        else:
            self.flush(encode(frames))

    def wants_out(self) -> bool:
        """Part of a message waits for the pipe to be writable."""
        return bool(self.pending)

    def flush(self, buffers: list[Any] | None = None) -> None:
        """Write what waits (or ``buffers``) as far as the pipe takes it."""
        try:
            self.pending = _write_all(self.write_fd, self.pending if buffers is None
                                      else buffers)
        except OSError:  # the worker has gone
            self.pending = []
            self.closed = True

    def close(self) -> None:
        self.closed = True
        self.pending = []
        for fd in (self.reader.fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
