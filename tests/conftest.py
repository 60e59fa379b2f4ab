"""Fixtures that run real daemons: each is a ``deathstar daemon`` subprocess on loopback
with free ports, waited on until its status port answers, and always reaped."""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Hermetic: no key folder or cluster of the developer's leaks into the tests (subprocesses
# inherit this). Tests that use keys name their folder explicitly.
os.environ["DEATHSTAR_KEYS"] = "none"
os.environ.pop("DEATHSTAR_CLUSTER", None)
# The worker logs go in a folder of the run, removed at its end; a process the run spawns
# (a ProcessPoolExecutor's worker imports this module too) keeps the run's.
_STATE = os.environ.get("XDG_STATE_HOME", "")
if not os.path.basename(_STATE).startswith("deathstar-test-state-"):
    os.environ["XDG_STATE_HOME"] = _STATE = tempfile.mkdtemp(prefix="deathstar-test-state-")
    atexit.register(shutil.rmtree, _STATE, ignore_errors=True)
#: Fast heartbeats so liveness tests finish quickly.
FAST_HEARTBEAT = "0.2"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int
    host: str = "127.0.0.1"
    keys: str = "none"  # the key folder a client needs to talk to it

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def status(self) -> dict[str, Any]:
        from deathstar.client import query_status

        return query_status([self.address], timeout=2.0, keys=self.keys)[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def default_sigint() -> None:
    """A ``preexec_fn`` for a child the test interrupts with SIGINT: a shell without job
    control starts background jobs (a CI run, say) with SIGINT ignored, and a child
    inherits that; a terminal gives the default disposition, so the test does too."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def daemon_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "deathstar", "daemon", *args]


def start_daemon(workers: int = 2, *extra: str, host: str = "127.0.0.1",
                 port: int = 0, wrap: list[str] | None = None,
                 env: dict[str, str] | None = None, keys: str = "none",
                 stderr: int | None = None, wait_workers: bool = True) -> Daemon:
    """Start a daemon, wait until its status port reports its workers, and return it.
    ``keys``: its key folder, or "none"."""
    if keys == "none" and "--insecure" not in extra:
        extra = ("--insecure", *extra)  # plaintext TCP is never the default
    cmd = daemon_command("--host", host, "--port", str(port), "--workers", str(workers),
                         "--ready-json", "--heartbeat", FAST_HEARTBEAT, "--keys", keys, *extra)
    proc = subprocess.Popen((wrap or []) + cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True, stderr=stderr)
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + 20
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([proc.stdout], [], [], remaining)[0]:
            kill_tree(proc)
            raise AssertionError("daemon did not report its ports in time")
        chunk = os.read(proc.stdout.fileno(), 1024)
        if not chunk:
            raise AssertionError(f"daemon exited with {proc.wait()} before it was ready")
        line += chunk
    daemon = Daemon(proc, int(json.loads(line)["exec"]), host, keys)
    try:
        if wait_workers:
            wait_for(lambda: daemon.status().get("workers") == workers, 20,
                     f"the status port to report {workers} worker(s)")
    except BaseException:
        kill_tree(proc)  # never leave a half-started daemon behind
        raise
    return daemon


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    """Factory fixture: ``daemons(workers=2)`` starts a daemon; all are reaped after."""
    started: list[Daemon] = []

    def factory(workers: int = 2, *extra: str, **kw: Any) -> Daemon:
        d = start_daemon(workers, *extra, **kw)
        started.append(d)
        return d

    yield factory
    for d in started:
        d.stop()
        try:
            os.killpg(d.proc.pid, signal.SIGKILL)  # anything it left behind
        except ProcessLookupError:
            pass


@pytest.fixture
def daemon(daemons: Callable[..., Daemon]) -> Daemon:
    """One running daemon with two workers."""
    return daemons(2)


def descendants(pid: int) -> list[int]:
    """Live descendant pids of ``pid`` (via /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def free_ports(count: int = 3) -> int:
    """A port P with P .. P+count-1 free on loopback now (for restarting a daemon on the
    same port)."""
    import random
    import socket

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


def worker_pids(daemon: Daemon) -> list[int]:
    """The daemon's local worker processes."""
    return descendants(daemon.proc.pid)


def kill_tree(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to a process's whole group (it was started with a new session)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def sdist_only_package(links: Path) -> str:
    """Make ``links`` (a folder for pip's --find-links) hold a package that has only a
    source distribution, no wheel; returns its name."""
    import io
    import tarfile

    links.mkdir(exist_ok=True)
    name = "deathstar-test-sdist-only"
    member = tarfile.TarInfo(f"{name.replace('-', '_')}-1.0/PKG-INFO")
    info = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode()
    member.size = len(info)
    with tarfile.open(links / f"{name.replace('-', '_')}-1.0.tar.gz", "w:gz") as tar:
        tar.addfile(member, io.BytesIO(info))
    return name
