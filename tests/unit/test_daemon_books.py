"""What a worker may hold, and in which order its messages are reported when it dies: the
daemon's books (``WorkerConn``, ``Assignment``), with real objects."""

from __future__ import annotations

import time

import pytest

from deathstar import config
from deathstar.daemon.books import Assignment, WorkerConn
from deathstar.slot import slot_value

pytestmark = pytest.mark.timeout(30)


def _worker() -> WorkerConn:
    return WorkerConn(b"pipe-1", "host:1", 1, 1.0, time.monotonic())


def _message(send_id: int, est_s: float | None) -> Assignment:
    return Assignment(b"client", send_id, 1, None, est_s=est_s)


def _fill(worker: WorkerConn, est_s: float | None) -> int:
    """Give ``worker`` messages of ``est_s`` while it may take one; how many it holds."""
    send_id = 0
    while True:
        send_id += 1
        worker.assigned.append(_message(send_id, est_s))
        if not worker.can_prefetch() or send_id > 100:
            return len(worker.assigned)


def test_tiny_messages_queue_deep_behind_the_running_one() -> None:
    # messages of 10 µs: the worker holds as many as it may, the pipe never runs dry
    assert _fill(_worker(), 1e-5) == config.PREFETCH_WORKER_MAX


def test_messages_of_a_few_milliseconds_keep_one_behind() -> None:
    # one of 20 ms waiting is more than the cover: no third (W5's sleeps, a skewed map)
    assert _fill(_worker(), 0.02) == 2


def test_the_work_waiting_behind_is_bounded_by_the_cover() -> None:
    est = config.PREFETCH_COVER_S / 3.5
    held = _fill(_worker(), est)
    # while fewer than the cover's worth wait behind the running one, another may join
    assert (held - 2) * est < config.PREFETCH_COVER_S <= (held - 1) * est


def test_nothing_waits_behind_a_long_or_unknown_message() -> None:
    for est in (None, config.PREFETCH_MAX_EST_S * 2):
        worker = _worker()
        worker.assigned.append(_message(1, est))
        assert not worker.can_prefetch()
    worker = _worker()
    assert not worker.can_prefetch()  # holding nothing, it is idle, not prefetchable
    worker.assigned.extend([_message(1, 1e-5), _message(2, None)])
    assert not worker.can_prefetch()  # one of unknown length waits: nothing more


def test_a_crash_is_charged_to_the_message_the_slot_names() -> None:
    worker = _worker()
    worker.assigned.extend(_message(i, 1e-5) for i in (11, 12, 13, 14))
    ids = [job.id for job in worker.crash_order(None)]
    assert ids == [11, 12, 13, 14]
    assert [job.id for job in worker.crash_order(slot_value(11))] == [11, 12, 13, 14]
    # it had finished 11 and 12 (their results died with it) and was running 13
    assert [job.id for job in worker.crash_order(slot_value(13))] == [13, 14, 11, 12]
    # a slot naming none of them (an older message) changes nothing
    assert [job.id for job in worker.crash_order(slot_value(99))] == [11, 12, 13, 14]
