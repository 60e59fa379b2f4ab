"""joblib's Parallel on deathstar daemons: ``register_joblib()`` + ``parallel_config``."""

from __future__ import annotations

import os
import threading
from typing import Callable

import pytest

import deathstar
from deathstar.client import Cluster
from deathstar.errors import RemoteTraceback
from tests import jobs
from tests.conftest import Daemon, worker_pids

joblib = pytest.importorskip("joblib")

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(autouse=True)
def registered() -> None:
    deathstar.register_joblib()


def engine_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "deathstar-client")


def test_parallel_runs_on_the_daemon(daemon: Daemon) -> None:
    done_before = daemon.status()["tasks_done"]
    threads_before = engine_threads()
    with joblib.parallel_config(backend="deathstar", cluster=[daemon.address]):
        out = joblib.Parallel(n_jobs=-1)(joblib.delayed(jobs.add)(i, y=1) for i in range(200))
        where = joblib.Parallel()(joblib.delayed(jobs.whoami)(i) for i in range(20))
    assert out == [jobs.add(i, y=1) for i in range(200)]
    pids = {int(w.rpartition(":")[2]) for w in where}
    assert os.getpid() not in pids and pids <= set(worker_pids(daemon))
    assert daemon.status()["tasks_done"] > done_before
    assert engine_threads() == threads_before  # each Parallel call closed its connection


def test_n_jobs_minus_one_is_the_cluster_capacity(daemons: Callable[..., Daemon]) -> None:
    d = daemons(3)
    with joblib.parallel_config(backend="deathstar", cluster=[d.address]):
        assert joblib.effective_n_jobs(-1) == 3
        assert joblib.effective_n_jobs(-2) == 2
        assert joblib.effective_n_jobs(5) == 5


def test_the_functions_exception_is_raised_as_itself(daemon: Daemon) -> None:
    with joblib.parallel_config(backend="deathstar", cluster=[daemon.address]):
        with pytest.raises(ValueError, match="multiple of 3") as info:
            joblib.Parallel(n_jobs=2)(joblib.delayed(jobs.fail_on_multiples_of)(i, 3)
                                      for i in range(1, 50))
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "fail_on_multiples_of" in cause.remote_traceback


def test_a_given_cluster_is_reused_and_left_open(daemon: Daemon) -> None:
    with Cluster([daemon.address]) as c:
        with joblib.parallel_config(backend="deathstar", cluster=c, chunksize=4):
            for _ in range(3):
                out = joblib.Parallel()(joblib.delayed(jobs.square)(i) for i in range(50))
                assert out == [i * i for i in range(50)]
            unordered = joblib.Parallel(return_as="generator_unordered")(
                joblib.delayed(jobs.jitter_square)(i) for i in range(50))
            assert sorted(unordered) == [i * i for i in range(50)]
        assert c.map(jobs.square, [6]) == [36]
    assert daemon.status()["blobs_received"] >= 1


def test_a_bad_option_fails_in_parallel_config() -> None:
    with pytest.raises(TypeError):
        joblib.parallel_config(backend="deathstar", no_such_option=1)
