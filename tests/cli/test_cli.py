"""The ``deathstar`` console script, run as a user runs it: a subprocess."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import deathstar
from deathstar import protocol
from tests.conftest import ROOT, Daemon

pytestmark = pytest.mark.timeout(90)

EXE = str(Path(sys.executable).with_name("deathstar"))


def run(*args: str, cwd: Path = ROOT, timeout: float = 60, **kw: Any
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def write_jsonl(path: Path, values: list[Any]) -> Path:
    path.write_text("".join(json.dumps(v) + "\n" for v in values))
    return path


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"deathstar {deathstar.__version__}"


def test_map_writes_results_in_order_and_a_report(daemon: Daemon, tmp_path: Path) -> None:
    args = write_jsonl(tmp_path / "in.jsonl", list(range(200)))
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    res = run("map", "tests.jobs:jitter_square", "--args", str(args), "--cluster",
              daemon.address, "--out", str(out), "--report", str(report))
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [{"index": i, "result": i * i} for i in range(200)]
    records = json.loads(report.read_text())
    assert isinstance(records, list) and len(records) == 200
    assert {r["node"] for r in records} == {daemon.address}
    assert "node summary" in res.stderr and daemon.address in res.stderr


def test_map_input_shapes_and_common_kwargs_to_stdout(daemon: Daemon, tmp_path: Path) -> None:
    # array = positional args, object = keyword args, anything else = the single argument
    args = write_jsonl(tmp_path / "in.jsonl", [[1, 2], {"x": 3, "z": 4}, 5])
    res = run("map", "tests.jobs:add", "--args", str(args), "--kwargs", '{"z": 100}',
              "--cluster", daemon.address, "-q")
    assert res.returncode == 0, res.stderr
    # add(1, 2, z=100); add(x=3, z=4) (the line's own keyword wins); add(5, z=100)
    assert [json.loads(line)["result"] for line in res.stdout.splitlines()] == [103, 7, 105]


def test_map_pickle_in_and_out(daemon: Daemon, tmp_path: Path) -> None:
    args = tmp_path / "in.pkl"
    args.write_bytes(pickle.dumps([1, 2, 3]))
    out = tmp_path / "out.pkl"
    res = run("map", "tests.jobs:square", "--args", str(args), "--cluster", daemon.address,
              "--out", str(out), "--report", str(tmp_path / "r.csv"))
    assert res.returncode == 0, res.stderr
    assert pickle.loads(out.read_bytes()) == [1, 4, 9]
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("index,")


def test_embedded_local_cluster_by_default(tmp_path: Path) -> None:
    args = write_jsonl(tmp_path / "in.jsonl", list(range(20)))
    res = run("map", "tests.jobs:square", "--args", str(args), "--workers", "2",
              env={**_env_without_cluster()})
    assert res.returncode == 0, res.stderr
    assert [json.loads(line)["result"] for line in res.stdout.splitlines()] == [
        x * x for x in range(20)]
    assert "local" in res.stderr  # the node summary names the embedded node


def test_some_inputs_failed_exit_code_and_error_lines(daemon: Daemon, tmp_path: Path) -> None:
    args = write_jsonl(tmp_path / "in.jsonl", list(range(1, 11)))
    res = run("map", "tests.jobs:fail_on_multiples_of", "--args", str(args), "--kwargs",
              '{"k": 4}', "--cluster", daemon.address)
    assert res.returncode == 3, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(lines) == 10
    assert [line["index"] for line in lines if "error" in line] == [3, 7]
    assert lines[3]["error"]["type"] == "ValueError"
    assert "multiple of 4" in lines[3]["error"]["message"]
    assert "input 3 failed" in res.stderr


@pytest.mark.parametrize("spec, needle", [
    ("no_such_module_xyz:f", "no_such_module_xyz"),
    ("tests.jobs:no_such_function", "no_such_function"),
    ("tests.jobs", "MODULE:FUNCTION"),
])
def test_bad_function_fails_before_anything_starts(tmp_path: Path, spec: str,
                                                    needle: str) -> None:
    args = write_jsonl(tmp_path / "in.jsonl", [1])
    res = run("map", spec, "--args", str(args), "--cluster", "127.0.0.1:9")
    assert res.returncode == 5
    assert needle in res.stderr and "127.0.0.1:9" not in res.stderr


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    args = tmp_path / "in.jsonl"
    args.write_text("1\n2\n\n[3,\n")
    res = run("map", "tests.jobs:square", "--args", str(args))
    assert res.returncode == 5
    assert f"{args}, line 4" in res.stderr.replace("\n", "")


def test_result_json_cannot_hold_asks_for_pickle(daemon: Daemon, tmp_path: Path) -> None:
    args = write_jsonl(tmp_path / "in.jsonl", [1])
    res = run("map", "fractions:Fraction", "--args", str(args), "--cluster", daemon.address,
              "-q")
    assert res.returncode == 5
    assert "--out results.pkl" in res.stderr


def test_empty_input_file_is_an_empty_map(daemon: Daemon, tmp_path: Path) -> None:
    args = write_jsonl(tmp_path / "in.jsonl", [])
    res = run("map", "tests.jobs:square", "--args", str(args), "--cluster", daemon.address)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""


def test_unreachable_node_is_named(daemon: Daemon, tmp_path: Path) -> None:
    args = write_jsonl(tmp_path / "in.jsonl", list(range(5)))
    started = time.monotonic()
    res = run("map", "tests.jobs:square", "--args", str(args), "--cluster", "127.0.0.1:9",
              "--connect-timeout", "1")
    assert res.returncode == 4
    assert "127.0.0.1:9" in res.stderr
    assert time.monotonic() - started < 20
    # With one good node the map goes on, and warns about the other.
    res = run("map", "tests.jobs:square", "--args", str(args), "--cluster",
              f"127.0.0.1:9,{daemon.address}", "--connect-timeout", "1")
    assert res.returncode == 0, res.stderr
    assert "127.0.0.1:9" in res.stderr
    assert len(res.stdout.splitlines()) == 5


def test_cluster_from_file_and_environment(daemon: Daemon, tmp_path: Path) -> None:
    args = write_jsonl(tmp_path / "in.jsonl", [2])
    nodes = tmp_path / "nodes.txt"
    nodes.write_text(f"# our lab\n{daemon.address}\n")
    res = run("map", "tests.jobs:square", "--args", str(args), "--cluster", f"@{nodes}", "-q")
    assert res.returncode == 0 and json.loads(res.stdout)["result"] == 4, res.stderr
    env = {**_env_without_cluster(), "DEATHSTAR_CLUSTER": daemon.address}
    res = run("map", "tests.jobs:whoami", "--args", str(args), "--report",
              str(tmp_path / "r.json"), "-q", env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "r.json").read_text())[0]["node"] == daemon.address


def test_status_json_and_table(daemon: Daemon) -> None:
    res = run("status", daemon.address, "127.0.0.1:9", "--json", "--timeout", "1")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["node"] for r in rows] == [daemon.address, "127.0.0.1:9"]
    good, bad = rows
    assert good["error"] == "" and good["workers"] == 2 and good["mismatch"] == []
    assert good["versions"]["protocol"] == str(protocol.PROTOCOL_VERSION)
    for key in ("hostname", "idle", "busy", "queued", "tasks_done", "uptime_s", "load1"):
        assert key in good
    assert "no answer" in bad["error"]
    table = run("status", daemon.address)
    assert table.returncode == 0 and daemon.address in table.stdout
    assert run("status", "127.0.0.1:9", "--timeout", "0.5").returncode == 4


def test_daemon_refuses_a_network_address_without_insecure() -> None:
    res = run("daemon", "--host", "0.0.0.0", "--port", "0", "--workers", "0")
    assert res.returncode == 2
    assert "--insecure" in res.stderr


def _env_without_cluster() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "DEATHSTAR_CLUSTER"}


def test_report_command_and_plots(daemon: Daemon, tmp_path: Path) -> None:
    args = write_jsonl(tmp_path / "in.jsonl", list(range(1, 41)))
    report, png, png2 = tmp_path / "r.json", tmp_path / "map.png", tmp_path / "report.png"
    res = run("map", "tests.jobs:fail_on_multiples_of", "--args", str(args), "--cluster",
              daemon.address, "--kwargs", '{"k": 10}', "--report", str(report), "--plot",
              str(png), "-q")
    assert res.returncode == 3, res.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = run("report", str(report), "--plot", str(png2))
    assert shown.returncode == 0, shown.stderr
    assert daemon.address in shown.stdout and "p95 s" in shown.stdout
    row = next(line for line in shown.stdout.splitlines()
               if daemon.address in line and "│" in line and "%" in line)
    cells = [c.strip() for c in row.split("│") if c.strip()]
    assert cells[1:3] == ["40", "4"]  # 40 tasks, 4 failed (10, 20, 30, 40)
    assert png2.stat().st_size > 10_000
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png2))
    assert pixels.std() > 0.05  # not blank: bars and text on the white
    bad = run("report", str(args))
    assert bad.returncode == 5
