"""Maps against real daemons and worker processes on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import zmq

import deathstar
from deathstar import protocol
from deathstar.client import Cluster
from deathstar.daemon.hosted import HostedPeer
from deathstar.errors import RemoteTraceback
from deathstar.serialize import SerializationError
from tests import jobs
from tests.conftest import ROOT, Daemon, descendants, wait_for

pytestmark = pytest.mark.timeout(60)


def test_results_come_back_in_input_order(daemon: Daemon) -> None:
    # jitter_square finishes inputs out of order; map must put them back.
    res = deathstar.map(jobs.jitter_square, range(300), cluster=[daemon.address])
    assert list(res) == [x * x for x in range(300)]
    assert [r.index for r in res.report] == list(range(300))
    assert {r.node for r in res.report} == {daemon.address}
    assert all(r.outcome == "ok" and r.end >= r.start for r in res.report)
    assert res.errors == []


def test_common_keyword_arguments_and_star_shapes(daemon: Daemon) -> None:
    with Cluster([daemon.address]) as c:
        assert c.map(jobs.add, range(5), y=10) == [10, 11, 12, 13, 14]
        assert c.starmap(jobs.add, [(1, 2), (3, 4)], z=100) == [103, 107]
        calls = [((1,), {"y": 1}), ((2,), {"z": 5, "y": 0})]
        assert c.map_calls(jobs.add, calls, y=1000) == [2, 7]  # a call's own keyword wins


def test_imap_is_ordered_and_imap_unordered_is_complete(daemon: Daemon) -> None:
    with Cluster([daemon.address]) as c:
        assert list(c.imap(jobs.jitter_square, range(100))) == [x * x for x in range(100)]
        got = list(c.imap_unordered(jobs.jitter_square, iter(range(100))))
        assert sorted(got) == [x * x for x in range(100)]


def test_results_stream_before_all_inputs_are_submitted(daemon: Daemon) -> None:
    # An endless generator: if results only came after submission finished, this hangs.
    def forever() -> Any:
        i = 0
        while True:
            yield i
            i += 1

    with Cluster([daemon.address]) as c:
        stream = c.imap(jobs.square, forever())
        assert [next(stream) for _ in range(50)] == [x * x for x in range(50)]
        stream.close()  # cancels the rest
        assert c.map(jobs.square, [7]) == [49]


def test_the_raised_exception_carries_its_traceback_node_worker(daemon: Daemon) -> None:
    res = deathstar.map(jobs.fail_on_multiples_of, range(12), cluster=[daemon.address],
                        on_error="return", k=5)
    failed = [i for i, v in enumerate(res) if isinstance(v, ValueError)]
    assert failed == [0, 5, 10]
    assert [v for i, v in enumerate(res) if i not in failed] == [
        1, 2, 3, 4, 6, 7, 8, 9, 11]
    err = res[5]
    assert type(err) is ValueError and "input 5 is a multiple of 5" in str(err)
    cause = err.__cause__
    assert isinstance(cause, RemoteTraceback) and cause.type_name == "ValueError"
    assert "fail_on_multiples_of" in cause.remote_traceback
    assert "raise ValueError" in cause.remote_traceback
    assert err.index == 5 and err.node == daemon.address  # type: ignore[attr-defined]
    host, _, pid = err.worker.rpartition(":")  # type: ignore[attr-defined]
    assert host and int(pid) in descendants(daemon.proc.pid)
    assert res.errors == [res[0], res[5], res[10]]
    assert [r.outcome for r in res.report].count("error") == 3


def test_on_error_raise_raises_first_error_after_the_map_completes(daemon: Daemon) -> None:
    with pytest.raises(ValueError) as info:
        deathstar.map(jobs.fail_on_multiples_of, range(1, 30), cluster=[daemon.address], k=7)
    assert info.value.index == 6  # type: ignore[attr-defined] # input 7 sits at index 6
    result = info.value.result  # type: ignore[attr-defined]
    assert len(result) == 29 and len(result.report) == 29
    assert result[0] == 1 and isinstance(result[13], ValueError)


def test_two_clients_at_once_are_served_fairly(daemon: Daemon) -> None:
    long_started = threading.Event()
    out: dict[str, Any] = {}

    def long_map() -> None:
        with Cluster([daemon.address]) as c:
            out["long"] = c.map(jobs.sleep_for, [0.03] * 80,
                                progress=lambda done, total: long_started.set())
            out["long_end"] = time.monotonic()

    t = threading.Thread(target=long_map)
    t.start()
    assert long_started.wait(20)
    with Cluster([daemon.address]) as c:
        short = c.map(jobs.square, range(20))
        short_end = time.monotonic()
    t.join(30)
    assert short == [x * x for x in range(20)]
    assert out["long"] == [0.03] * 80
    # The second client was served while the first still had most of its work queued.
    assert short_end < out["long_end"]


def test_hand_started_worker_joins_a_daemon(daemons: Callable[..., Daemon]) -> None:
    d = daemons(0)
    assert d.status()["workers"] == 0
    exe = Path(sys.executable).with_name("deathstar")
    worker = subprocess.Popen([str(exe), "worker", "--connect", f"tcp://127.0.0.1:{d.port + 2}"],
                              stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: d.status()["workers"] == 1, 20, "the hand-started worker to join")
        res = deathstar.map(jobs.whoami, range(10), cluster=[d.address])
        assert {r.rpartition(":")[2] for r in res} == {str(worker.pid)}
        assert d.status()["tasks_done"] == 10
    finally:
        worker.terminate()
        worker.wait(10)
    wait_for(lambda: d.status()["workers"] == 0, 20, "the daemon to forget the worker")


def test_embedded_local_cluster_leaves_no_process_behind() -> None:
    """An embedded cluster of its own (``Cluster(None)``; ``deathstar.map`` shares one
    per process instead, see test_shared_embedded.py) ends with its close."""
    env_cluster = os.environ.pop("DEATHSTAR_CLUSTER", None)
    try:
        with Cluster(None) as c:
            assert c.local is not None
            local = c.local  # the daemon hosted in this process
            res = c.map(jobs.whoami, range(40))
    finally:
        if env_cluster is not None:
            os.environ["DEATHSTAR_CLUSTER"] = env_cluster
    pids = {int(r.rpartition(":")[2]) for r in res}
    assert os.getpid() not in pids  # ran in worker processes, not here
    assert len(res.report) == 40
    wait_for(lambda: not (set(descendants(os.getpid())) & pids), 15,
             "the embedded workers to exit")
    # (the process's shared embedded daemon, which other tests may have started, stays)
    assert local.wait_stopped(0)  # close returns once it has stopped
    assert not local.alive()


def test_embedded_cluster_is_private_to_this_user(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded daemon, hosted in this process, is reached in memory by its client
    (whose engine runs in the daemon's own loop) and over ipc sockets in a 0700 folder by ``status``, on no TCP port at all; it needs
    no keys even when the user has some (a key folder in DEATHSTAR_KEYS used to turn
    CURVE on for the embedded daemon only, and the map failed), and removes the folder."""
    import psutil

    keys = tmp_path / "keys"
    made = subprocess.run([str(Path(sys.executable).with_name("deathstar")), "keygen", str(keys)],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    monkeypatch.setenv("DEATHSTAR_KEYS", str(keys))
    monkeypatch.delenv("DEATHSTAR_CLUSTER", raising=False)
    here = psutil.Process()

    def listening() -> set[Any]:
        return {k.laddr for k in here.net_connections(kind="inet")
                if k.status == psutil.CONN_LISTEN}

    before = listening()
    with Cluster(workers=1) as c:
        assert c.local is not None
        folder = Path(c.local.folder)
        assert (folder.stat().st_mode & 0o777) == 0o700
        assert isinstance(c.engine.nodes[0].link, HostedPeer)
        assert c.engine.reactor is c.local.reactor
        assert c.addresses[0].exec_endpoint == f"ipc://{folder}/exec"
        assert c.addresses[0].status_endpoint == f"ipc://{folder}/status"
        assert listening() == before
        assert c.map(jobs.square, range(50)) == [x * x for x in range(50)]
        assert c.status()[0]["tasks_done"] >= 1
    assert not folder.exists()


def test_faster_nodes_do_more_of_the_work(daemons: Callable[..., Daemon]) -> None:
    small, big = daemons(1), daemons(3)
    res = deathstar.map(jobs.sleep_for, [0.02] * 160, cluster=[small.address, big.address])
    counts = {s.node: s.jobs_completed for s in deathstar.node_summary(res.report)}
    assert sum(counts.values()) == 160
    assert counts[big.address] > 1.8 * counts[small.address], counts


def test_a_killed_worker_is_replaced(daemon: Daemon) -> None:
    pids = {int(w.rpartition(":")[2]) for w in deathstar.map(
        jobs.whoami, range(40), cluster=[daemon.address])}
    victim = next(iter(pids))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: daemon.status()["worker_restarts"] >= 1, 20, "a replacement worker")
    wait_for(lambda: daemon.status()["workers"] == 2, 20, "two workers again")
    later = {int(w.rpartition(":")[2]) for w in deathstar.map(
        jobs.whoami, range(200), cluster=[daemon.address])}
    assert victim not in later and later - pids


def test_peer_with_another_protocol_version_is_refused_naming_both(daemon: Daemon) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{daemon.port}")
    try:
        import msgpack

        sock.send_multipart([msgpack.packb({"v": 99, "t": "hello", "hb": 1.0, "versions": {}})])
        assert sock.poll(5000), "no answer to a hello with another protocol version"
        env = protocol.decode_envelope(sock.recv_multipart()[0])
        assert env["t"] == protocol.REFUSED
        assert "99" in env["reason"] and str(protocol.PROTOCOL_VERSION) in env["reason"]
    finally:
        sock.close()
    assert daemon.status()["workers"] == 2  # and it keeps serving


def test_unpicklable_function_or_argument_is_named_and_nothing_is_sent(daemon: Daemon
                                                                       ) -> None:
    lock = threading.Lock()
    with Cluster([daemon.address]) as c:
        with pytest.raises(SerializationError, match="common argument 'guard'"):
            c.map(jobs.add, range(3), guard=lock)
        with pytest.raises(SerializationError, match="function"):
            c.map(lambda x: (lock, x), range(3))
        with pytest.raises(SerializationError, match="input 1"):
            c.map(jobs.whoami, [1, jobs.Unpicklable(), 3])
    assert daemon.status()["tasks_done"] == 0


def test_unpicklable_result_fails_that_input_and_the_worker_goes_on(daemon: Daemon) -> None:
    with Cluster([daemon.address]) as c:
        res = c.map(jobs.return_unpicklable, range(3), on_error="return")
        assert all(isinstance(v, TypeError) and "pickle" in str(v)
                   and "could not be pickled" in v.__notes__[0] for v in res)
        assert c.map(jobs.square, range(5)) == [0, 1, 4, 9, 16]
    assert daemon.status()["worker_restarts"] == 0


def test_unreachable_node_is_named_and_the_map_goes_on(daemon: Daemon) -> None:
    dead = "127.0.0.1:9"  # discard port: nothing listens there
    started = time.monotonic()
    with Cluster([dead, daemon.address], connect_timeout=1.0) as c:
        assert time.monotonic() - started < 5
        assert any(dead in u for u in c.unreachable)
        assert c.map(jobs.square, range(10)) == [x * x for x in range(10)]
    with pytest.raises(deathstar.NoNodesError, match=dead):
        Cluster([dead], connect_timeout=1.0)


def test_arrays_round_trip_equal(daemon: Daemon) -> None:
    rng = np.random.default_rng(1)
    big = rng.random((1000, 300))
    arrays = [big, big[:, ::3], np.zeros(0), np.arange(10, dtype=np.int8), big.T]
    with Cluster([daemon.address]) as c:
        back = c.map(np.copy, arrays)
    for sent, got in zip(arrays, back):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert np.array_equal(got, sent)
    back[0][0, 0] = -1.0  # results are writable, as with multiprocessing


def test_local_module_is_shipped_by_value(daemon: Daemon, tmp_path: Path) -> None:
    # A module the workers cannot import: it exists only in the client's folder.
    (tmp_path / "dsx_localmod.py").write_text(textwrap.dedent("""
        import dsx_helper
        def triple_plus(x):
            return dsx_helper.triple(x) + 1
    """))
    (tmp_path / "dsx_helper.py").write_text("def triple(x):\n    return 3 * x\n")
    script = textwrap.dedent(f"""
        import deathstar, dsx_localmod
        print(list(deathstar.map(dsx_localmod.triple_plus, range(5),
                                 cluster=[{daemon.address!r}])))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[1, 4, 7, 10, 13]"


def test_what_tasks_print_goes_to_per_worker_log_files(daemon: Daemon) -> None:
    res = deathstar.map(jobs.shout, range(6), cluster=[daemon.address])
    assert list(res) == list(range(6))
    logs = Path(os.environ["XDG_STATE_HOME"]) / "deathstar" / "logs"
    for record in res.report:
        pid = record.worker.rpartition(":")[2]
        text = (logs / f"worker-{pid}.log").read_text()
        assert f"input {record.index} on stdout" in text
        assert f"input {record.index} on stderr" in text


def test_seeds_give_the_same_numbers_whatever_runs_where(daemons: Callable[..., Daemon]
                                                         ) -> None:
    one, two, three = daemons(1), daemons(2), daemons(1)
    a = deathstar.map(jobs.draw, range(40), cluster=[one.address], seed=7, chunksize=3)
    b = deathstar.map(jobs.draw, range(40), cluster=[two.address, three.address], seed=7)
    c = deathstar.map(jobs.draw, range(40), cluster=[two.address], seed=8)
    assert list(a) == list(b)
    assert len({r.node for r in b.report}) == 2
    assert list(a) != list(c) and len(set(a)) == 40


def test_captured_output_comes_back_in_the_report(daemon: Daemon) -> None:
    res = deathstar.map(jobs.shout, range(5), cluster=[daemon.address], capture_output=True)
    for record in res.report:
        assert record.output == (f"input {record.index} on stdout\n"
                                 f"input {record.index} on stderr\n")
    plain = deathstar.map(jobs.shout, range(2), cluster=[daemon.address])
    assert all(r.output == "" for r in plain.report)


def test_as_completed_streams_index_and_result(daemon: Daemon) -> None:
    with Cluster([daemon.address]) as c:
        got = dict(c.as_completed(jobs.fail_on_multiples_of, range(10), k=4))
    assert set(got) == set(range(10))
    assert all(isinstance(got[i], ValueError) for i in (0, 4, 8))
    assert all(got[i] == i for i in range(10) if i % 4)


def test_default_task_timeout_from_the_environment(daemon: Daemon) -> None:
    script = ("import deathstar; from tests import jobs; "
              f"r = deathstar.map(jobs.slow_on, [1, 2], cluster=[{daemon.address!r}], "
              "on_error='return', slow=2, seconds=30); "
              "print(type(r[1]).__name__, r[0])")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=60,
                         env={**os.environ, "DEATHSTAR_TASK_TIMEOUT": "1"})
    assert out.stdout.split() == ["TaskTimeout", "1"], out.stderr
