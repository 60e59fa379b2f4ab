"""Large buffers go through /dev/shm to any node that proves it shares this machine's
/dev/shm, not only to the embedded daemon: the client leaves a probe file in its
shared-memory folder, names it in its hello, and a daemon that can read it (same /dev/shm,
same user) answers with its hash. A TCP node on loopback run by this user proves it; a
node whose workers are all hand-started does not (they may run anywhere), and a message
with buffers in shared memory never goes to a hand-started worker."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from deathstar import scratch, shm
from deathstar.client import Cluster
from tests import jobs
from tests.conftest import Daemon, wait_for

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not shm.SharedFolder.available(),
                                 reason="no writable /dev/shm")]

EXE = str(Path(sys.executable).with_name("deathstar"))


def backing(array: Any) -> Any:
    while getattr(array, "base", None) is not None:
        array = array.base
    return getattr(array, "obj", array)


def files_left(c: Cluster) -> list[str]:
    """The client's shared-memory files other than its probe."""
    assert c.engine.memory.folder is not None and c.engine.memory.probe is not None
    folder = c.engine.memory.folder.path
    assert folder is not None
    return sorted(set(os.listdir(folder)) - {os.path.basename(c.engine.memory.probe[0])})


def test_a_loopback_tcp_node_of_this_user_gets_buffers_through_shared_memory(
        daemons: Callable[..., Daemon]) -> None:
    d = daemons(2)
    arrays = [np.random.default_rng(k).random(300_000) for k in range(6)]
    with Cluster([d.address]) as c:
        assert c.engine.nodes[0].shares_memory
        written = c.engine.memory.folder.count if c.engine.memory.folder else 0
        res = c.map(jobs.bump_and_sum, arrays)
        assert list(res) == pytest.approx([float((a + 1).sum()) for a in arrays])
        assert c.engine.memory.folder is not None and c.engine.memory.folder.count - written >= 6
        back = c.map(jobs.arange_doubled, [300_000] * 3, chunksize=1)
        assert all(isinstance(backing(v), mmap.mmap) for v in back)  # results too
        assert np.array_equal(back[0], np.arange(300_000, dtype=np.float64) * 2)
        # each taken by its reader, and unlinked, or given back to be written again
        kept = [os.path.basename(p) for p in c.engine.memory.folder.free_files()]
        assert files_left(c) == sorted(kept) and len(kept) <= 6
        folder = c.engine.memory.folder.path
    assert folder is not None and not os.path.exists(folder)


def test_a_node_of_hand_started_workers_only_does_not_claim_it(
        daemons: Callable[..., Daemon]) -> None:
    d = daemons(0)
    worker = subprocess.Popen([EXE, "worker", "--connect", f"tcp://127.0.0.1:{d.port + 2}"],
                              stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: d.status()["workers"] == 1, 20, "the hand-started worker to join")
        arrays = [np.ones(300_000) * k for k in range(3)]
        with Cluster([d.address]) as c:
            assert not c.engine.nodes[0].shares_memory
            assert c.engine.memory.folder is not None
            written = c.engine.memory.folder.count
            res = c.map(jobs.bump_and_sum, arrays)
            assert list(res) == [300_000.0 * (k + 1) for k in range(3)]
            assert c.engine.memory.folder.count == written  # through the socket
    finally:
        worker.kill()
        worker.wait()


def test_a_message_in_shared_memory_goes_to_the_daemons_own_worker(
        daemons: Callable[..., Daemon]) -> None:
    """One worker of the daemon's own and one hand-started: the node shares memory, and
    every array message goes to its own worker; small ones go to either."""
    d = daemons(1)
    worker = subprocess.Popen([EXE, "worker", "--connect", f"tcp://127.0.0.1:{d.port + 2}"],
                              stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: d.status()["workers"] == 2, 20, "the hand-started worker to join")
        with Cluster([d.address]) as c:
            assert c.engine.nodes[0].shares_memory
            small = c.map(jobs.whoami, range(200), chunksize=1)
            hand = {name for name in small if name.endswith(f":{worker.pid}")}
            assert hand, "the hand-started worker took no small message"
            arrays = [np.ones(300_000) for _ in range(8)]
            res = c.map(jobs.bump_and_sum, arrays, chunksize=1)
            assert list(res) == [600_000.0] * 8
            assert all(not r.worker.endswith(f":{worker.pid}") for r in res.report)
    finally:
        worker.kill()
        worker.wait()


def test_input_files_are_written_again_but_never_under_an_array_a_worker_kept() -> None:
    """A worker gives back the input files it maps no more, and the client writes its next
    inputs into them (much faster than into new files); an input the function kept is not
    given back, so later maps never change what it holds."""
    with Cluster(workers=1) as c:
        folder = c.engine.memory.folder
        assert folder is not None
        assert c.map(jobs.keep_input, [np.full(300_000, 1.0 + k) for k in range(3)]) == [
            300_000.0 * (1 + k) for k in range(3)]
        for rep in range(3):
            arrays = [np.full(300_000, 10.0 * rep + k) for k in range(4)]
            assert c.map(np.sum, arrays) == [a.sum() for a in arrays]
        assert folder.reused >= 8  # the np.sum maps' files went round again
        assert c.map(jobs.kept_sums, [None]) == [[300_000.0 * (1 + k) for k in range(3)]]


def test_an_idle_client_removes_the_files_given_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """/dev/shm is memory: the files workers gave back stay while maps come, and go once
    the client has written none for ``shm.FREE_IDLE_S`` with no job running."""
    with Cluster(workers=1) as c:
        folder = c.engine.memory.folder
        assert folder is not None and folder.path is not None
        arrays = [np.full(300_000, float(k)) for k in range(3)]
        assert c.map(np.sum, arrays) == [a.sum() for a in arrays]
        assert folder.free  # kept for the next map (FREE_IDLE_S is 10 s)
        monkeypatch.setattr(shm, "FREE_IDLE_S", 0.0)
        wait_for(lambda: not folder.free, 20, "the idle client to drop the files")
        assert os.listdir(folder.path) == [os.path.basename(c.engine.memory.probe[0])]


KILLED_CLIENT = """
import sys
import numpy as np
from deathstar.client import Cluster
from tests import jobs
with Cluster(workers=1) as c:
    print(c.engine.memory.folder.folder(), c.local.folder, c.local.daemon.scratch_dir,
          flush=True)
    c.map(jobs.gated, [np.full(300_000, 1.0)] * 3, gate=sys.argv[1])
"""


def test_the_folders_of_a_client_killed_mid_map_go_with_the_next_client(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/dev/shm is memory: a client killed with ``kill -9`` while its inputs sit there
    cannot remove them, so the next client of this user removes the folder of a process
    that is gone, and leaves those of live processes (this one's) alone. So with its
    embedded daemon's folders in the temporary directory (ipc sockets, worker folders):
    the first scratch folder a process makes sweeps those of dead processes."""
    gate = tmp_path / "gate"
    with Cluster(workers=1) as alive:
        kept = alive.engine.memory.folder.folder()
        client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, str(gate)],
                                  stdout=subprocess.PIPE, text=True, start_new_session=True,
                                  cwd=Path(__file__).parents[2])
        try:
            assert client.stdout is not None
            dead, *dead_tmp = client.stdout.readline().split()
            wait_for(lambda: list(tmp_path.glob("gate.started.*")), 60, "the map to start")
            assert len(os.listdir(dead)) > 1  # its probe and an input file at least
        finally:
            os.killpg(client.pid, 9)
            client.wait()
        assert os.path.isdir(dead)  # nothing removed it
        assert all(os.path.isdir(f) for f in dead_tmp) and len(dead_tmp) == 2
        monkeypatch.setattr(scratch, "_swept", False)  # as in a process of its own
        with Cluster(workers=1) as following:
            assert following.engine.memory.folder.folder() != dead
            assert not os.path.exists(dead)
            assert os.path.isdir(kept)
            wait_for(lambda: not any(os.path.exists(f) for f in dead_tmp), 30,
                     "the killed client's folders in the temporary directory to go")
            assert os.path.isdir(following.local.folder)
            assert os.path.isdir(alive.local.daemon.scratch_dir)
