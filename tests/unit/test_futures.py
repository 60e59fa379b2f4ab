"""The executor's futures: ``CallFuture`` tells the I/O thread whether a done-callback
was added (it then leaves the future to the executor's thread) and whether a thread is
blocked on the outcome (it then hands that thread the GIL at once)."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Any

import pytest

from deathstar.client.futures import CallFuture
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(30)


def _blocked_in(method: str, future: CallFuture) -> tuple[threading.Thread, list[Any]]:
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(getattr(future, method)(timeout=20)))
    thread.start()
    wait_for(lambda: future.awaited, 10, f"a thread blocked in {method}()")
    return thread, got


@pytest.mark.parametrize("method", ["result", "exception"])
def test_a_thread_blocked_on_the_outcome_is_seen_until_it_has_it(method: str) -> None:
    future = CallFuture()
    assert not future.awaited
    thread, got = _blocked_in(method, future)
    error = ValueError("boom")
    assert future.settle_unless_hooked(method == "result", 7 if method == "result" else error)
    thread.join(10)
    assert got == [7 if method == "result" else error]
    assert not future.awaited
    assert future.result(timeout=0) == 7 if method == "result" else future.exception() is error


def test_a_wait_that_times_out_is_not_counted_after() -> None:
    future = CallFuture()
    with pytest.raises(cf.TimeoutError):
        future.result(timeout=0.01)
    with pytest.raises(cf.TimeoutError):
        future.exception(timeout=0.01)
    assert not future.awaited


def test_a_future_with_a_done_callback_is_left_to_the_executors_thread() -> None:
    plain, hooked = CallFuture(), CallFuture()
    seen: list[cf.Future[Any]] = []
    hooked.add_done_callback(seen.append)
    assert plain.settle_unless_hooked(True, 1) and plain.result() == 1
    assert not hooked.settle_unless_hooked(True, 2)
    assert not hooked.done() and seen == []
    late: list[str] = []
    plain.add_done_callback(lambda f: late.append(threading.current_thread().name))
    assert late == [threading.current_thread().name]  # resolved: runs at once, here


def test_a_cancelled_future_stays_cancelled() -> None:
    future = CallFuture()
    assert future.cancel()
    assert future.settle_unless_hooked(True, 1)  # nothing to resolve: not left for later
    assert future.cancelled()
