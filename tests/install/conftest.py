"""Fixtures for testing what users install: the wheel built from this checkout, and a
fresh venv per Python the package claims, holding that wheel installed with no extras from
the package sources pip is configured with (as ``make`` installs).

Each venv is made once per session and per Python; every test of that Python shares it."""

from __future__ import annotations

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The Pythons the installed artifact is tried under (each one the package's
#: requires-python admits and the machine has; a missing one is skipped by name).
PYTHONS = ("3.10", "3.11", "3.12", "3.13")

#: Where side-by-side Pythons live on this machine (pyenv).
PYENV_GLOB = "/root/.pyenv/versions/{minor}*/bin/python"

#: Seconds a pip install of the wheel and its dependencies may take (cold cache, index).
INSTALL_TIMEOUT_S = 240


def source_version() -> str:
    """The version in the checkout's _version.py, read as text (not imported)."""
    text = (ROOT / "src" / "deathstar" / "_version.py").read_text()
    match = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    assert match, "no __version__ in _version.py"
    return match.group(1)


def requires_python() -> str:
    """The [project] requires-python of pyproject.toml."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return str(tomllib.load(fh)["project"]["requires-python"])


def find_python(minor: str) -> str | None:
    """The interpreter for ``minor`` (e.g. "3.12") on this machine, else None."""
    for path in sorted(glob.glob(PYENV_GLOB.format(minor=minor))):
        if re.search(rf"/{re.escape(minor)}(\.\d+)?[^/]*/bin/python$", path) \
                and os.access(path, os.X_OK):
            return path
    return None


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def free_port_run(count: int = 3) -> int:
    """A port P with P .. P+count-1 free on loopback now (exec, status, worker ports)."""
    import random

    for _ in range(200):
        base = random.randint(20000, 60000)
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no free consecutive ports")


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM a process started with a new session, then SIGKILL its whole group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # it and anything it left behind
    except ProcessLookupError:
        pass
    proc.wait()


@dataclass(frozen=True)
class Venv:
    """A fresh venv with the built wheel installed (no extras)."""

    minor: str
    path: Path
    work: Path  # a scratch folder of this venv's tests (cwd of the commands)

    @property
    def python(self) -> str:
        return str(self.path / "bin" / "python")

    @property
    def deathstar(self) -> str:
        return str(self.path / "bin" / "deathstar")

    def env(self) -> dict[str, str]:
        """The environment of commands in this venv: its bin first on PATH, nothing of the
        test venv or the checkout on the import path, no keys, a private state folder."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")}
        env["PATH"] = f"{self.path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.path)
        env["DEATHSTAR_KEYS"] = "none"
        env.pop("DEATHSTAR_CLUSTER", None)
        env["XDG_STATE_HOME"] = str(self.work / "state")
        env["XDG_CONFIG_HOME"] = str(self.work / "config")
        return env

    def run(self, *cmd: str, timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in this venv's environment from its scratch folder."""
        proc = subprocess.run(cmd, cwd=self.work, env=self.env(), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                                 f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, built once per session with the test venv's pip."""
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                           "--wheel-dir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="session", params=PYTHONS, ids=lambda m: f"py{m}")
def venv(request: pytest.FixtureRequest, wheel: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    """A fresh venv of one Python with the wheel installed, no extras."""
    from packaging.specifiers import SpecifierSet

    minor: str = request.param
    if minor not in SpecifierSet(requires_python()):
        pytest.skip(f"Python {minor} is outside requires-python {requires_python()}")
    interpreter = find_python(minor)
    if interpreter is None:
        pytest.skip(f"Python {minor} is not installed here ({PYENV_GLOB.format(minor=minor)})")
    base = tmp_path_factory.mktemp(f"py{minor}-")
    work = base / "work"
    work.mkdir()
    env = Venv(minor, base / "venv", work)
    subprocess.run([interpreter, "-m", "venv", str(env.path)], check=True,
                   capture_output=True, timeout=INSTALL_TIMEOUT_S)
    env.run(env.python, "-m", "pip", "install", "--quiet", str(wheel),
            timeout=INSTALL_TIMEOUT_S)
    yield env
