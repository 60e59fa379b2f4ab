"""``deathstar map --out FILE`` holds FILE with an exclusive lock: a second map on the same
file (plain, or with --resume) stops at once with exit code 5 and a clear message, and
the first map's file comes out whole. Before, the two interleaved their lines."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Daemon, wait_for

pytestmark = pytest.mark.timeout(90)

GATED = '''
import os, time

def wait(x, gate):
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x
'''


def _locked(path: Path) -> bool:
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (releases it, if we got it)
    return False


def _map(tmp_path: Path, daemon: Daemon, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deathstar", "map", "gatedmod:wait", "--args", "args.jsonl",
            "--kwargs", json.dumps({"gate": str(tmp_path / "gate")}), "--cluster",
            daemon.address, "--out", "out.jsonl", "--quiet", *extra]


def test_a_second_map_on_the_same_out_file_stops_at_once(daemon: Daemon, tmp_path: Path
                                                         ) -> None:
    (tmp_path / "gatedmod.py").write_text(GATED)
    (tmp_path / "args.jsonl").write_text("".join(f"{i}\n" for i in range(20)))
    out = tmp_path / "out.jsonl"
    first = subprocess.Popen(_map(tmp_path, daemon), cwd=tmp_path, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_for(lambda: _locked(out), 30, "the first map to lock its output")
        for extra in ((), ("--resume",)):
            second = subprocess.run(_map(tmp_path, daemon, *extra), cwd=tmp_path,
                                    capture_output=True, text=True, timeout=60)
            assert second.returncode == 5, second.stderr
            assert "out.jsonl is being written by another deathstar map" in second.stderr
        (tmp_path / "gate").touch()
        _, err = first.communicate(timeout=60)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0, err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(20))
    assert [line["result"] for line in lines] == list(range(20))
    assert not _locked(out)  # released at the end
