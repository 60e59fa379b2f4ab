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
        second = set(deathstar.map(jobs.whoami, range(40)))
        with deathstar.Executor() as ex:
            third = {ex.submit(jobs.whoami).result() for _ in range(10)}
        with deathstar.Cluster(None, workers=1) as own:
            fourth = set(own.map(jobs.whoami, range(10)))
        print(json.dumps({"first": sorted(first), "second": sorted(second),
                          "third": sorted(third), "fourth": sorted(fourth),
                          "same": embedded._shared.daemon is daemon,
                          "alive": daemon.proc.poll() is None}))
    """)
    assert out["same"] and out["alive"]
    assert set(out["first"]) & set(out["second"]), "the second map started new workers"
    assert set(out["third"]) <= set(out["first"]) | set(out["second"])
    assert not set(out["fourth"]) & (set(out["first"]) | set(out["second"]))


def test_a_dead_shared_daemon_is_replaced() -> None:
    out = scenario("""
        import json, os, signal, deathstar
        from deathstar.client import embedded
        assert deathstar.map(abs, [-1]) == [1]
        old = embedded._shared.daemon
        old.proc.kill(); old.proc.wait()
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
        while daemon.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        stopped_idle = daemon.proc.poll() is not None
        again = deathstar.map(abs, [-4])  # a new one starts
        print(json.dumps({"stopped_idle": stopped_idle, "again": again,
                          "folder": embedded._shared.daemon.folder,
                          "pid": embedded._shared.daemon.proc.pid}))
    """, DEATHSTAR_EMBEDDED_IDLE="0.5")
    assert out["stopped_idle"] and out["again"] == [4]
    assert not Path(str(out["folder"])).exists()  # the exit hook stopped the second one
    assert not Path(f"/proc/{out['pid']}").exists()


def test_the_embedded_daemons_entry_is_light_and_refuses_bad_options_and_folders(
        tmp_path: Path) -> None:
    """``python -m deathstar.daemon`` (what the embedded cluster starts) imports none of
    the CLI, and names a bad option or a folder others may write with exit 2."""
    light = subprocess.run([sys.executable, "-c", "import sys, deathstar.daemon.__main__; "
                            "print(sorted({'typer', 'rich', 'click'} & set(sys.modules)))"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert light.returncode == 0 and light.stdout.strip() == "[]", light.stderr

    def entry(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "deathstar.daemon", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    bad = entry("--ipc", str(tmp_path), "--workers", "-1")
    assert bad.returncode == 2 and "--workers must be 0 or more" in bad.stderr
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    unsafe = entry("--ipc", str(open_folder), "--workers", "0")
    assert unsafe.returncode == 2 and str(open_folder) in unsafe.stderr, unsafe.stderr
