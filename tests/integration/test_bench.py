"""scripts/bench.py, run for real in its quick mode on two workloads (setup and W5): both
deathstar columns (the embedded cluster and a TCP daemon on loopback) and Pool measure,
and the JSON carries issue 16's targets with a figure and a verdict for each column. No
timing is asserted: only that the bench still measures what it says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


def _quick_bench(tmp_path: Path, only: str) -> tuple[subprocess.CompletedProcess[str],
                                                     dict[str, Any]]:
    """``bench.py --quick --only ONLY --peers pool``: the run and its JSON."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--only", only,
         "--peers", "pool", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=110, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(out.read_text())


def test_quick_bench_judges_both_deathstar_columns(tmp_path: Path) -> None:
    proc, report = _quick_bench(tmp_path, "setup,W5")
    assert "Targets of issue 16" in proc.stdout
    assert report["meta"]["load_at_start"] and report["meta"]["load_at_end"]
    targets = {t["key"]: t for t in report["targets"]}
    assert set(targets) == {"setup_s", "W5.worst"}
    w5 = targets["W5.worst"]
    for column in ("deathstar", "deathstar-tcp"):
        assert isinstance(w5["figures"][column], float), report["errors"]
        assert isinstance(w5["holds"][column], bool)
        assert len(w5["seeds"][column]) == 5 and None not in w5["seeds"][column]
        assert w5["figures"][column] == max(w5["seeds"][column])
    assert isinstance(w5["peer_figure"], float)  # Pool's, shown beside the need
    assert set(targets["setup_s"]["holds"]) == {"deathstar"}  # TCP setup is not judged
    assert isinstance(targets["setup_s"]["figures"]["deathstar-tcp"], float)


def test_w2_stages_times_every_stage_of_a_call() -> None:
    """scripts/w2_stages.py (the per-stage profile of a single call) still finds every
    stage it patches: it stops with an error when a stage was not stamped once per
    call, and prints a figure for each."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "w2_stages.py"), "--calls", "50"],
        capture_output=True, text=True, timeout=110, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = dict(line.strip().rsplit(None, 1) for line in proc.stdout.splitlines()[1:])
    assert len(rows) == 11 and "whole call" in rows, proc.stdout
    assert float(rows["whole call"]) > 0 and all(float(v) == float(v) for v in rows.values())


def test_cpu_per_call_accounts_for_every_system() -> None:
    """scripts/cpu_per_call.py (the CPU a call costs the calling process and its workers,
    deathstar beside the stdlib pools) still measures each system: a row each, every
    figure a number (/proc counts in ticks: a short run may see none)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "cpu_per_call.py"), "--rounds", "1",
         "--calls", "100", "--inputs", "400"],
        capture_output=True, text=True, timeout=110, stdin=subprocess.DEVNULL,
        cwd=ROOT / "scripts")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {cells[0]: cells[1:] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| system")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert set(rows) == {"deathstar embedded", "Pool", "ProcessPoolExecutor"}, proc.stdout
    for name, (w2_us, caller, workers, w1_rate, caller1, workers1) in rows.items():
        assert float(w2_us) > 0 and float(w1_rate.replace(",", "")) > 0, (name, proc.stdout)
        for figure in (caller, workers, caller1, workers1):
            user, system = (float(part) for part in figure.split("+"))
            assert user >= 0 and system >= 0


def test_pool_and_deathstar_take_turns_on_the_workloads_judged_against_pool(
        tmp_path: Path) -> None:
    proc, report = _quick_bench(tmp_path, "W1,W2")
    systems = {"pool", "deathstar", "deathstar-tcp"}
    for key in ("W1.batched.tasks_s", "W1.one.tasks_s", "W2.median_us"):
        for system in systems:
            assert len(report["samples"][system][key]) == 1, (system, key, report["errors"])
    # every repetition (the warm-up, rep 0, and rep 1) runs all three, one after another,
    # and the turn starts with another system each time
    for w in ("W1", "W2"):
        turns = [line.split(": ", 2)[-1].split(", ") for line in proc.stderr.splitlines()
                 if f"paired {w} rep " in line]
        assert len(turns) == 2 and all(set(t) == systems for t in turns), proc.stderr[-2000:]
        assert turns[0][0] != turns[1][0]
    assert any("taking turns" in note for note in report["notes"])
