"""deathstar.Executor held to ProcessPoolExecutor's behaviour: one test body, run against
both."""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import time
from typing import Callable, Iterator

import pytest

import deathstar
from deathstar.futures import Executor
from tests import jobs
from tests.conftest import Daemon

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=["ProcessPoolExecutor", "deathstar"])
def executor(request: pytest.FixtureRequest, daemons: Callable[..., Daemon]
             ) -> Iterator[cf.Executor]:
    if request.param == "deathstar":
        ex: cf.Executor = Executor(cluster=[daemons(2).address])
    else:
        ex = cf.ProcessPoolExecutor(2)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def original(exc: BaseException | None) -> BaseException | None:
    """The exception the function raised (deathstar wraps it in RemoteError)."""
    return getattr(exc, "exception", None) or exc


def test_submit_and_result(executor: cf.Executor) -> None:
    futures = [executor.submit(jobs.add, i, y=10) for i in range(20)]
    assert [f.result(timeout=30) for f in futures] == [i + 10 for i in range(20)]
    assert all(f.done() and not f.cancelled() for f in futures)


def test_exceptions_reach_the_future(executor: cf.Executor) -> None:
    future = executor.submit(jobs.fail_on_multiples_of, 10, k=5)
    exc = future.exception(timeout=30)
    assert isinstance(original(exc), ValueError) and "multiple of 5" in str(original(exc))
    with pytest.raises(Exception) as info:
        future.result()
    assert isinstance(original(info.value), ValueError)


def test_map_is_ordered_and_raises_at_its_item(executor: cf.Executor) -> None:
    assert list(executor.map(jobs.jitter_square, range(50))) == [x * x for x in range(50)]
    assert list(executor.map(jobs.add, [1, 2], [10, 20])) == [11, 22]
    results = executor.map(jobs.fail_on_multiples_of, [1, 2, 5, 6], itertools.repeat(5))
    assert next(results) == 1 and next(results) == 2
    with pytest.raises(Exception) as info:
        next(results)
    assert isinstance(original(info.value), ValueError)


def test_map_timeout(executor: cf.Executor) -> None:
    started = time.monotonic()
    results = executor.map(jobs.sleep_for, [0.01, 5.0], timeout=1.0)
    with pytest.raises(TimeoutError):
        list(results)
    assert time.monotonic() - started < 4.5


def test_as_completed_and_wait(executor: cf.Executor) -> None:
    futures = {executor.submit(jobs.sleep_for, s): s for s in (0.6, 0.05, 0.3)}
    order = [futures[f] for f in cf.as_completed(futures, timeout=30)]
    assert sorted(order) == [0.05, 0.3, 0.6] and order[0] == 0.05
    fs = [executor.submit(jobs.sleep_for, 2.0), executor.submit(jobs.sleep_for, 0.05)]
    done, not_done = cf.wait(fs, timeout=30, return_when=cf.FIRST_COMPLETED)
    assert fs[1] in done and fs[0] in not_done


def test_queued_futures_can_be_cancelled(executor: cf.Executor) -> None:
    blockers = [executor.submit(jobs.sleep_for, 0.5) for _ in range(8)]
    last = executor.submit(jobs.square, 3)  # behind the blockers: still queued
    assert last.cancel() and last.cancelled()
    assert all(b.result(timeout=30) == 0.5 for b in blockers)
    with pytest.raises(cf.CancelledError):
        last.result()


def test_shutdown_cancel_futures_and_no_submit_after(executor: cf.Executor) -> None:
    futures = [executor.submit(jobs.sleep_for, 0.3) for _ in range(12)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert any(f.cancelled() for f in futures)
    assert all(f.done() for f in futures)
    with pytest.raises(RuntimeError):
        executor.submit(jobs.square, 1)


def test_context_manager_waits(executor: cf.Executor) -> None:
    with executor as ex:
        futures = [ex.submit(jobs.sleep_for, 0.1) for _ in range(4)]
    assert all(f.done() and f.result() == 0.1 for f in futures)


# ---------------------------------------------------------------- deathstar only


def test_executor_leaves_the_cluster_and_daemons_running(daemon: Daemon) -> None:
    with deathstar.Cluster([daemon.address]) as c:
        with c.executor() as ex:
            assert ex.submit(jobs.square, 4).result(timeout=30) == 16
        assert c.map(jobs.square, [5]) == [25]  # the cluster is still open
    assert daemon.status()["workers"] == 2


def test_embedded_executor_and_remote_error_details() -> None:
    with Executor() as ex:
        exc = ex.submit(jobs.fail_on_multiples_of, 5).exception(timeout=60)
    assert isinstance(exc, deathstar.RemoteError) and "fail_on_multiples_of" in \
        exc.remote_traceback


def test_map_reads_inputs_lazily(daemon: Daemon) -> None:
    with Executor([daemon.address]) as ex:
        results = ex.map(jobs.square, itertools.count())
        assert [next(results) for _ in range(100)] == [x * x for x in range(100)]
        results.close()


def test_joblib_backend_runs_on_the_cluster(daemon: Daemon) -> None:
    joblib = pytest.importorskip("joblib")
    deathstar.register_joblib()
    with joblib.parallel_config(backend="deathstar", cluster=[daemon.address]):
        out = joblib.Parallel(n_jobs=-1)(joblib.delayed(jobs.add)(i, y=1) for i in range(200))
        pids = set(joblib.Parallel(n_jobs=-1)(joblib.delayed(jobs.whoami)(i)
                                              for i in range(20)))
    assert out == [i + 1 for i in range(200)]
    import os

    assert str(os.getpid()) not in {p.rpartition(":")[2] for p in pids}
    assert daemon.status()["tasks_done"] >= 20
    with joblib.parallel_config(backend="deathstar", cluster=[daemon.address]):
        with pytest.raises(Exception) as info:
            joblib.Parallel(n_jobs=2)(joblib.delayed(jobs.fail_on_multiples_of)(i, 3)
                                      for i in range(1, 5))
    assert isinstance(original(info.value), ValueError)
