"""The pipes between a daemon and the workers it starts: messages come out whole and in
order however the bytes are cut, the daemon's end never blocks on a full pipe (what does
not fit waits for room), and either end sees the other go."""

from __future__ import annotations

import fcntl
import os
import select
import threading

import pytest

from deathstar.pipelink import _READ_BYTES, DaemonPipe, PipeClosed, WorkerPipe, encode, make_pipe

pytestmark = pytest.mark.timeout(30)


def _pair() -> tuple[DaemonPipe, WorkerPipe]:
    to_worker, from_worker = make_pipe(), make_pipe()
    daemon = DaemonPipe(from_worker[0], to_worker[1], pid=4242)
    worker = WorkerPipe.from_spec(f"pipe:{to_worker[0]},{from_worker[1]}")
    return daemon, worker


def _receive_all(daemon: DaemonPipe, count: int) -> list[list[bytes]]:
    got: list[list[bytes]] = []
    while len(got) < count and not daemon.closed:
        select.select([daemon.read_fd], [], [], 10)
        got += daemon.receive()
    return got


def test_messages_cut_anywhere_come_out_whole_and_in_order() -> None:
    daemon, worker = _pair()
    messages = [[b"env-%d" % i, os.urandom(i * 37), b""] for i in range(50)]
    stream = b"".join(bytes(b) for m in messages for b in encode(m))
    # written a few bytes at a time, the reader must wait for the rest of each message
    for at in range(0, len(stream), 7):
        os.write(worker.write_fd, stream[at:at + 7])
    assert _receive_all(daemon, 50) == messages
    assert daemon.ident == b"pipe-4242" and not daemon.closed


def test_one_receive_takes_everything_the_pipe_holds() -> None:
    """A read that fills what it asked for is followed by another (a message of several
    reads comes out in one ``receive``); a read that takes less has emptied the pipe."""
    daemon, worker = _pair()
    room = fcntl.fcntl(worker.write_fd, getattr(fcntl, "F_GETPIPE_SZ", 1032))
    if room // 2 <= _READ_BYTES:
        pytest.skip(f"this kernel's pipes hold {room} bytes: one read's worth")
    big = [b"env", os.urandom(room // 2)]  # several reads' worth, within the pipe's size
    worker.send_multipart(big)
    worker.send_multipart([b"after"])
    select.select([daemon.read_fd], [], [], 10)
    assert daemon.receive() == [big, [b"after"]]
    assert daemon.receive() == [] and not daemon.closed  # nothing more, still open


def test_a_message_larger_than_the_pipe_waits_for_room_without_blocking() -> None:
    daemon, worker = _pair()
    big = os.urandom(3 << 20)  # three times the pipe's size at most
    daemon.put([b"env", big])  # returns at once: the worker reads nothing yet
    assert daemon.wants_out()
    daemon.put([b"next", b"x"])  # queued behind, not interleaved

    received: list[list[bytes]] = []
    reader = threading.Thread(target=lambda: received.extend(
        [worker.recv_multipart(), worker.recv_multipart()]))
    reader.start()
    while daemon.wants_out():
        select.select([], [daemon.write_fd], [], 10)
        daemon.flush()
    reader.join(20)
    assert received == [[b"env", big], [b"next", b"x"]]


def test_small_messages_that_fill_the_pipe_come_out_whole_and_in_order() -> None:
    """A small message goes as one joined buffer; one that finds the pipe nearly full
    (each is larger than what a pipe writes whole) is written in part, and the rest,
    and what follows, waits for room."""
    daemon, worker = _pair()
    sent = []
    while not daemon.wants_out():
        sent.append([b"env-%d" % len(sent), os.urandom(9_999 + len(sent) % 7)])
        daemon.put(sent[-1])
    sent += [[b"after"], [b"end", b"x"]]
    daemon.put(sent[-2])
    daemon.put(sent[-1])
    got: list[list[bytes]] = []
    while len(got) < len(sent):
        assert worker.poll(10_000)
        got.append(worker.recv_multipart())
        daemon.flush()
    assert got == sent and not daemon.wants_out()


def test_the_worker_sees_its_daemon_go() -> None:
    daemon, worker = _pair()
    daemon.put([b"last"])
    daemon.close()
    assert worker.poll(1000)
    assert worker.recv_multipart() == [b"last"]  # what was sent before still arrives
    assert worker.poll(1000)  # then the end: it does not wait out the timeout
    with pytest.raises(PipeClosed):
        worker.recv_multipart()
    with pytest.raises(PipeClosed):
        worker.send_multipart([b"result"])


def test_the_daemon_sees_its_worker_go_and_drops_what_it_sends_then() -> None:
    daemon, worker = _pair()
    worker.send_multipart([b"result", b"payload"])
    worker.close()
    assert _receive_all(daemon, 2) == [[b"result", b"payload"]]
    assert daemon.closed
    daemon.put([b"task"])  # dropped, no BrokenPipeError: the supervisor sees the exit
    assert not daemon.wants_out()
