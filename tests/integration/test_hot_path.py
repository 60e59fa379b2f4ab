"""Correctness of the fast paths: adaptive batching, blobs cached by hash, zero-copy
arrays, and the bounded-memory path of a large CLI map."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import pytest

import deathstar
from deathstar import config, shm
from deathstar.client import Cluster
from deathstar.client.embedded import LocalDaemon
from deathstar.errors import WorkerCrashed
from tests import jobs
from tests.conftest import ROOT, Daemon, wait_for, worker_pids
from tests.swarm import Swarm

pytestmark = pytest.mark.timeout(120)


def test_tiny_tasks_are_batched_and_stay_ordered(daemon: Daemon) -> None:
    with Cluster([daemon.address]) as c:
        res = c.map(jobs.square, range(5000))
        batched = next(iter(c.node_stats()))["bytes_sent"]
    assert list(res) == [x * x for x in range(5000)]
    with Cluster([daemon.address]) as c:
        c.map(jobs.square, range(5000), chunksize=1)
        single = next(iter(c.node_stats()))["bytes_sent"]
    # one pickle header per message instead of one per input
    assert batched < single / 3, (batched, single)


def test_errors_inside_a_batch_belong_to_their_inputs(daemon: Daemon) -> None:
    res = deathstar.map(jobs.fail_on_multiples_of, range(3000), cluster=[daemon.address],
                        chunksize=100, on_error="return", k=7)
    for i, v in enumerate(res):
        if i % 7 == 0:
            assert isinstance(v, ValueError) and v.index == i and f"input {i} " in str(v)
        else:
            assert v == i
    assert [r.index for r in res.report if r.outcome == "error"] == list(range(0, 3000, 7))


def test_a_crash_inside_a_batch_retries_only_that_input(daemon: Daemon) -> None:
    res = deathstar.map(jobs.segfault_on, range(400), cluster=[daemon.address],
                        chunksize=50, on_error="return", bad=123)
    assert isinstance(res[123], WorkerCrashed) and res[123].attempts == 3
    assert all(v == i for i, v in enumerate(res) if i != 123)
    # the batch was split after the first crash: its other inputs needed one more run
    # at most, and only input 123 went to three
    attempts = {r.index: r.attempts for r in res.report}
    assert max(a for i, a in attempts.items() if i != 123) <= 2
    assert attempts[123] == 3


def test_short_messages_are_prefetched_long_ones_are_not(daemon: Daemon) -> None:
    """A worker holds a second message behind a short one (no round trip between them),
    never behind a long one (it would keep it from an idle worker)."""
    before = daemon.status()["tasks_prefetched"]
    res = deathstar.map(jobs.square, range(2000), cluster=[daemon.address], chunksize=1)
    assert list(res) == [x * x for x in range(2000)]
    after_short = daemon.status()["tasks_prefetched"]
    assert after_short - before > 100, (before, after_short)
    res = deathstar.map(jobs.sleep_for, [0.15] * 8, cluster=[daemon.address], chunksize=1)
    assert daemon.status()["tasks_prefetched"] == after_short
    # nothing hoarded: both workers ran long messages, four each
    per_worker: dict[str, int] = {}
    for record in res.report:
        per_worker[record.worker] = per_worker.get(record.worker, 0) + 1
    assert sorted(per_worker.values()) == [4, 4], per_worker


def test_a_nodes_lag_is_timed_on_messages_that_waited_for_nothing(daemon: Daemon) -> None:
    """The client times what a message spends in flight beyond its run, on messages sent
    while a worker was free, and shows it per node (``lag_ms``); the first message of a
    function is no sample (its worker fetches the blob on the way), nor is a message of
    large inputs (its transfer would read as lag), and one-input messages then queue
    enough at the node to cover the lag."""
    with Cluster([daemon.address]) as c:
        node = c.engine.nodes[0]
        arrays = [np.zeros(300_000) for _ in range(6)]  # 2.4 MB each
        assert list(c.map(jobs.bump_and_sum, arrays, chunksize=1)) == [300_000.0] * 6
        assert node.lag_s is None
        c.map(jobs.sleep_for, [0.2], chunksize=1)  # one message, sent with its blob
        assert node.lag_s is None
        res = c.map(jobs.sleep_for, [0.0] * 200, chunksize=1)
        assert list(res) == [0.0] * 200
        assert node.lag_s is not None and 0.0 < node.lag_s < 5.0, node.lag_s
        lag_s = node.lag_s  # (no message is in flight now: it stays)
        # the snapshot of the node figures is refreshed within a heartbeat
        wait_for(lambda: c.node_stats()[0]["lag_ms"] == pytest.approx(lag_s * 1000), 10,
                 "the node's lag shown in its figures")
        # a round trip over a socket and two processes outlasts many messages of 10 µs:
        # they queue deeper than the fixed few
        assert node.window(True, 1e-5) > 2 * node.capacity + config.PREFETCH_SHORT


def test_a_message_waiting_behind_a_crash_is_not_charged(daemon: Daemon) -> None:
    before = daemon.status()["tasks_prefetched"]
    res = deathstar.map(jobs.segfault_on, range(600), cluster=[daemon.address],
                        chunksize=1, on_error="return", bad=450)
    assert daemon.status()["tasks_prefetched"] - before > 100
    assert isinstance(res[450], WorkerCrashed) and res[450].attempts == 3
    assert all(v == i for i, v in enumerate(res) if i != 450)
    # the messages queued behind the fatal one on its worker were sent again at no cost
    charged = {r.index: r.attempts for r in res.report if r.attempts > 1}
    assert charged == {450: 3}, charged


def test_a_daemon_serves_hundreds_of_workers(daemons: Callable[..., Daemon]) -> None:
    """300 lightweight workers (tests/swarm.py) on one daemon: every input's result comes
    back exactly once, in order, and the work is spread over the workers."""
    daemon = daemons(0)
    with Swarm(f"tcp://127.0.0.1:{daemon.port + 2}", 300, lambda x: x * x) as swarm:
        wait_for(lambda: daemon.status()["workers"] == 300, 30, "300 workers registered")
        with Cluster([daemon.address]) as c:
            assert c.capacity == 300
            res = c.map(jobs.square, range(6000), chunksize=1)
        assert list(res) == [x * x for x in range(6000)]
        assert sorted(r.index for r in res.report) == list(range(6000))
        assert sum(swarm.tasks) == 6000
        assert sum(1 for n in swarm.tasks if n) > 200, swarm.tasks
        assert daemon.status()["tasks_done"] == 6000


def test_large_arrays_reach_embedded_workers_through_shared_memory(tmp_path: Path) -> None:
    """To the embedded daemon, arrays of 1 MiB and more go through /dev/shm: they arrive
    equal and writable (even non-contiguous ones), a worker killed while holding one gets
    it again on the retry, and no file is left behind but those given back to be written
    again."""
    if not shm.SharedFolder.available():
        pytest.skip("no writable /dev/shm")
    rng = np.random.default_rng(5)
    arrays = [rng.random(200_000) for _ in range(6)]
    arrays += [rng.random((1500, 1200))[::3, ::2], np.arange(300_000, dtype=np.int64)]
    marker = tmp_path / "crashed-once"
    with Cluster(workers=2) as c:
        res = c.map(jobs.bump_and_sum, arrays, crash_marker=str(marker))
        shared = c.engine.memory.folder
        assert shared is not None and shared.path is not None
        # every contiguous array (numpy pickles a non-contiguous one inside the stream)
        assert shared.count >= len(arrays) - 1
        # each unlinked by its worker, or given back to be written again; the probe its
        # node answered stays
        kept = [os.path.basename(p) for p in shared.free_files()]
        assert sorted(os.listdir(shared.path)) == sorted(
            [os.path.basename(c.engine.memory.probe[0]), *kept])
        folder = shared.path
    assert marker.exists() and max(r.attempts for r in res.report) == 2
    assert list(res) == pytest.approx([float((a + 1).sum()) for a in arrays])
    assert not os.path.exists(folder)


def test_large_results_come_back_from_embedded_workers_through_shared_memory() -> None:
    """Arrays of 1 MiB and more returned by the embedded daemon's workers are written into
    the client's /dev/shm folder and mapped here: equal, writable, no file left behind,
    and the folder gone with the client even though the workers live on."""
    if not shm.SharedFolder.available():
        pytest.skip("no writable /dev/shm")

    def backing(array: Any) -> Any:
        while getattr(array, "base", None) is not None:
            array = array.base
        return getattr(array, "obj", array)

    sizes = [300_000] * 6 + [10]
    # each worker exits right after sending its result: the files it wrote must outlive it
    local = LocalDaemon(2, max_tasks_per_worker=1)
    try:
        with Cluster([local.address]) as c:
            res = c.map(jobs.arange_doubled, sizes, chunksize=1)
            for n, value in zip(sizes, res):
                assert np.array_equal(value, np.arange(n, dtype=np.float64) * 2)
            assert [isinstance(backing(v), mmap.mmap) for v in res] == [True] * 6 + [False]
            # replaced as they went (a worker runs a task it already holds before leaving)
            assert len({r.worker for r in res.report}) >= 4
            res[0][0] = 7.0  # writable here too
            assert c.engine.memory.folder is not None
            folder = c.engine.memory.folder.path
            assert folder is not None  # each taken here; the probe its node answered stays
            assert os.listdir(folder) == [os.path.basename(c.engine.memory.probe[0])]
    finally:
        local.stop()
    assert not os.path.exists(folder)


def test_common_argument_travels_once_per_node(daemons: Callable[..., Daemon]) -> None:
    a, b = daemons(2), daemons(2)
    big = np.random.default_rng(0).random(1_000_000)  # 8 MB
    with Cluster([a.address, b.address]) as c:
        res = c.map(_scaled_sum, range(200), data=big)
        sent = {row["node"]: row["bytes_sent"] for row in c.node_stats()}
    assert list(res) == [float(big.sum()) * i for i in range(200)]
    for d in (a, b):
        status = d.status()
        assert status["blobs_received"] == 1
        # once, not twice: the 8 MB argument, plus this test module's source and what it
        # imports from the tree (shipped in the blob, since the nodes cannot import it)
        assert 8_000_000 <= status["blob_bytes_received"] < 16_000_000
        assert sent[d.address] < 16_000_000  # the blob once + 200 small inputs


def _scaled_sum(i: int, data: np.ndarray) -> float:
    return float(data.sum()) * i


def test_a_changed_common_argument_is_sent_again(daemon: Daemon) -> None:
    with Cluster([daemon.address]) as c:
        assert c.map(jobs.add, [1, 2], y=10) == [11, 12]
        assert c.map(jobs.add, [1, 2], y=20) == [21, 22]
        assert c.map(jobs.add, [1, 2], y=10) == [11, 12]
    # y=20 made a new blob; the third map's blob is the first's, already at the node
    assert daemon.status()["blobs_received"] == 2


def test_the_blob_cache_is_bounded_and_an_evicted_blob_is_sent_again(
        daemons: Callable[..., Daemon]) -> None:
    """A daemon keeps at most DEATHSTAR_BLOB_CACHE_BYTES of blobs, least recently used out
    first; a map whose blob was dropped still gets right results: its client sends the
    blob again when the daemon reports it missing."""
    daemon = daemons(2, env={**os.environ, "DEATHSTAR_BLOB_CACHE_BYTES": "3000000"})
    arrays = {name: np.full(250_000, float(k)) for k, name in enumerate("abc", 1)}  # 2 MB
    with Cluster([daemon.address]) as c:
        for name in "abca":  # a's blob was dropped for b's, then sent again
            res = c.map(_scaled_sum, range(10), data=arrays[name])
            assert list(res) == [float(arrays[name].sum()) * i for i in range(10)], name
            status = daemon.status()
            assert status["blob_cache_bytes"] <= 3_000_000 or status["blobs_cached"] == 1
    assert status["blobs_received"] == 4 and status["blobs_evicted"] == 3


def test_a_new_worker_fetches_the_function_on_a_miss(daemon: Daemon) -> None:
    big = np.arange(300_000, dtype=np.float64)
    with Cluster([daemon.address]) as c:
        first = c.map(_scaled_sum, range(20), data=big)
        for pid in worker_pids(daemon):
            os.kill(pid, signal.SIGKILL)  # fresh workers know no function
        wait_for(lambda: daemon.status()["worker_restarts"] >= 2, 20, "fresh workers")
        wait_for(lambda: daemon.status()["workers"] == 2, 20, "two workers")
        second = c.map(_scaled_sum, range(20), data=big)  # same blob: cached at the node
    assert list(first) == list(second)
    assert daemon.status()["blobs_received"] == 1  # the client did not send it again


def test_large_cli_map_keeps_client_memory_bounded(daemon: Daemon, tmp_path: Path) -> None:
    n = 200_000
    args = tmp_path / "in.jsonl"
    args.write_text("".join(f"{i}\n" for i in range(n)))
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("deathstar")), "map",
                             "tests.jobs:square", "--args", str(args), "--cluster",
                             daemon.address, "--out", str(out), "-q"], cwd=ROOT)
    watched = psutil.Process(proc.pid)
    peak = 0
    deadline = time.monotonic() + 100
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)  # sampling interval of the memory probe
    assert proc.wait(10) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == n and lines[-1] == f'{{"index": {n - 1}, "result": {(n - 1) ** 2}}}'
    assert peak < 150 * 2**20, f"client peak RSS {peak / 2**20:.0f} MiB"
    print(f"client peak RSS {peak / 2**20:.0f} MiB for {n} inputs")


@pytest.mark.parametrize("short_s, before, after, recalled", [
    (0.005, 20, 40, 1),  # one message waits behind the long input
    (0.0001, 60, 200, 2),  # tiny ones: several wait behind it, all asked back at once
], ids=["short", "tiny"])
def test_messages_waiting_behind_an_overrun_move_to_an_idle_worker(
        daemons: Any, short_s: float, before: int, after: int, recalled: int) -> None:
    """Short inputs teach the client a short estimate, so the daemon prefetches messages
    behind the one long input; when the other worker runs out of work, the daemon asks
    them back (RECALL) and the idle worker runs them: no input waits for the long one to
    end."""
    d = daemons(2)
    seconds = [short_s] * before + [2.0] + [short_s] * after
    res = deathstar.map(jobs.sleep_for, seconds, cluster=[d.address], chunksize=1)
    long = res.report[before]
    late = [r.index for r in res.report if r.index != before and r.end > long.end]
    assert late == [], f"inputs {late} waited behind the long one"
    assert d.status()["tasks_recalled"] >= recalled, d.status()
    assert [r.attempts for r in res.report] == [1] * len(seconds)
