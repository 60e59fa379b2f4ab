"""One cluster of three hosts, each a network namespace with its own address, hostname and
one-worker daemon; the client stays in the root namespace, as on a real LAN.

The daemons run in a folder without the repository, so ``examples.pi`` cannot be imported
there: the function has to travel by value, as it would to another machine."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

import deathstar
from deathstar.client import query_status
from examples.pi import estimate_pi
from tests.conftest import FAST_HEARTBEAT, ROOT, descendants, wait_for
from tests.netns.hosts import Host, netns_available, virtual_hosts

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

PORT = 6000
N = 60
DRAWS = 20_000


@dataclass
class Node:
    host: Host
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def address(self) -> str:
        return f"{self.host.address}:{PORT}"

    def status(self) -> dict[str, Any]:
        return query_status([self.address], timeout=2)[0]


def _read_ready_line(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([proc.stdout], [], [], remaining)[0]:
            raise AssertionError(f"daemon did not report its ports in {timeout} s:\n"
                                 f"{log.read_text()}")
        chunk = os.read(proc.stdout.fileno(), 1024)
        if not chunk:
            raise AssertionError(f"daemon exited with {proc.wait()} before it was ready:\n"
                                 f"{log.read_text()}")
        line += chunk
    return json.loads(line)


def _diagnose(nodes: list[Node]) -> str:
    """For failure messages: whether each daemon and its namespace are still there, what
    runs in it, and the end of its log."""
    from tests.netns.hosts import ip

    spaces = ip("netns", "list", check=False).stdout
    parts = []
    for n in nodes:
        tail = n.log.read_text(errors="replace").splitlines()[-15:]
        parts.append(f"--- {n.address} ({n.host.name}): daemon exit code {n.proc.poll()}, "
                     f"namespace {'present' if n.host.name in spaces else 'GONE'}, "
                     f"pids {n.host.pids()}\n" + "\n".join(tail))
    return "\n".join(parts)


def _stop(nodes: list[Node]) -> None:
    """SIGTERM every daemon's group, wait, then SIGKILL the groups still there."""
    alive = [n for n in nodes if n.proc.poll() is None]
    for n in alive:
        os.killpg(n.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for n in alive:
        try:
            n.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for n in alive:
        try:
            os.killpg(n.proc.pid, signal.SIGKILL)  # the daemon's leftovers too
        except ProcessLookupError:
            pass
        n.proc.wait()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Node]]:
    """Three hosts, a one-worker daemon on each (exec port 6000), all answering status."""
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    elsewhere = tmp_path_factory.mktemp("node-cwd")  # no examples/ here
    with ExitStack() as stack:
        hosts = stack.enter_context(virtual_hosts(3))
        started: list[Node] = []
        stack.callback(_stop, started)  # runs before the hosts are removed
        for host in hosts:
            log = elsewhere / f"{host.name}.log"
            proc = host.popen(
                [sys.executable, "-m", "deathstar", "daemon", "--host", host.address,
                 "--port", str(PORT), "--workers", "1", "--insecure", "--ready-json",
                 "--heartbeat", FAST_HEARTBEAT],
                stdout=subprocess.PIPE, stderr=stack.enter_context(log.open("wb")),
                cwd=elsewhere)
            started.append(Node(host, proc, log))
        for node in started:
            ports = _read_ready_line(node.proc, node.log, 20)
            assert ports["exec"] == PORT and ports["status"] == PORT + 1
        for node in started:
            wait_for(lambda: (s := node.status()) and not s["error"] and s["workers"] == 1,
                     20, f"{node.address} to answer status with its worker")
        yield started


def test_map_over_three_hosts(nodes: list[Node]) -> None:
    addresses = [n.address for n in nodes]
    by_address = {n.address: n for n in nodes}
    done_before = {n.address: n.status()["tasks_done"] for n in nodes}

    try:
        res = deathstar.map(estimate_pi, range(N), cluster=addresses, draws=DRAWS)
    except Exception as exc:
        pytest.fail(f"{type(exc).__name__}: {exc}\n{_diagnose(nodes)}")

    assert len(res) == N and res.errors == []
    # The same inputs on the embedded local cluster give the very same numbers.
    local = deathstar.map(estimate_pi, range(N), draws=DRAWS)
    assert list(res) == list(local)

    summary = deathstar.node_summary(res.report)
    assert sorted(s.node for s in summary) == sorted(addresses)
    assert sum(s.jobs_completed for s in summary) == N
    for s in summary:
        assert s.jobs_completed > 0 and s.failed == 0 and s.workers == 1, s
        # ... and each daemon counted exactly the inputs the report gives it.
        assert by_address[s.node].status()["tasks_done"] - done_before[s.node] == \
            s.jobs_completed

    assert [r.index for r in res.report] == list(range(N))
    worker_pids = set()
    for rec in res.report:
        node = by_address[rec.node]
        assert rec.outcome == "ok" and rec.attempts == 1 and rec.end >= rec.start, rec
        # "hostname:pid" of a worker process that lives on that host, under its daemon.
        hostname, _, pid = rec.worker.rpartition(":")
        assert hostname == node.host.hostname, rec
        assert node.host.owns(int(pid)), f"{rec.worker} is not on {node.host.name}"
        assert int(pid) in descendants(node.proc.pid), rec
        worker_pids.add(int(pid))
    assert len(worker_pids) == 3


def test_status_cli_lists_three_hosts(nodes: list[Node]) -> None:
    out = subprocess.run([sys.executable, "-m", "deathstar", "status", "--json",
                          *[n.address for n in nodes]],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{out.stderr}\n{_diagnose(nodes)}"
    rows = json.loads(out.stdout)
    assert [r["node"] for r in rows] == [n.address for n in nodes]
    for row, node in zip(rows, nodes):
        assert not row["error"], row
        assert row["workers"] == 1, row
        assert row["hostname"] == node.host.hostname, row
        assert row["mismatch"] == [], row


def test_map_cli_over_three_hosts(nodes: list[Node], tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(f"{i}\n" for i in range(N)))
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "deathstar", "map", "examples.pi:estimate_pi",
         "--args", str(seeds), "--kwargs", json.dumps({"draws": DRAWS}),
         "--cluster", ",".join(n.address for n in nodes),
         "--out", str(out), "--report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, f"{proc.stderr}\n{_diagnose(nodes)}"

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == N
    assert [line["index"] for line in lines] == list(range(N))
    assert [line["result"] for line in lines] == [estimate_pi(i, draws=DRAWS)
                                                  for i in range(N)]

    records = json.loads(report.read_text())
    assert sorted(r["index"] for r in records) == list(range(N))
    per_node = {n.address: sum(1 for r in records if r["node"] == n.address) for n in nodes}
    assert sum(per_node.values()) == N and all(per_node.values()), per_node
    assert all(r["outcome"] == "ok" for r in records)
    for r in records:
        assert r["worker"].rpartition(":")[0] == next(
            n.host.hostname for n in nodes if n.address == r["node"])
    # The summary table names every node.
    for n in nodes:
        assert n.address in proc.stderr
