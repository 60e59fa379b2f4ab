"""The embedded daemon is hosted in the client's own process (a thread; its workers are
this process's children). Everything a node's daemon promises must hold there too, tested
as tests/integration/test_faults.py tests a node: a worker killed mid-map loses nothing,
a poison pill fails alone with its signal, a timeout kills, a silent worker is found,
workers are recycled, closing a stream kills what runs. And one fault only a hosted
daemon can meet: the user's own thread holding the GIL stalls the daemon's loop, which
must not then judge its workers dead."""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from deathstar.client import Cluster
from deathstar.client.embedded import LocalDaemon
from deathstar.daemon.hosted import HostedPeer
from deathstar.errors import TaskTimeout, WorkerCrashed
from tests import jobs
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(120)

HEARTBEAT = 0.2  # liveness window 1 s: detection is quick


@pytest.fixture
def local(request: pytest.FixtureRequest) -> Iterator[LocalDaemon]:
    options = getattr(request, "param", {})
    daemon = LocalDaemon(2, heartbeat_s=HEARTBEAT, **options)
    try:
        yield daemon
    finally:
        daemon.stop()


def connect(local: LocalDaemon) -> Cluster:
    return Cluster([local.address], heartbeat_s=HEARTBEAT)


def status(c: Cluster) -> dict[str, Any]:
    return c.status(timeout=10)[0]


def worker_pids(local: LocalDaemon) -> list[int]:
    return [proc.pid for proc, _ in local.daemon.supervisor.procs.values()
            if proc.poll() is None]


def busy_pids(local: LocalDaemon) -> list[int]:
    """The live workers the daemon's books say hold a message now."""
    holding = {w.pid for w in list(local.daemon.pool.workers.values()) if w.assigned}
    return [pid for pid in worker_pids(local) if pid in holding]


def test_the_workers_are_this_process_children_and_the_loop_a_thread(
        local: LocalDaemon) -> None:
    with connect(local) as c:
        names = set(c.map(jobs.whoami, range(20), chunksize=1))
    pids = {int(n.rpartition(":")[2]) for n in names}
    assert os.getpid() not in pids
    assert all(os.getppid() != pid and _parent(pid) == os.getpid() for pid in pids)
    thread = local.reactor.thread
    assert local.alive() and thread is not None and thread.name == "deathstar-daemon"


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def test_killing_its_workers_mid_map_loses_nothing(local: LocalDaemon) -> None:
    n = 1500
    out: dict[str, Any] = {}
    progress = threading.Event()
    with connect(local) as c:
        def run() -> None:
            out["res"] = c.map(jobs.sleep_square, range(n), seconds=0.002, max_attempts=10,
                               progress=lambda done, total: progress.set())

        t = threading.Thread(target=run)
        t.start()
        assert progress.wait(30)
        for _ in range(3):
            wait_for(lambda: len(worker_pids(local)) == 2, 20, "two live workers")
            before = status(c)["worker_restarts"]
            # a worker that holds a message (one between messages would lose nothing)
            wait_for(lambda: busy_pids(local) or not t.is_alive(), 20, "a busy worker")
            os.kill(random.choice(busy_pids(local) or worker_pids(local)), signal.SIGKILL)
            wait_for(lambda: status(c)["worker_restarts"] > before, 20, "a replacement")
            if not t.is_alive():
                break
        t.join(90)
        res = out["res"]
        assert list(res) == [x * x for x in range(n)]
        assert sorted(r.index for r in res.report) == list(range(n))
        assert status(c)["tasks_lost"] >= 1


def test_a_poison_pill_fails_alone_with_its_signal(local: LocalDaemon) -> None:
    with connect(local) as c:
        res = c.map(jobs.segfault_on, range(60), on_error="return", bad=7)
        crash = res[7]
        assert isinstance(crash, WorkerCrashed)
        assert crash.attempts == 3 and crash.signal == signal.SIGSEGV
        assert [v for i, v in enumerate(res) if i != 7] == [x for x in range(60) if x != 7]
        assert max(r.attempts for r in res.report if r.index != 7) <= 2
        assert status(c)["worker_restarts"] == 3


def test_a_timeout_kills_the_worker(local: LocalDaemon) -> None:
    with connect(local) as c:
        res = c.map(jobs.slow_on, list(range(6)), timeout=1.0, on_error="return", slow=3,
                    seconds=60.0)
        assert isinstance(res[3], TaskTimeout) and res.report[3].outcome == "timeout"
        assert [v for i, v in enumerate(res) if i != 3] == [0, 1, 2, 4, 5]
        assert status(c)["tasks_timed_out"] == 1
        wait_for(lambda: status(c)["workers"] == 2, 20, "a fresh worker")
    # The killed worker left its folder (its slot file, the modules shipped to it): the
    # daemon removed it when it reaped the worker. Only the live workers' remain.
    folders = local.daemon.scratch_dir
    wait_for(lambda: {os.path.join(folders, n) for n in os.listdir(folders)
                      if n.startswith("worker-")}
             == set(local.daemon.supervisor.folders.values()), 20, "the live workers' only")
    assert len(local.daemon.supervisor.folders) == 2
    assert any(os.listdir(os.path.join(f, "modules"))  # tests.jobs went there
               for f in local.daemon.supervisor.folders.values()
               if os.path.isdir(os.path.join(f, "modules")))


def test_a_silent_worker_is_found_and_killed(local: LocalDaemon) -> None:
    with connect(local) as c:
        res = c.map(jobs.hold_the_gil, [1], max_attempts=2, on_error="return")
        assert isinstance(res[0], WorkerCrashed)
        assert "hung" in res[0].reason and res[0].attempts == 2


@pytest.mark.parametrize("local", [{"max_tasks_per_worker": 5}], indirect=True)
def test_workers_are_recycled_by_task_count(local: LocalDaemon) -> None:
    with connect(local) as c:
        res = c.map(jobs.whoami, range(30), chunksize=1)
        per_worker: dict[str, int] = {}
        for name in res:
            per_worker[name] = per_worker.get(name, 0) + 1
        assert len(per_worker) >= 6 and max(per_worker.values()) <= 5
        assert status(c)["workers_recycled"] >= 4 and status(c)["worker_restarts"] == 0


def test_closing_a_stream_kills_what_runs(local: LocalDaemon) -> None:
    with connect(local) as c:
        stream = c.imap_unordered(jobs.sleep_for, [0.0] + [30.0] * 4)
        assert next(stream) == 0.0
        wait_for(lambda: status(c)["busy"] == 2, 20, "both workers on a 30 s input")
        started = time.monotonic()
        stream.close()
        wait_for(lambda: status(c)["tasks_killed"] >= 2, 20, "the running inputs killed")
        wait_for(lambda: status(c)["workers"] == 2 and status(c)["busy"] == 0, 20,
                 "two fresh, idle workers")
        assert time.monotonic() - started < 20
        assert c.map(jobs.square, [3]) == [9]


def test_the_users_thread_holding_the_gil_is_a_stall_not_dead_workers(
        local: LocalDaemon) -> None:
    """The daemon's loop shares this process's GIL: while this thread runs C code that
    holds it (a regex backtracking ~2 s, past the 1 s liveness window) the loop cannot
    run, and the workers' heartbeats wait unread. Afterwards it must see its own stall,
    not silent workers: nothing is killed or retried."""
    out: dict[str, Any] = {}
    with connect(local) as c:
        def run() -> None:
            try:
                out["res"] = c.map(jobs.sleep_for, [1.0] * 6, chunksize=1)
            except BaseException as exc:  # noqa: B036 - shown by the assertion below
                out["error"] = exc

        t = threading.Thread(target=run)
        t.start()
        wait_for(lambda: status(c)["busy"] == 2, 20, "both workers busy")
        started = time.monotonic()
        re.match(r"(a+)+$", "a" * 26 + "b")  # holds the GIL throughout
        held = time.monotonic() - started
        t.join(60)
        assert held > 1.0, f"the GIL was held only {held:.2f} s: no stall to survive"
        assert "error" not in out, f"the map failed: {out.get('error')!r}"
        assert list(out["res"]) == [1.0] * 6
        assert all(r.attempts == 1 for r in out["res"].report)
        assert status(c)["worker_restarts"] == 0 and status(c)["tasks_lost"] == 0


def test_clients_in_the_daemons_own_loop_come_and_go(local: LocalDaemon,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A client of an embedded daemon of this process runs its engine in the daemon's
    loop and hands it messages in memory; one that closes says goodbye there (its session
    ends at once, not by going silent), and the other goes on."""
    caplog.set_level(logging.WARNING, logger="deathstar.daemon")
    a, b = connect(local), connect(local)
    try:
        for c in (a, b):
            assert c.engine.reactor is local.reactor
            assert isinstance(c.engine.nodes[0].link, HostedPeer)
        assert status(a)["clients"] == 2
        a.close()
        wait_for(lambda: status(b)["clients"] == 1, 10, "the closed client's session to end")
        assert b.map(jobs.square, range(30)) == [x * x for x in range(30)]
        assert list(local.daemon.sessions.hosted) == [b.engine.nodes[0].link.ident]
        assert not [r for r in caplog.records if "silent" in r.getMessage()]
    finally:
        a.close()
        b.close()
