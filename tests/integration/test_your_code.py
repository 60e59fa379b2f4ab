"""Your code on the nodes as it runs at home: modules shipped as source (a module edited
and reloaded is sent again; two clients with two versions of one module on one worker
each get theirs), and the exception that was raised is the one you catch, from every way
of mapping, with the remote frame's file and line in its printed traceback."""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import joblib
import pytest

import deathstar
from deathstar.client import Cluster
from deathstar.errors import RemoteError, RemoteTraceback
from tests.conftest import ROOT, Daemon

pytestmark = pytest.mark.timeout(90)

RAISER = '''
class Picky(Exception):
    def __init__(self, a, b):
        super().__init__(a)


def f(x):
    if x % 4 == 3:
        raise ValueError(f"bad input {x}")  # line 9
    if x == 100:
        raise Picky("cannot be rebuilt", 1)
    return x
'''
RAISE_LINE = 9


@pytest.fixture
def raiser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    (tmp_path / "raisermod.py").write_text(RAISER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "raisermod", raising=False)
    import raisermod

    return raisermod


def _check(exc: BaseException, raiser: Any, index: int, node: str, x: int | None = None
           ) -> None:
    """``exc`` is the ValueError raised remotely for input ``x`` (default: ``index``) and
    its printed traceback shows where."""
    assert type(exc) is ValueError and str(exc) == f"bad input {index if x is None else x}"
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert exc.index == index and exc.node == node and exc.worker  # type: ignore[attr-defined]
    text = "".join(traceback.format_exception(exc))
    assert f'File "{os.path.realpath(raiser.__file__)}", line {RAISE_LINE}, in f' in text
    assert 'raise ValueError(f"bad input {x}")' in text


def test_except_valueerror_catches_what_map_imap_and_as_completed_give(
        daemon: Daemon, raiser: Any) -> None:
    with pytest.raises(ValueError) as info:
        deathstar.map(raiser.f, range(8), cluster=[daemon.address])
    _check(info.value, raiser, 3, daemon.address)  # the first failure, by input order
    with Cluster([daemon.address]) as c:
        results = c.imap(raiser.f, range(8))
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError) as info:
            next(results)
        _check(info.value, raiser, 3, daemon.address)
        with pytest.raises(ValueError):
            list(c.imap_unordered(raiser.f, range(8)))
        got = dict(c.as_completed(raiser.f, range(8)))
        _check(got[7], raiser, 7, daemon.address)
        returned = c.map(raiser.f, range(8), on_error="return")
        assert returned.errors == [returned[3], returned[7]]
        _check(returned[3], raiser, 3, daemon.address)


def test_except_valueerror_catches_what_executor_and_joblib_give(daemon: Daemon,
                                                                  raiser: Any) -> None:
    with deathstar.Executor([daemon.address]) as ex:
        future = ex.submit(raiser.f, 3)
        with pytest.raises(ValueError):
            future.result(timeout=30)
        _check(future.exception(), raiser, 0, daemon.address, x=3)  # type: ignore[arg-type]
        done = list(cf.as_completed([ex.submit(raiser.f, i) for i in (1, 7)], timeout=30))
        assert sorted(type(f.exception()).__name__ for f in done) == ["NoneType",
                                                                       "ValueError"]
        with pytest.raises(ValueError):
            list(ex.map(raiser.f, range(8)))
    deathstar.register_joblib()
    with joblib.parallel_config(backend="deathstar", cluster=[daemon.address]):
        with pytest.raises(ValueError) as info:
            joblib.Parallel(n_jobs=2)(joblib.delayed(raiser.f)(i) for i in range(8))
    text = "".join(traceback.format_exception(info.value))
    assert f'line {RAISE_LINE}, in f' in text


def test_an_exception_that_cannot_be_rebuilt_is_a_remote_error(daemon: Daemon,
                                                               raiser: Any) -> None:
    res = deathstar.map(raiser.f, [100, 1], cluster=[daemon.address], on_error="return")
    error = res[0]
    assert isinstance(error, RemoteError) and res[1] == 1
    assert error.type_name == "raisermod.Picky" and "cannot be rebuilt" in error.message
    assert "raise Picky" in error.remote_traceback and error.node == daemon.address


def test_the_cli_error_record_keeps_type_message_traceback_node_worker(
        daemon: Daemon, raiser: Any, tmp_path: Path) -> None:
    (tmp_path / "args.jsonl").write_text("1\n3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "deathstar", "map", "raisermod:f", "--args", "args.jsonl",
         "--cluster", daemon.address, "--out", "out.jsonl", "--quiet"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    first, second = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text()
                     .splitlines()]
    assert first == {"index": 0, "result": 1}
    error = second["error"]
    assert error["type"] == "ValueError" and error["message"] == "bad input 3"
    assert f"line {RAISE_LINE}, in f" in error["traceback"]
    assert error["node"] == daemon.address and error["worker"]


# ---------------------------------------------------------------- modules as source

VERSIONED = '''
import threading
_LOCK = threading.Lock()
VERSION = {version!r}


def f(x):
    with _LOCK:
        return VERSION, x
'''


def test_a_module_edited_and_reloaded_between_two_maps_is_sent_again(
        daemons: Callable[..., Daemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    node = daemons(1)  # one worker: the same process runs both versions
    path = tmp_path / "editedmod.py"
    path.write_text(VERSIONED.format(version="one"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "editedmod", raising=False)
    import editedmod

    with Cluster([node.address]) as c:
        first = c.map(editedmod.f, range(4))
        path.write_text(VERSIONED.format(version="two, edited") + "\n# longer\n")
        importlib.reload(editedmod)
        second = c.map(editedmod.f, range(4))
        workers = {r.worker for r in first.report + second.report}
    assert [v for v, _ in first] == ["one"] * 4
    assert [v for v, _ in second] == ["two, edited"] * 4
    assert len(workers) == 1


CLIENT = '''
import sys
sys.path.insert(0, ".")
import deathstar, versionmod
res = deathstar.map(versionmod.f, range(300), cluster=[sys.argv[1]], chunksize=1)
print(sorted({{v for v, _ in res}}), sorted({{r.worker for r in res.report}}))
'''


def test_two_clients_with_two_versions_of_a_module_on_one_node_each_get_theirs(
        daemons: Callable[..., Daemon], tmp_path: Path) -> None:
    node = daemons(1)
    procs = []
    for version in ("alpha", "beta"):
        folder = tmp_path / version
        folder.mkdir()
        (folder / "versionmod.py").write_text(VERSIONED.format(version=version))
        procs.append(subprocess.Popen([sys.executable, "-c", CLIENT.format(), node.address],
                                      cwd=folder, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                          filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")]))}))
    outputs = [p.communicate(timeout=80) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    seen = [out.strip() for out, _ in outputs]
    worker = seen[0].split("] ")[1]
    assert seen == [f"['alpha'] {worker}", f"['beta'] {worker}"]  # one worker, two versions


NEEDS_A_PACKAGE = '''
import sys
_main = getattr(sys.modules.get("__main__"), "__spec__", None)
if getattr(_main, "name", "") == "deathstar.worker.__main__":  # in workers only: a
    import a_package_this_node_lacks  # noqa: F401            # package the nodes lack


def f(x):
    return x
'''


def test_a_function_the_nodes_cannot_load_fails_its_inputs_instead_of_hanging(
        daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its module imports a package the node lacks: every input fails with the import
    error the node raised (the blob is not sent again and again)."""
    (tmp_path / "needsapkg.py").write_text(NEEDS_A_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "needsapkg", raising=False)
    import needsapkg

    res = deathstar.map(needsapkg.f, range(6), cluster=[daemon.address], on_error="return")
    assert all(isinstance(v, ModuleNotFoundError) for v in res), res
    assert "a_package_this_node_lacks" in str(res[0])
    with pytest.raises(ModuleNotFoundError):
        deathstar.map(needsapkg.f, range(3), cluster=[daemon.address])
