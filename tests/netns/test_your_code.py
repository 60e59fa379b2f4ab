"""The user's own code on a host that does not have it: a module with ordinary state (a
``threading.local`` cache and a lock) and a package with relative imports, written in a
folder of the test, mapped on a namespace host whose daemon runs from another folder, by
the library and by the CLI. Before modules were shipped as source these stopped with
"cannot pickle '_thread.lock' object"."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import deathstar
from tests.conftest import Daemon

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

STATEFUL = '''
import os
import threading

_CACHE = threading.local()
_LOCK = threading.Lock()
CALLS = 0


def f(x):
    global CALLS
    with _LOCK:
        CALLS += 1
        seen = getattr(_CACHE, "seen", 0) + 1
        _CACHE.seen = seen
    return {"double": 2 * x, "pid": os.getpid(), "module": __name__}
'''

POINT = """
class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def norm(self):
        return (self.x ** 2 + self.y ** 2) ** 0.5
"""

PACKAGE = {
    "__init__.py": "from .core import run\n",
    "core.py": "from . import helpers\nfrom .helpers import offset\n\n"
               "def run(x):\n    return helpers.scale(x) + offset()\n",
    "helpers.py": "import threading\n_LOCK = threading.Lock()\n\n"
                  "def scale(x):\n    with _LOCK:\n        return 10 * x\n\n"
                  "def offset():\n    return 7\n",
}


@pytest.fixture
def code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with ``statemod.py`` and the package ``relpkg``, importable here."""
    (tmp_path / "statemod.py").write_text(STATEFUL)
    (tmp_path / "pointmod.py").write_text(POINT)
    (tmp_path / "relpkg").mkdir()
    for name, text in PACKAGE.items():
        (tmp_path / "relpkg" / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("statemod", "pointmod", "relpkg", "relpkg.core", "relpkg.helpers"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def test_a_module_with_a_lock_and_a_thread_local_runs_on_the_host(node: Daemon, code: Path
                                                                  ) -> None:
    import statemod

    res = deathstar.map(statemod.f, range(20), cluster=[node.address])
    assert [r["double"] for r in res] == [2 * x for x in range(20)]
    assert {r["module"] for r in res} == {"statemod"}  # imported under its real name
    assert statemod.CALLS == 0  # ran there, not here


def test_a_package_with_relative_imports_runs_on_the_host(node: Daemon, code: Path) -> None:
    import relpkg

    assert deathstar.map(relpkg.run, range(5), cluster=[node.address]) == \
        [10 * x + 7 for x in range(5)]


def test_the_cli_maps_a_module_of_the_current_folder_on_the_host(node: Daemon, code: Path
                                                                 ) -> None:
    (code / "args.jsonl").write_text("".join(f"{i}\n" for i in range(10)))
    for target, expect in (("statemod:f", [{"double": 2 * i} for i in range(10)]),
                           ("relpkg:run", [10 * i + 7 for i in range(10)])):
        proc = subprocess.run(
            [sys.executable, "-m", "deathstar", "map", target, "--args", "args.jsonl",
             "--cluster", node.address, "--out", "out.jsonl", "--quiet"],
            cwd=code, capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, proc.stderr
        lines = [json.loads(line) for line in (code / "out.jsonl").read_text().splitlines()]
        got = [line["result"] for line in lines]
        if isinstance(expect[0], dict):
            got = [{"double": g["double"]} for g in got]
        assert got == expect


def test_inputs_of_a_local_class_ship_its_module_too(node: Daemon, code: Path) -> None:
    """A script's ``__main__`` lambda (by value: it names no module of ours) mapped over
    instances of a class of a local module: the inputs need that module shipped."""
    script = ("import sys, deathstar, pointmod\n"
              "points = [pointmod.Point(3 * k, 4 * k) for k in range(1, 6)]\n"
              "print(deathstar.map(lambda p: p.norm(), points, cluster=[sys.argv[1]]))\n")
    proc = subprocess.run([sys.executable, "-c", script, node.address], cwd=code,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str([5.0 * k for k in range(1, 6)])
