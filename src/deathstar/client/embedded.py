"""The embedded local cluster: a real daemon process, started for one client and stopped
after it. It runs the same daemon a remote node runs (through its light entry,
``python -m deathstar.daemon``, which skips the CLI's imports), listening on ipc
sockets in a private folder (mode 0700) rather than TCP: no other user of the machine can
reach it, no keys are needed, and ipc is faster than loopback TCP.

Calls that name no cluster (``deathstar.map``, ``Executor()``, a joblib ``Parallel``)
share one embedded daemon per process instead (``acquire_shared``), as loky reuses its
executor: its workers stay warm, with what they imported, from one call to the next. It
stops ``SHARED_IDLE_S`` after its last user let go, at interpreter exit, and is replaced
when it died (or when this process is a fork of the one that started it)."""

from __future__ import annotations

import atexit
import json
import os
import threading
import select
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from deathstar import config
from deathstar.nodes import NodeAddress


class LocalDaemonError(RuntimeError):
    """The embedded daemon did not start; the message carries what it printed."""


class LocalDaemon:
    """A daemon child (``python -m deathstar.daemon``) on ipc sockets in a private folder,
    with ``workers`` workers and any further options of that entry.

    The constructor blocks until the daemon has bound its ports (not until its workers
    are up: tasks queue there meanwhile). The daemon exits if this process dies.
    """

    def __init__(self, workers: int | None = None, options: Sequence[str] = ()):
        self.folder = tempfile.mkdtemp(prefix="deathstar-local-")  # 0700: ours alone
        cmd = [sys.executable, "-m", "deathstar.daemon", "--ipc", self.folder,
               "--parent-pid", str(os.getpid()), "--log-level", "warning"]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        cmd += options
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     close_fds=True)
        assert self.proc.stdout is not None
        line = self._read_line(config.EMBEDDED_START_TIMEOUT_S)
        try:
            if json.loads(line)["ipc"] != self.folder:
                raise ValueError("the daemon is not on our folder")
            self.address = NodeAddress("local", "localhost", 0, ipc=self.folder)
        except (ValueError, KeyError, TypeError):
            self.stop()
            raise LocalDaemonError(
                f"the embedded daemon did not start (exit {self.proc.returncode}); "
                f"it printed {line!r}") from None

    def _read_line(self, timeout_s: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        data = b""
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace").strip()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the daemon (it drains, then ends its workers); kill it if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)


#: Seconds the shared embedded daemon outlives its last user.
SHARED_IDLE_S = config._env_float("EMBEDDED_IDLE", 300.0)


class _Shared:
    """The process's shared embedded daemon and its users (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.daemon: LocalDaemon | None = None
        self.pid = 0  # the process that started it
        self.users = 0
        self.timer: threading.Timer | None = None
        atexit.register(self.stop)

    def acquire(self) -> LocalDaemon:
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            daemon = self.daemon
            if daemon is None or daemon.proc.poll() is not None or self.pid != os.getpid():
                if daemon is not None and self.pid == os.getpid():
                    daemon.stop()
                self.daemon = daemon = LocalDaemon(None)
                self.pid, self.users = os.getpid(), 0
            self.users += 1
            return daemon

    def release(self, daemon: LocalDaemon) -> None:
        with self.lock:
            if daemon is not self.daemon:
                return  # replaced meanwhile; the old one was stopped then
            self.users -= 1
            if self.users == 0:
                self.timer = threading.Timer(SHARED_IDLE_S, self.stop_if_unused)
                self.timer.daemon = True
                self.timer.start()

    def stop_if_unused(self) -> None:
        with self.lock:
            if self.users == 0:
                self._stop_locked()

    def stop(self) -> None:
        with self.lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.daemon is not None and self.pid == os.getpid():
            self.daemon.stop()
        self.daemon = None


_shared = _Shared()


def acquire_shared() -> LocalDaemon:
    """The process's shared embedded daemon (one worker per core), started or replaced as
    needed; blocks while it starts. Pair each call with ``release_shared``."""
    return _shared.acquire()


def release_shared(daemon: LocalDaemon) -> None:
    """One user of the shared daemon let go; the last one starts its idle timer."""
    _shared.release(daemon)
