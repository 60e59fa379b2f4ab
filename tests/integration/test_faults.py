"""Real faults on real processes (loopback): workers killed, poison pills, hung tasks,
clients and daemons that die, draining, recycling, interruption and resume.

Each map checks the promise: every input's result exactly once, equal to a fault-free
run, unless the input itself is the cause. Heartbeats are fast (0.2 s, liveness window
1 s) so detection is quick."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import deathstar
from deathstar.client import Cluster
from deathstar.errors import TaskTimeout, WorkerCrashed
from tests import jobs
from tests.conftest import (ROOT, Daemon, default_sigint, free_ports, start_daemon,
                            wait_for, worker_pids)

pytestmark = pytest.mark.timeout(120)

FAST = {"DEATHSTAR_HEARTBEAT_INTERVAL": "0.2"}
EXE = str(Path(sys.executable).with_name("deathstar"))


def fast_cluster(nodes: list[str], **kw: Any) -> Cluster:
    return Cluster(nodes, heartbeat_s=0.2, **kw)


def assert_exact(res: list[Any], expected: list[Any]) -> None:
    assert len(res) == len(expected)
    wrong = [i for i, (a, b) in enumerate(zip(res, expected)) if a != b]
    assert not wrong, f"{len(wrong)} wrong results, first at {wrong[:5]}"


def test_killing_busy_workers_loses_nothing(daemon: Daemon) -> None:
    n = 3000
    out: dict[str, Any] = {}
    progress = threading.Event()

    def run() -> None:
        with fast_cluster([daemon.address]) as c:
            out["res"] = c.map(jobs.sleep_square, range(n), seconds=0.002, max_attempts=10,
                               progress=lambda done, total: progress.set())

    t = threading.Thread(target=run)
    t.start()
    assert progress.wait(30)
    detections = []
    for kill in range(6):
        before = daemon.status()["worker_restarts"]
        victim = random.choice(worker_pids(daemon))
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: daemon.status()["worker_restarts"] > before, 20, "a replacement")
        detections.append(time.monotonic() - killed_at)
        wait_for(lambda: daemon.status()["workers"] == 2, 20, "two workers again")
        if not t.is_alive():
            break
    t.join(90)
    res = out["res"]
    assert_exact(res, [x * x for x in range(n)])
    assert sorted(r.index for r in res.report) == list(range(n))
    assert daemon.status()["tasks_lost"] >= 1
    print(f"worker death noticed and replaced in {max(detections):.2f} s at most")


def test_poison_pill_fails_alone_after_three_attempts(daemon: Daemon) -> None:
    res = deathstar.map(jobs.segfault_on, range(60), cluster=[daemon.address],
                        on_error="return", bad=7)
    crash = res[7]
    assert isinstance(crash, WorkerCrashed)
    assert crash.attempts == 3 and crash.signal == signal.SIGSEGV
    assert "SIGSEGV" in crash.reason
    assert_exact([v for i, v in enumerate(res) if i != 7], [x for x in range(60) if x != 7])
    assert res.report[7].attempts == 3 and res.report[7].outcome == "crashed"
    # an innocent input pays at most once (its batch crashed with 7 in it): the death
    # of a worker holding two messages is charged to the one it was running, even when
    # the result of the first died unsent with it
    assert max(r.attempts for r in res.report if r.index != 7) <= 2
    assert daemon.proc.poll() is None
    assert daemon.status()["worker_restarts"] == 3


@pytest.mark.parametrize("fn, kwargs", [
    (jobs.slow_on, {"slow": 3, "seconds": 60.0}),  # sleeping
    (jobs.hold_the_gil, {}),  # C code holding the GIL: only killing the process stops it
])
def test_task_timeout_kills_the_worker(daemon: Daemon, fn: Callable[..., Any],
                                       kwargs: dict[str, Any]) -> None:
    inputs = [3] if fn is jobs.hold_the_gil else list(range(8))
    started = time.monotonic()
    res = deathstar.map(fn, inputs, cluster=[daemon.address], timeout=1.0,
                        on_error="return", **kwargs)
    elapsed = time.monotonic() - started
    position = inputs.index(3)
    assert isinstance(res[position], TaskTimeout)
    assert res[position].timeout_s == 1.0 and res.report[position].outcome == "timeout"
    assert all(v == x for v, x in zip(res, inputs) if x != 3)
    assert elapsed < 15
    status = daemon.status()
    assert status["tasks_timed_out"] == 1
    wait_for(lambda: daemon.status()["workers"] == 2, 20, "a fresh worker")


def test_a_hung_worker_is_found_by_its_silence(daemon: Daemon) -> None:
    # No timeout: the worker's pulse thread cannot run while the regex holds the GIL, so
    # the daemon hears nothing for its liveness window (1 s here), kills it, and the
    # client retries; after max_attempts the input fails with the reason.
    started = time.monotonic()
    res = deathstar.map(jobs.hold_the_gil, [1], cluster=[daemon.address], max_attempts=2,
                        on_error="return")
    assert isinstance(res[0], WorkerCrashed)
    assert "hung" in res[0].reason and res[0].attempts == 2
    assert time.monotonic() - started < 30


def test_a_busy_worker_is_not_declared_hung(daemon: Daemon) -> None:
    # Sleeping 2.5 s (past the 1 s window) while the pulse thread beats: no eviction.
    res = deathstar.map(jobs.sleep_for, [2.5, 2.5], cluster=[daemon.address])
    assert list(res) == [2.5, 2.5]
    assert all(r.attempts == 1 for r in res.report)
    assert daemon.status()["worker_restarts"] == 0


def test_killed_client_leaves_the_daemon_idle(daemon: Daemon) -> None:
    script = ("import deathstar; from tests import jobs; "
              f"deathstar.map(jobs.sleep_for, [30.0] * 10, cluster=[{daemon.address!r}])")
    client = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                              env={**os.environ, **FAST})
    try:
        wait_for(lambda: daemon.status()["busy"] == 2, 30, "both workers busy")
        client.kill()
        killed_at = time.monotonic()
    finally:
        client.kill()
        client.wait()
    wait_for(lambda: (lambda s: s["busy"] == 0 and s["queued"] == 0 and s["clients"] == 0)(
        daemon.status()), 15, "the daemon to drop the dead client's work")
    took = time.monotonic() - killed_at
    assert daemon.status()["tasks_killed"] == 2
    print(f"dead client's work dropped {took:.2f} s after it died")


def test_daemon_killed_and_restarted_on_the_same_port(tmp_path: Path) -> None:
    port = free_ports(3)
    first = start_daemon(2, port=port)
    second: Daemon | None = None
    out: dict[str, Any] = {}
    done = [0]

    def run() -> None:
        with fast_cluster([first.address]) as c:
            out["res"] = c.map(jobs.sleep_square, range(800), seconds=0.005,
                               progress=lambda d, t: done.__setitem__(0, d))

    t = threading.Thread(target=run)
    try:
        t.start()
        wait_for(lambda: done[0] >= 100, 30, "the first 100 results")
        workers = worker_pids(first)
        first.proc.kill()  # the daemon alone: its workers must follow it
        first.proc.wait()
        wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and
                                 _state(p) != "Z" for p in workers), 10,
                 "the dead daemon's workers to exit")
        second = start_daemon(2, port=port)
        t.join(90)
        assert not t.is_alive()
        assert_exact(out["res"], [x * x for x in range(800)])
    finally:
        for d in (first, second):
            if d is not None:
                d.stop()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_sigterm_drains_and_the_map_finishes_elsewhere(daemons: Callable[..., Daemon]
                                                       ) -> None:
    a, b = daemons(2), daemons(2)
    out: dict[str, Any] = {}

    def run() -> None:
        with fast_cluster([a.address, b.address]) as c:
            out["res"] = c.map(jobs.sleep_for, [0.3] * 60)

    t = threading.Thread(target=run)
    t.start()
    wait_for(lambda: a.status().get("busy") == 2, 30, "node a busy")
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(20) == 0
    t.join(60)
    res = out["res"]
    assert list(res) == [0.3] * 60
    # a finished what it was running when told to stop: some results came from it
    assert any(r.node == a.address for r in res.report)
    assert sum(s.jobs_completed for s in deathstar.node_summary(res.report)) == 60


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "SIGINT"])
def test_an_idle_daemon_stops_at_once_on_a_signal(daemons: Callable[..., Daemon], sig: int
                                                  ) -> None:
    """A signal wakes the daemon's loop: an idle daemon with a minute-long heartbeat (its
    loop's only clock while idle) stops at once, not at its next beat, and takes its
    workers with it."""
    d = daemons(2, "--heartbeat", "60")
    workers = worker_pids(d)
    assert len(workers) == 2
    d.proc.send_signal(sig)
    assert d.proc.wait(20) == 0
    wait_for(lambda: all(_state(pid) in ("gone", "Z") for pid in workers), 20,
             "its workers to exit")


def test_workers_are_recycled_by_task_count(daemons: Callable[..., Daemon]) -> None:
    d = daemons(1, "--max-tasks-per-worker", "5")
    res = deathstar.map(jobs.whoami, range(20), cluster=[d.address], chunksize=1)
    per_pid: dict[str, int] = {}
    for name in res:
        per_pid[name] = per_pid.get(name, 0) + 1
    assert len(per_pid) >= 4 and max(per_pid.values()) <= 5
    status = d.status()
    assert status["workers_recycled"] >= 3 and status["worker_restarts"] == 0
    assert all(r.attempts == 1 for r in res.report)


def test_workers_are_recycled_by_memory(daemons: Callable[..., Daemon]) -> None:
    d = daemons(1, "--max-worker-memory", "150M")
    res = deathstar.map(jobs.rss_grow, range(6), cluster=[d.address], chunksize=1,
                        megabytes=60)
    assert list(res) == list(range(6))
    # 60 MB more per input against a 150 MB limit: a worker lasts two or three inputs.
    wait_for(lambda: d.status()["workers_recycled"] >= 2, 10, "two recycled workers")
    assert len({r.worker for r in res.report}) >= 2


def _cli_map(daemon: Daemon, args: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([EXE, "map", "tests.jobs:sleep_square", "--args", str(args),
                             "--cluster", daemon.address, "--out", str(out), *extra],
                            cwd=ROOT, env={**os.environ, **FAST}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=default_sigint)


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_cancels_everywhere_and_keeps_finished_results(daemon: Daemon, tmp_path: Path,
                                                             sig: int) -> None:
    # SIGTERM (kill, timeout, a batch system's time limit) interrupts as Ctrl-C does
    args = tmp_path / "in.jsonl"
    args.write_text("".join(f"{i}\n" for i in range(400)))
    out = tmp_path / "out.jsonl"
    proc = _cli_map(daemon, args, out, "--kwargs", '{"seconds": 0.05}')
    wait_for(lambda: len(_lines(out)) >= 10, 30, "some results in --out")
    proc.send_signal(sig)
    assert proc.wait(20) == 130
    assert proc.stderr is not None and b"interrupted" in proc.stderr.read()
    lines = _lines(out)
    assert [line["index"] for line in lines] == list(range(len(lines)))
    assert all(line["result"] == line["index"] ** 2 for line in lines)
    assert len(lines) < 400
    wait_for(lambda: daemon.status()["busy"] == 0 and daemon.status()["queued"] == 0, 10,
             "the daemon to be idle")


def test_resume_after_the_client_is_killed(daemon: Daemon, tmp_path: Path) -> None:
    n = 600
    args = tmp_path / "in.jsonl"
    args.write_text("".join(f"{i}\n" for i in range(n)))
    out = tmp_path / "out.jsonl"
    proc = _cli_map(daemon, args, out, "--kwargs", '{"seconds": 0.01}')
    wait_for(lambda: len(_lines(out)) >= 50, 30, "some results in --out")
    proc.kill()
    proc.wait()
    first = len(_lines(out))
    assert first < n
    again = _cli_map(daemon, args, out, "--resume", "--kwargs", '{"seconds": 0.001}')
    assert again.wait(60) == 0, again.stderr.read() if again.stderr else ""
    lines = _lines(out)
    assert sorted(line["index"] for line in lines) == list(range(n))
    assert all(line["result"] == line["index"] ** 2 for line in lines)


def test_resume_retry_failed_reruns_only_the_failures(daemon: Daemon, tmp_path: Path) -> None:
    args = tmp_path / "in.jsonl"
    args.write_text("".join(f"{i}\n" for i in range(1, 31)))
    out = tmp_path / "out.jsonl"
    base = [EXE, "map", "tests.jobs:fail_on_multiples_of", "--args", str(args), "--cluster",
            daemon.address, "--out", str(out), "-q"]
    assert subprocess.run([*base, "--kwargs", '{"k": 10}'], cwd=ROOT).returncode == 3
    assert len([line for line in _lines(out) if "error" in line]) == 3
    # Nothing missing: the earlier failures stay, and the exit code still says so.
    assert subprocess.run([*base, "--kwargs", '{"k": 1000}', "--resume"],
                          cwd=ROOT).returncode == 3
    assert len([line for line in _lines(out) if "error" in line]) == 3
    done = subprocess.run([*base, "--kwargs", '{"k": 1000}', "--resume", "--retry-failed"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = _lines(out)
    assert sorted(line["index"] for line in lines) == list(range(30))
    assert all("result" in line and line["result"] == line["index"] + 1 for line in lines)


def test_dead_mans_switch_idle_and_lifetime(tmp_path: Path) -> None:
    """A node with nothing to do stops after --idle-shutdown (work keeps it up); every node
    stops after --max-lifetime. Both are clean exits (the EC2 service then powers off)."""
    idle = start_daemon(1, "--idle-shutdown", "2")
    res = deathstar.map(jobs.sleep_for, [0.5] * 6, cluster=[idle.address])  # 3 s of work
    assert list(res) == [0.5] * 6 and idle.proc.poll() is None  # busy: not idle
    started = time.monotonic()
    assert idle.proc.wait(20) == 0
    assert time.monotonic() - started >= 1.5
    lifetime = start_daemon(1, "--max-lifetime", "3")
    assert lifetime.proc.wait(20) == 0
