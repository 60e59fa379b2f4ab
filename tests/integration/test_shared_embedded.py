"""The shared embedded cluster: calls that name no cluster reuse one warm daemon per
process, which is replaced when it died and stops at exit or after its idle time. Each
scenario runs in a fresh interpreter, so that nothing of this test process leaks in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(120)


def scenario(code: str, **env: str) -> dict[str, object]:
    """Run ``code`` (which prints one JSON line last) in a fresh interpreter."""
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                         env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_calls_without_a_cluster_share_warm_workers_and_an_own_cluster_is_apart() -> None:
    out = scenario("""
        import json, os, deathstar, concurrent.futures as cf
        from deathstar.client import embedded
        from tests import jobs
        first = set(deathstar.map(jobs.whoami, range(40)))
        daemon = embedded._shared.daemon
        workers = {f"{os.uname().nodename}:{p.pid}"
                   for p, _ in daemon.daemon.supervisor.procs.values()}
        second = set(deathstar.map(jobs.whoami, range(40)))
        with deathstar.Executor() as ex:
            third = {ex.submit(jobs.whoami).result() for _ in range(10)}
        with deathstar.Cluster(None, workers=1) as own:
            fourth = set(own.map(jobs.whoami, range(10)))
        print(json.dumps({"first": sorted(first), "second": sorted(second),
                          "third": sorted(third), "fourth": sorted(fourth),
                          "workers": sorted(workers),
                          "still": sorted(f"{os.uname().nodename}:{p.pid}"
                                          for p, _ in daemon.daemon.supervisor.procs.values()),
                          "same": embedded._shared.daemon is daemon,
                          "alive": daemon.alive()}))
    """)
    assert out["same"] and out["alive"]
    shared = set(out["workers"])
    assert len(shared) == os.cpu_count() and out["still"] == out["workers"]  # warm, kept
    for calls in ("first", "second", "third"):  # every call ran on those same workers
        assert set(out[calls]) <= shared, (calls, out[calls], shared)
    assert not set(out["fourth"]) & shared  # an own cluster has workers of its own


def test_a_dead_shared_daemon_is_replaced() -> None:
    out = scenario("""
        import json, os, signal, deathstar
        from deathstar.client import embedded
        assert deathstar.map(abs, [-1]) == [1]
        old = embedded._shared.daemon
        old.daemon.request_stop(0)  # its loop ends (as if it had failed): its workers too
        assert old.wait_stopped(30)
        result = deathstar.map(abs, [-2, -3])
        print(json.dumps({"result": result, "new": embedded._shared.daemon is not old}))
    """)
    assert out == {"result": [2, 3], "new": True}


def test_the_shared_daemon_stops_at_exit_and_after_its_idle_time(tmp_path: Path) -> None:
    out = scenario("""
        import json, time, deathstar
        from deathstar.client import embedded
        assert deathstar.map(abs, [-1]) == [1]
        daemon = embedded._shared.daemon
        deadline = time.monotonic() + 30
        while daemon.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        stopped_idle = not daemon.alive() and not daemon.daemon.supervisor.procs
        again = deathstar.map(abs, [-4])  # a new one starts
        second = embedded._shared.daemon
        print(json.dumps({"stopped_idle": stopped_idle, "again": again,
                          "folder": second.folder,
                          "pids": [p.pid for p, _ in second.daemon.supervisor.procs.values()]}))
    """, DEATHSTAR_EMBEDDED_IDLE="0.5")
    assert out["stopped_idle"] and out["again"] == [4]
    assert not Path(str(out["folder"])).exists()  # the exit hook stopped the second one
    assert out["pids"] and not any(Path(f"/proc/{pid}").exists() for pid in out["pids"])

