"""What users install is what we test: the wheel of this checkout, installed with no extras
into a fresh venv of every Python the package claims, runs the CLI, a map and a daemon.

Nothing here imports the deathstar under test: every check runs a command in the venv."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.install.conftest import (Venv, free_port_run, source_version, stop_process_group,
                                    wait_for)

# Setup (venv + pip install) counts against the first test of each Python.
pytestmark = pytest.mark.timeout(300)

#: The user's module, in a folder of its own: not installed anywhere, so it is shipped.
SQUARES = '''\
def square(x, offset=0):
    return x * x + offset
'''

#: Inputs of the map: one argument a line.
INPUTS = list(range(12))


def _write_module(venv: Venv) -> Path:
    (venv.work / "squares.py").write_text(SQUARES)
    args = venv.work / "args.jsonl"
    args.write_text("".join(f"{json.dumps(x)}\n" for x in INPUTS))
    return args


def test_installed_from_the_wheel(venv: Venv) -> None:
    """The venv imports deathstar from its own site-packages under the new name, and a
    plain install brought nothing it was not asked for (no click)."""
    probe = venv.run(venv.python, "-c", (
        "import importlib.metadata as m, importlib.util as u, deathstar, json; "
        "print(json.dumps({'file': deathstar.__file__, 'dist': m.version('deathstar-cluster'),"
        " 'click': u.find_spec('click') is not None}))"))
    info = json.loads(probe.stdout)
    assert info["file"].startswith(str(venv.path)), info
    assert info["dist"] == source_version()
    # typer >= 0.16 does not bring click: its absence is what makes this a test of the
    # import that crashed (config.py once took get_app_dir from click).
    assert info["click"] is False, "click is installed, so this no longer proves the import"


def test_version(venv: Venv) -> None:
    expected = f"deathstar {source_version()}"
    assert venv.run(venv.deathstar, "--version").stdout.strip() == expected
    assert venv.run(venv.python, "-m", "deathstar", "--version").stdout.strip() == expected


def test_cli_map_on_embedded_cluster(venv: Venv) -> None:
    args = _write_module(venv)
    proc = venv.run(venv.deathstar, "map", "squares:square", "--args", str(args),
                    "--kwargs", '{"offset": 1}', "--workers", "2", "-q")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [r["index"] for r in rows] == list(range(len(INPUTS)))
    assert [r["result"] for r in rows] == [x * x + 1 for x in INPUTS]


def test_python_map(venv: Venv) -> None:
    _write_module(venv)
    proc = venv.run(venv.python, "-c", (
        "import json, deathstar, squares; "
        f"r = deathstar.map(squares.square, {INPUTS!r}, offset=2); "
        "print(json.dumps({'results': list(r), 'errors': len(r.errors)}))"))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"results": [x * x + 2 for x in INPUTS], "errors": 0}


def test_daemon_answers_status(venv: Venv) -> None:
    port = free_port_run(3)
    address = f"127.0.0.1:{port}"
    log = (venv.work / f"daemon-{port}.log").open("wb")
    daemon = subprocess.Popen(
        [venv.deathstar, "daemon", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--heartbeat", "0.2", "--insecure"],
        cwd=venv.work, env=venv.env(), stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready() -> dict[str, object] | None:
            if daemon.poll() is not None:
                raise AssertionError(f"daemon exited {daemon.returncode}:\n"
                                     f"{Path(log.name).read_text()}")
            proc = venv.run(venv.deathstar, "status", address, "--json", "--timeout", "1",
                            check=False)
            if proc.returncode != 0:
                return None
            row: dict[str, object] = json.loads(proc.stdout)[0]
            return row if not row.get("error") and row.get("workers") == 1 else None

        row = wait_for(ready, 30, f"deathstar status {address} to report one worker")
        assert row["versions"]["deathstar"] == source_version()  # type: ignore[index]
        assert row["mismatch"] == []
    finally:
        stop_process_group(daemon)
        log.close()
