"""Faults across hosts: a cable pulled, a frozen daemon, short stalls, a daemon killed.

Every map is checked against a fault-free run: 0 inputs lost, 0 results duplicated.
Heartbeats are 0.2 s on both ends, so the liveness window is 1 s."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from typing import Any, Iterator

import pytest

from deathstar.client import Cluster
from tests import jobs
from tests.conftest import Daemon, descendants, start_daemon, wait_for
from tests.netns.hosts import Host, ip

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]

WINDOW_S = 0.2 * 5
_ports = itertools.count(6100, 10)


@pytest.fixture
def fresh(hosts: list[Host]) -> Iterator[list[Daemon]]:
    """A two-worker daemon per host, on ports no earlier test used."""
    port = next(_ports)
    started = [start_daemon(2, "--insecure", host=h.address, port=port, wrap=h.argv([]))
               for h in hosts]
    try:
        yield started
    finally:
        for d in started:
            if d.proc.poll() is None:
                os.kill(d.proc.pid, signal.SIGCONT)
            d.stop()


class Run:
    """A map in a background thread over the given nodes, with its progress."""

    def __init__(self, nodes: list[str], n: int, seconds: float):
        self.cluster = Cluster(nodes, heartbeat_s=0.2)
        self.n = n
        self.done = 0
        self.result: Any = None
        self.thread = threading.Thread(target=self._run, args=(seconds,))
        self.thread.start()

    def _run(self, seconds: float) -> None:
        self.result = self.cluster.map(jobs.sleep_square, range(self.n), seconds=seconds,
                                       progress=lambda d, t: setattr(self, "done", d))

    def node(self, address: str) -> dict[str, Any]:
        return next(r for r in self.cluster.node_stats() if r["node"] == address)

    def finish(self) -> Any:
        self.thread.join(120)
        assert not self.thread.is_alive(), "the map did not finish"
        self.cluster.close()
        res = self.result
        assert list(res) == [x * x for x in range(self.n)]  # none lost, none twice
        assert sorted(r.index for r in res.report) == list(range(self.n))
        return res


def test_link_down_then_up(hosts: list[Host], fresh: list[Daemon]) -> None:
    run = Run([d.address for d in fresh], 3000, 0.01)
    victim, node = hosts[1], fresh[1].address
    wait_for(lambda: run.done >= 300, 60, "300 results")
    victim.link_down()
    cut = time.monotonic()
    wait_for(lambda: run.node(node)["state"] != "ready", 10, "the client to notice")
    detected = time.monotonic() - cut
    wait_for(lambda: run.done >= 900, 60, "the map to go on without the node")
    victim.link_up()
    back = time.time()
    wait_for(lambda: run.node(node)["state"] == "ready", 60, "the node to rejoin")
    res = run.finish()
    assert detected < WINDOW_S + 1.0, f"noticed after {detected:.2f} s"
    assert any(r.node == node and r.start > back for r in res.report), \
        "the node did no work after it came back"
    print(f"link down noticed in {detected:.2f} s (window {WINDOW_S} s)")


def test_frozen_daemon_past_the_window(hosts: list[Host], fresh: list[Daemon]) -> None:
    run = Run([d.address for d in fresh], 2500, 0.01)
    frozen = fresh[2]
    wait_for(lambda: run.done >= 300, 60, "300 results")
    os.kill(frozen.proc.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    wait_for(lambda: run.node(frozen.address)["state"] != "ready", 10, "the client to notice")
    detected = time.monotonic() - stopped
    os.kill(frozen.proc.pid, signal.SIGCONT)
    wait_for(lambda: run.node(frozen.address)["state"] == "ready", 60, "the node to rejoin")
    run.finish()
    assert detected < WINDOW_S + 1.0
    assert frozen.proc.poll() is None
    print(f"frozen daemon noticed in {detected:.2f} s")


def test_short_stalls_cause_no_eviction(hosts: list[Host], fresh: list[Daemon]) -> None:
    run = Run([d.address for d in fresh], 2000, 0.01)
    stalled = fresh[0]
    wait_for(lambda: run.done >= 200, 60, "200 results")
    for _ in range(5):  # 0.4 s stalls, well inside the 1 s window
        os.kill(stalled.proc.pid, signal.SIGSTOP)
        time.sleep(0.4)  # the fault's duration, not a synchronisation
        os.kill(stalled.proc.pid, signal.SIGCONT)
        wait_for(lambda: run.node(stalled.address)["done"] > 0, 10, "progress")
        time.sleep(0.3)  # the gap between stalls
    assert run.node(stalled.address)["downs"] == 0
    res = run.finish()
    assert all(r.attempts == 1 for r in res.report)
    assert stalled.status()["worker_restarts"] == 0


def test_daemon_killed_its_workers_follow(hosts: list[Host], fresh: list[Daemon]) -> None:
    run = Run([d.address for d in fresh], 2000, 0.01)
    victim, host = fresh[1], hosts[1]
    wait_for(lambda: run.done >= 300, 60, "300 results")
    workers = descendants(victim.proc.pid)
    assert len(workers) == 2
    victim.proc.kill()  # the daemon alone, SIGKILL: its workers get no say
    victim.proc.wait()
    killed = time.monotonic()
    wait_for(lambda: not any(_alive(p) for p in workers), 10, "its workers to die")
    orphans_gone = time.monotonic() - killed
    wait_for(lambda: not ip("netns", "pids", host.name).stdout.split(), 10,
             "no process left on the host")
    res = run.finish()
    assert not any(r.node == victim.address and r.start > time.time() for r in res.report)
    print(f"the killed daemon's workers were gone {orphans_gone:.2f} s later")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
