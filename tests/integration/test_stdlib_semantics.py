"""Where ``deathstar.Executor`` differed from ``concurrent.futures``: each difference found
by running CPython's own suite (Lib/test/test_concurrent_futures) against it is a test
here, written like the stdlib's test of that behaviour (named after it)."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import weakref
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import cloudpickle
import joblib
import pytest

import deathstar
from deathstar.client import Cluster
from deathstar.errors import RemoteError, WorkerCrashed
from tests import jobs
from tests.jobs import Gate, gated
from tests.conftest import ROOT, Daemon, wait_for, worker_pids

pytestmark = pytest.mark.timeout(90)

# ---------------------------------------------------------------- functions they map



INITIALIZER_STATUS = "uninitialized"


def init(status: str, marks: str) -> None:
    global INITIALIZER_STATUS
    INITIALIZER_STATUS = status
    with open(marks, "a") as fh:
        fh.write(f"{os.getpid()}\n")


def get_init_status(_: Any = None) -> tuple[str, int]:
    return INITIALIZER_STATUS, os.getpid()


def init_fail() -> None:
    raise ValueError("error in initializer")


class ExitAtUnpickle:
    """Unpickling it raises SystemExit (as the stdlib's test_deadlock)."""

    def __reduce__(self) -> Any:
        return _exit, ()


class ExitAtPickle:
    def __reduce__(self) -> Any:
        raise SystemExit("exit at pickle")


def _exit() -> None:
    raise SystemExit("exit at unpickle")


def return_instance(x: int, bad: int, cls: type, marks: str = "") -> Any:
    if marks:
        Path(marks, f"{x}.{os.getpid()}.{len(os.listdir(marks))}").touch()
    return cls() if x == bad else x


def raise_base(kind: type[BaseException]) -> None:
    raise kind("raised by the function")


class Dummy:
    """Something a call returns and a weak reference can follow."""


def make_dummy_object(_: Any) -> Dummy:
    return Dummy()


# ---------------------------------------------------------------- max_workers, initializer


def test_max_workers_negative() -> None:
    for number in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            deathstar.Executor(max_workers=number)
        with pytest.raises(ValueError, match="workers must be greater than 0"):
            Cluster(workers=number)


def test_max_workers_sets_the_embedded_daemons_workers() -> None:
    with deathstar.Executor(max_workers=1) as ex:
        assert ex.cluster.capacity == 1
        assert list(ex.map(abs, range(-3, 3))) == [3, 2, 1, 0, 1, 2]


def test_initializer(daemon: Daemon, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    with deathstar.Executor([daemon.address], initializer=init,
                            initargs=("initialized", str(marks))) as ex:
        futures = [ex.submit(get_init_status) for _ in range(40)]
        results = [f.result(timeout=30) for f in futures]
    assert {status for status, _ in results} == {"initialized"}
    ran = marks.read_text().split()
    assert sorted(ran) == sorted({str(pid) for _, pid in results})  # once per process


def test_initializer_failure_fails_the_calls(daemon: Daemon) -> None:
    """(The stdlib breaks the whole pool; here the calls fail with what it raised.)"""
    with deathstar.Executor([daemon.address], initializer=init_fail) as ex:
        future = ex.submit(get_init_status)
        with pytest.raises(ValueError, match="error in initializer"):
            future.result(timeout=30)


def test_joblib_initializer(daemon: Daemon, tmp_path: Path) -> None:
    deathstar.register_joblib()
    marks = tmp_path / "marks"
    with joblib.parallel_config(backend="deathstar", cluster=[daemon.address],
                                initializer=init, initargs=("via joblib", str(marks))):
        out = joblib.Parallel(n_jobs=2)(joblib.delayed(get_init_status)() for _ in range(10))
    assert {status for status, _ in out} == {"via joblib"}


# ---------------------------------------------------------------- BaseExceptions


@pytest.mark.parametrize("kind", [SystemExit, KeyboardInterrupt])
def test_exit_during_func_execution_on_worker(daemon: Daemon, kind: type) -> None:
    before = worker_pids(daemon)
    with deathstar.Executor([daemon.address]) as ex:
        future = ex.submit(raise_base, kind)
        assert type(future.exception(timeout=30)) is kind
        assert ex.submit(abs, -4).result(timeout=30) == 4
    assert daemon.status()["worker_restarts"] == 0 and worker_pids(daemon) == before


def test_exit_during_result_pickle_on_worker(daemon: Daemon, tmp_path: Path) -> None:
    with deathstar.Executor([daemon.address]) as ex:
        future = ex.submit(return_instance, 1, 1, ExitAtPickle, str(tmp_path))
        with pytest.raises(SystemExit):
            future.result(timeout=30)
    assert len(os.listdir(tmp_path)) == 1  # it ran once: the worker did not die
    assert daemon.status()["worker_restarts"] == 0


def test_exit_during_result_unpickle_in_result_handler(daemon: Daemon) -> None:
    """(The stdlib breaks the pool; here that input fails and the client goes on.)"""
    with Cluster([daemon.address]) as c:
        with deathstar.Executor(c) as ex:
            future = ex.submit(return_instance, 1, 1, ExitAtUnpickle)
            error = future.exception(timeout=30)
            assert isinstance(error, RemoteError) and "SystemExit" in error.message
            assert ex.submit(abs, -2).result(timeout=30) == 2
        assert c.map(abs, [-1]) == [1]  # the I/O thread lives


def test_one_bad_result_fails_only_its_own_input(daemon: Daemon) -> None:
    with Cluster([daemon.address]) as c:
        res = c.map(return_instance, range(40), chunksize=40, on_error="return",
                    bad=17, cls=ExitAtUnpickle)
        with deathstar.Executor(c, chunksize=40) as ex:
            futures = [ex.submit(return_instance, i, 17, ExitAtUnpickle) for i in range(40)]
            failed = [i for i, f in enumerate(futures) if f.exception(timeout=30)]
    assert [i for i, v in enumerate(res) if isinstance(v, BaseException)] == [17]
    assert [v for i, v in enumerate(res) if i != 17] == [i for i in range(40) if i != 17]
    assert failed == [17]


# ---------------------------------------------------------------- shutdown and exit


def test_cancel_futures(daemon: Daemon, gate: Gate) -> None:
    ex = deathstar.Executor([daemon.address])
    fs = [ex.submit(gated, i, gate.name) for i in range(50)]
    wait_for(lambda: gate.started() >= 2, 30, "both workers to be busy")
    ex.shutdown(wait=False, cancel_futures=True)
    gate.open()
    ex.shutdown(wait=True)
    cancelled = [f for f in fs if f.cancelled()]
    assert len(cancelled) > 20
    others = [f for f in fs if not f.cancelled()]
    for f in others:  # the running ones ran to their end
        assert f.done() and f.exception() is None
    assert len(others) > 0


def _python(code: str, address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), address], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_interpreter_shutdown(daemon: Daemon) -> None:
    proc = _python("""
        import sys, time
        import deathstar
        t = deathstar.Executor([sys.argv[1]])
        t.submit(time.sleep, 0.5).add_done_callback(lambda f: print("apple", f.result()))
        """, daemon.address)
    assert proc.stderr == "" and proc.stdout.strip() == "apple None"


def test_submit_after_interpreter_shutdown(daemon: Daemon) -> None:
    proc = _python("""
        import atexit, sys
        @atexit.register
        def run_last():
            try:
                t.submit(id, None)
            except RuntimeError:
                print("runtime-error")
                raise
        import deathstar
        t = deathstar.Executor([sys.argv[1]])
        """, daemon.address)
    assert "RuntimeError: cannot schedule new futures" in proc.stderr
    assert proc.stdout.strip() == "runtime-error"


def test_del_shutdown() -> None:
    executor = deathstar.Executor(max_workers=2)
    futures = [executor.submit(abs, v) for v in range(-5, 5)]
    thread = executor._thread
    assert executor.cluster.local is not None
    local = executor.cluster.local  # the embedded daemon, hosted in this process
    del executor
    assert [f.result(timeout=30) for f in futures] == [abs(v) for v in range(-5, 5)]
    wait_for(lambda: gc.collect() >= 0 and not thread.is_alive(), 30,
             "the dropped executor's thread to end")
    wait_for(lambda: not local.alive(), 30, "the embedded daemon to stop")


def test_free_reference(daemon: Daemon) -> None:
    with deathstar.Executor([daemon.address]) as ex:
        for obj in ex.map(make_dummy_object, range(10)):
            wr = weakref.ref(obj)
            del obj
            gc.collect()
            assert wr() is None
    with Cluster([daemon.address]) as c:
        for obj in c.imap(make_dummy_object, range(10), chunksize=5):
            wr = weakref.ref(obj)
            del obj
            gc.collect()
            assert wr() is None


# ---------------------------------------------------------------- exception types


def test_error_at_task_pickle_is_a_pickling_error(daemon: Daemon) -> None:
    with deathstar.Executor([daemon.address]) as ex:
        future = ex.submit(id, threading.Lock())
        with pytest.raises(pickle.PicklingError):
            future.result(timeout=30)
    with Cluster([daemon.address]) as c, pytest.raises(pickle.PicklingError):
        c.map(id, [threading.Lock()])


def test_crash_during_func_execution_on_worker_is_a_broken_executor(daemon: Daemon) -> None:
    with deathstar.Executor([daemon.address], max_attempts=1) as ex:
        future = ex.submit(jobs.segfault_on, 1, bad=1)
        with pytest.raises(BrokenProcessPool) as info:
            future.result(timeout=30)
    assert isinstance(info.value, cf.BrokenExecutor) and isinstance(info.value, WorkerCrashed)


LOCALMOD = "def f(x):\n    return x + 1\n"


def test_other_cloudpickle_users_are_unaffected(daemon: Daemon, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dslocalmod.py").write_text(LOCALMOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    import dslocalmod

    assert deathstar.map(dslocalmod.f, [1], cluster=[daemon.address]) == [2]
    assert not cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES
    blob = cloudpickle.dumps(dslocalmod.f)
    assert b"dslocalmod" in blob and b"return" not in blob and len(blob) < 100  # by name
    loaded = subprocess.run([sys.executable, "-c", "import pickle, sys; "
                             "pickle.loads(sys.stdin.buffer.read())"], input=blob, cwd="/",
                            capture_output=True)
    assert b"No module named 'dslocalmod'" in loaded.stderr


@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    return Gate(tmp_path / "gate")
