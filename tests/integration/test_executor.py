"""deathstar.Executor held to ProcessPoolExecutor's behaviour: one test body, run against
both (a two-process pool, a daemon with two workers); then what only deathstar's does.

Calls that must not finish yet wait on a *gate* (a file the test creates when it wants
them to finish), so no test relies on one sleep outlasting another.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import deathstar
from deathstar import config
from deathstar.client import Cluster
from deathstar.client.executor import Executor
from deathstar.errors import RemoteTraceback, TaskTimeout, WorkerCrashed
from deathstar.serialize import SerializationError
from tests import jobs
from tests.jobs import Gate, gated
from tests.conftest import Daemon, wait_for, worker_pids

pytestmark = pytest.mark.timeout(90)


# ---------------------------------------------------------------- gates and job functions



@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    return Gate(tmp_path / "gate")


@pytest.fixture(params=["ProcessPoolExecutor", "deathstar"])
def executor(request: pytest.FixtureRequest, daemons: Callable[..., Daemon], gate: Gate
             ) -> Iterator[cf.Executor]:
    if request.param == "deathstar":
        ex: cf.Executor = deathstar.Executor(cluster=[daemons(2).address])
    else:
        ex = cf.ProcessPoolExecutor(2)
    try:
        yield ex
    finally:
        gate.open()  # let a pool's gated calls end, or its shutdown would wait for them
        ex.shutdown(wait=True, cancel_futures=True)


def original(exc: BaseException | None) -> BaseException | None:
    """The exception the call raised: for an argument that does not pickle, deathstar
    raises SerializationError (a PicklingError) with the pickler's error as its cause."""
    if isinstance(exc, SerializationError):
        return exc.__cause__
    return exc


# ---------------------------------------------------------------- one body, two executors


def test_submit_returns_futures_that_resolve(executor: cf.Executor) -> None:
    futures = [executor.submit(jobs.add, i, 10, z=100) for i in range(20)]
    assert [f.result(timeout=30) for f in futures] == [i + 110 for i in range(20)]
    assert all(f.done() and not f.cancelled() and not f.running() for f in futures)


def test_an_exception_fails_its_own_future_only(executor: cf.Executor) -> None:
    bad = executor.submit(jobs.fail_on_multiples_of, 10, k=5)
    good = executor.submit(jobs.fail_on_multiples_of, 11, k=5)
    exc = original(bad.exception(timeout=30))
    assert isinstance(exc, ValueError) and "input 10 is a multiple of 5" in str(exc)
    with pytest.raises(Exception) as info:
        bad.result()
    assert isinstance(original(info.value), ValueError)
    assert good.result(timeout=30) == 11


def test_an_argument_that_does_not_pickle_fails_its_future(executor: cf.Executor) -> None:
    future = executor.submit(jobs.square, jobs.Unpicklable())
    exc = original(future.exception(timeout=30))
    assert isinstance(exc, TypeError) and "refuses to be pickled" in str(exc)
    assert executor.submit(jobs.square, 3).result(timeout=30) == 9


def test_map_gives_results_in_input_order(executor: cf.Executor) -> None:
    assert list(executor.map(jobs.jitter_square, range(60), timeout=60)) == [
        x * x for x in range(60)]
    assert list(executor.map(jobs.add, [1, 2, 3], [10, 20])) == [11, 22]  # the shortest
    assert list(executor.map(jobs.square, [])) == []


def test_map_raises_when_the_failed_item_is_reached(executor: cf.Executor) -> None:
    results = executor.map(jobs.fail_on_multiples_of, [1, 2, 5, 6], itertools.repeat(5))
    assert next(results) == 1 and next(results) == 2
    with pytest.raises(Exception) as info:
        next(results)
    assert isinstance(original(info.value), ValueError)
    with pytest.raises(StopIteration):
        next(results)


def test_map_timeout(executor: cf.Executor, gate: Gate) -> None:
    started = time.monotonic()
    results = executor.map(gated, [1, 2], ["", gate.name], timeout=1.0)
    assert next(results) == 1
    with pytest.raises(cf.TimeoutError):
        next(results)
    assert 0.95 <= time.monotonic() - started < 10


def test_map_timeout_runs_from_the_call(executor: cf.Executor, gate: Gate) -> None:
    results = executor.map(gated, [1], [gate.name], timeout=0.5)
    time.sleep(0.6)  # the time under test: the deadline passes before the first next()
    asked = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        next(results)
    assert time.monotonic() - asked < 0.4


def test_as_completed_yields_futures_as_they_finish(executor: cf.Executor, gate: Gate
                                                    ) -> None:
    slow = executor.submit(gated, "slow", gate.name)
    fast = [executor.submit(jobs.square, i) for i in range(3)]
    seen = []
    for future in cf.as_completed([slow, *fast], timeout=30):
        seen.append(future)
        if len(seen) == 3:
            gate.open()
    assert set(seen[:3]) == set(fast) and seen[3] is slow
    assert slow.result() == "slow"


def test_wait_first_completed_then_all(executor: cf.Executor, gate: Gate) -> None:
    slow = executor.submit(gated, "slow", gate.name)
    fast = executor.submit(jobs.square, 4)
    done, not_done = cf.wait([slow, fast], timeout=30, return_when=cf.FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    gate.open()
    done, not_done = cf.wait([slow, fast], timeout=30)
    assert done == {slow, fast} and not not_done


def test_a_queued_future_can_be_cancelled_a_running_one_cannot(executor: cf.Executor,
                                                               gate: Gate) -> None:
    blockers = [executor.submit(gated, i, gate.name) for i in range(8)]
    last = executor.submit(jobs.square, 3)  # behind the blockers: still queued
    wait_for(lambda: gate.started() >= 2, 30, "both workers to be busy")
    running = [b for b in blockers if b.running()]
    assert running and not running[0].cancel()
    assert last.cancel() and last.cancelled()
    gate.open()
    assert [b.result(timeout=30) for b in blockers] == list(range(8))
    with pytest.raises(cf.CancelledError):
        last.result()
    done, _ = cf.wait([last], timeout=10)  # the executor notified its waiters
    assert done == {last}


def test_shutdown_cancel_futures(executor: cf.Executor, gate: Gate) -> None:
    futures = [executor.submit(gated, i, gate.name) for i in range(12)]
    wait_for(lambda: gate.started() >= 2, 30, "both workers to be busy")
    executor.shutdown(wait=False, cancel_futures=True)
    # at most the workers + a small prefetch had started (a pool cancels in its own thread)
    wait_for(lambda: sum(f.cancelled() for f in futures) >= 12 - 5, 30, "the cancellations")
    gate.open()
    cancelled = [f for f in futures if f.cancelled()]
    for i, future in enumerate(futures):
        if future in cancelled:
            with pytest.raises(cf.CancelledError):
                future.result(timeout=30)
        else:  # the pool lets a running call finish; deathstar stops it on its node
            exc = future.exception(timeout=30)
            assert (exc is None and future.result() == i) or isinstance(exc, cf.CancelledError)
    with pytest.raises(RuntimeError):
        executor.submit(jobs.square, 1)
    with pytest.raises(RuntimeError):
        executor.map(jobs.square, [1])


def test_the_context_manager_waits_for_every_call(executor: cf.Executor) -> None:
    with executor as ex:
        futures = [ex.submit(jobs.sleep_for, 0.2) for _ in range(4)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [0.2] * 4
    with pytest.raises(RuntimeError):
        ex.submit(jobs.square, 1)


def test_done_callbacks_never_run_in_the_io_thread(daemon: Daemon) -> None:
    """Outcomes are resolved in the client's I/O thread when their futures have no
    done-callback; a callback added before the outcome runs in the executor's thread, one
    added after in the thread that adds it: never in the I/O thread."""
    with Cluster([daemon.address]) as c, Executor(c) as ex:
        gate = threading.Event()
        threads: list[str] = []
        before = [ex.submit(jobs.sleep_for, 0.3) for _ in range(4)]
        for future in before:
            future.add_done_callback(lambda f: threads.append(threading.current_thread().name))
        plain = [ex.submit(jobs.square, i) for i in range(20)]
        assert [f.result(timeout=30) for f in plain] == [i * i for i in range(20)]
        wait_for(lambda: len(threads) == 4, 30, "the callbacks added before")
        assert set(threads) == {"deathstar-executor"}, threads
        plain[0].add_done_callback(lambda f: (threads.append(
            threading.current_thread().name), gate.set()))
        assert gate.is_set() and threads[-1] == threading.current_thread().name


def test_done_callbacks_run_once_per_future(executor: cf.Executor) -> None:
    seen: list[cf.Future[Any]] = []
    futures = [executor.submit(jobs.square, i) for i in range(10)]
    for future in futures:
        future.add_done_callback(seen.append)
    wait_for(lambda: len(seen) >= 10, 30, "every callback")
    assert len(seen) == 10 and set(seen) == set(futures)


def test_submit_from_many_threads(executor: cf.Executor) -> None:
    with cf.ThreadPoolExecutor(8) as pool:
        futures = list(pool.map(lambda i: executor.submit(jobs.square, i), range(200)))
    assert [f.result(timeout=30) for f in futures] == [i * i for i in range(200)]


# ---------------------------------------------------------------- deathstar only


def test_remote_errors_carry_the_original_and_where_it_ran(daemon: Daemon) -> None:
    with deathstar.Executor([daemon.address]) as ex:
        exc = ex.submit(jobs.fail_on_multiples_of, 5).exception(timeout=30)
    assert type(exc) is ValueError
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "fail_on_multiples_of" in exc.__cause__.remote_traceback
    assert exc.node == daemon.address  # type: ignore[attr-defined]
    assert int(exc.worker.rpartition(":")[2]) in worker_pids(daemon)  # type: ignore


def test_timeouts_and_crashes_give_their_own_errors(daemon: Daemon, gate: Gate) -> None:
    with Cluster([daemon.address]) as c:
        with Executor(c, timeout=0.5) as ex:
            exc = ex.submit(gated, 1, gate.name).exception(timeout=30)
        assert isinstance(exc, TaskTimeout)
        with Executor(c, max_attempts=1) as ex:
            exc = ex.submit(jobs.segfault_on, 1, bad=1).exception(timeout=30)
            assert isinstance(exc, WorkerCrashed)
            assert ex.submit(jobs.square, 5).result(timeout=30) == 25  # the map goes on


def test_consecutive_calls_share_jobs(daemon: Daemon) -> None:
    """Calls submitted back to back ride in shared jobs (one function blob, fewer jobs
    than calls; how many depends on how fast this thread submits against the I/O thread,
    which takes every call waiting when it reads, so only "fewer" is certain)."""
    with Cluster([daemon.address]) as c:
        with Executor(c) as ex:
            futures = [ex.submit(jobs.square, i) for i in range(1000)]
            assert [f.result(timeout=30) for f in futures] == [i * i for i in range(1000)]
        made = next(c._job_ids) - 1  # jobs this Cluster numbered
        assert 1 <= made < len(futures)
        assert daemon.status()["blobs_received"] == 1


def test_one_call_at_a_time_rides_in_one_job_that_ends_when_idle(daemon: Daemon) -> None:
    """A call submitted after the last one was answered rides in the job still open for
    its function (no job to start and end per call); a call of another function starts
    its own and ends that one; an idle job ends by itself, and the next call starts
    another."""
    with Cluster([daemon.address]) as c:
        engine = c.engine
        with Executor(c) as ex:
            assert [ex.submit(jobs.square, i).result(timeout=30) for i in range(20)] == \
                [i * i for i in range(20)]
            assert next(c._job_ids) == 2  # one job made for the 20 calls
            assert ex.submit(jobs.add, 2, 3).result(timeout=30) == 5
            assert ex.submit(jobs.square, 7).result(timeout=30) == 49
            assert next(c._job_ids) == 5  # a job for add, then square's again (and 2, 4)
            wait_for(lambda: not engine.jobs, 30, "the idle job to end")
            assert ex.submit(jobs.square, 8).result(timeout=30) == 64
            assert next(c._job_ids) == 7
            wait_for(lambda: not engine.jobs, 30, "the idle job to end")
        assert daemon.status()["blobs_received"] == 2


def test_a_call_for_a_waiting_job_is_taken_at_once(daemons: Callable[..., Daemon],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A call submitted while its function's job waits for calls (the previous one
    answered) wakes the client's loop: it does not wait for the loop's next turn of its
    own. Here every periodic turn is a minute away (the client's and the node's
    heartbeats, the job's idle end, the node figures' refresh), so a missing wake-up
    shows as a call that takes a minute, not milliseconds."""
    monkeypatch.setattr(config, "FEED_IDLE_S", 60.0)
    monkeypatch.setattr(config, "NODE_FIGURES_S", 60.0)
    daemon = daemons(2, "--heartbeat", "60")
    with Cluster([daemon.address], heartbeat_s=60.0) as c:
        with Executor(c) as ex:
            assert ex.submit(jobs.square, 3).result(timeout=30) == 9
            for x in (4, 5):
                wait_for(lambda: ex._feed is not None and ex._feed.dry(), 30,
                         "the job to wait for calls")
                assert ex.submit(jobs.square, x).result(timeout=20) == x * x
            assert next(c._job_ids) == 2  # all three rode in the one job


def test_each_call_runs_the_function_as_it_was_when_submitted(daemon: Daemon) -> None:
    """The executor keeps the pickle of a module's function from call to call (it is
    only a name); a function that travels by value is pickled again at each submit, so
    what it captured then is what runs."""
    box = [1]

    def add_box(x: int) -> int:
        return x + box[0]

    with Executor(cluster=[daemon.address]) as ex:
        assert ex.submit(add_box, 1).result(timeout=30) == 2
        box[0] = 10
        assert ex.submit(add_box, 1).result(timeout=30) == 11
        assert [ex.submit(jobs.square, i).result(timeout=30) for i in (2, 3)] == [4, 9]
        box[0] = 100
        assert ex.submit(add_box, 1).result(timeout=30) == 101


def test_an_executor_on_a_cluster_leaves_it_and_the_daemon_running(daemon: Daemon) -> None:
    with Cluster([daemon.address]) as c:
        with Executor(c) as ex:
            assert ex.submit(jobs.square, 4).result(timeout=30) == 16
        assert c.map(jobs.square, [5]) == [25]  # the cluster is still open
    assert daemon.status()["workers"] == 2


def test_an_embedded_executor_lets_go_of_the_shared_daemon() -> None:
    """``Executor()`` with no cluster uses the process's shared embedded daemon: its
    shutdown ends the executor's connection and leaves the daemon warm for the next one
    (which stops at exit: test_shared_embedded.py)."""
    ex = deathstar.Executor()
    assert ex.cluster.local is None and ex.cluster.shared is not None
    shared = ex.cluster.shared
    assert ex.submit(jobs.square, 3).result(timeout=60) == 9
    ex.shutdown()
    assert not ex.cluster.engine.is_alive() and shared.alive()
    with deathstar.Executor() as again:
        assert again.cluster.shared is shared
        assert again.submit(jobs.square, 4).result(timeout=60) == 16


def test_map_reads_its_inputs_lazily(daemon: Daemon) -> None:
    read = itertools.count()

    def endless() -> Iterator[int]:
        for i in itertools.count():
            next(read)
            yield i

    with deathstar.Executor([daemon.address]) as ex:
        results = ex.map(jobs.square, endless())
        assert [next(results) for _ in range(100)] == [x * x for x in range(100)]
        assert next(read) < 60_000  # read ahead only as far as the back-pressure allows
        results.close()


def test_an_open_map_outlives_shutdown_and_then_closes_the_cluster(daemon: Daemon) -> None:
    with deathstar.Executor([daemon.address]) as ex:
        results = ex.map(jobs.square, range(10))
    assert ex.cluster.engine.is_alive()  # the map still needs it
    assert list(results) == [x * x for x in range(10)]
    assert not ex.cluster.engine.is_alive()


def test_shutdown_cancel_futures_cancels_queued_calls_and_open_maps(daemon: Daemon,
                                                                    gate: Gate) -> None:
    with Cluster([daemon.address]) as c:
        ex = Executor(c)
        futures = [ex.submit(gated, 0, gate.name)]
        results = ex.map(gated, [1, 2], ["", gate.name])
        assert next(results) == 1
        wait_for(lambda: gate.started() >= 2, 30, "both workers to be busy")
        futures += [ex.submit(gated, i, gate.name) for i in range(1, 7)]  # queued
        ex.shutdown(wait=False, cancel_futures=True)
        with pytest.raises(cf.CancelledError):
            next(results)  # the map's running call was stopped
        assert futures[0].running() and not futures[0].cancelled()
        assert any(f.cancelled() for f in futures[1:])
        gate.open()
        ex.shutdown(wait=True)
        for i, f in enumerate(futures):  # the running ones ran to their end
            assert f.cancelled() or f.result() == i
        assert c.map(jobs.square, range(4)) == [0, 1, 4, 9]


def test_a_closed_cluster_fails_the_calls_it_had(daemon: Daemon, gate: Gate) -> None:
    c = Cluster([daemon.address])
    ex = Executor(c)
    future = ex.submit(gated, 1, gate.name)
    wait_for(lambda: gate.started() >= 1, 30, "the call to start")
    c.close()
    assert isinstance(future.exception(timeout=30), RuntimeError)
    with pytest.raises(RuntimeError):
        ex.submit(jobs.square, 1)
    ex.shutdown()


def test_a_done_callback_may_submit_and_shut_down(daemon: Daemon) -> None:
    with deathstar.Executor([daemon.address]) as ex:
        chained: list[cf.Future[Any]] = []
        ended = threading.Event()

        def then(future: cf.Future[Any]) -> None:
            chained.append(ex.submit(jobs.square, future.result()))
            ex.shutdown(wait=True)  # in the executor's thread: must not wait for itself
            ended.set()

        ex.submit(jobs.square, 3).add_done_callback(then)
        assert ended.wait(30)
        assert chained[0].result(timeout=30) == 81


def test_a_script_function_runs_as_it_is_at_each_submit() -> None:
    """A function pickled by value keeps its pickle only while what it refers to is the
    same immutable objects: a global rebound, or a list changed in place, reaches the
    workers at the next call (``client.blobs.value_state``)."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec("K = 1\nBOX = [10]\n"  # noqa: S102 - the test's own source: a script's functions
         "def plus_k(x):\n    return x + K\n"
         "def plus_box(x):\n    return x + BOX[0]\n", namespace)
    with deathstar.Executor(max_workers=2) as ex:
        assert [ex.submit(namespace["plus_k"], 1).result(timeout=30) for _ in range(3)] \
            == [2, 2, 2]
        namespace["K"] = 5
        assert ex.submit(namespace["plus_k"], 1).result(timeout=30) == 6
        assert ex.submit(namespace["plus_box"], 1).result(timeout=30) == 11
        namespace["BOX"][0] = 20
        assert ex.submit(namespace["plus_box"], 1).result(timeout=30) == 21
