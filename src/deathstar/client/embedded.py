"""The embedded local cluster: a real daemon process, started for one client and stopped
after it. It runs the same ``deathstar daemon`` a remote node runs, listening on ipc
sockets in a private folder (mode 0700) rather than TCP: no other user of the machine can
reach it, no keys are needed, and ipc is faster than loopback TCP."""

from __future__ import annotations

import json
import os
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
    """A ``deathstar daemon`` child on ipc sockets in a private folder, with ``workers``
    workers and any further daemon ``options``.

    The constructor blocks until the daemon has bound its ports (not until its workers
    are up: tasks queue there meanwhile). The daemon exits if this process dies.
    """

    def __init__(self, workers: int | None = None, options: Sequence[str] = ()):
        self.folder = tempfile.mkdtemp(prefix="deathstar-local-")  # 0700: ours alone
        cmd = [sys.executable, "-m", "deathstar", "daemon", "--ipc", self.folder,
               "--keys", "none", "--parent-pid", str(os.getpid()), "--ready-json",
               "--log-level", "warning"]
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
