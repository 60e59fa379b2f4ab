"""The daemon's local worker processes: start them, notice when one exits, replace it.
Each talks to the daemon over a pair of pipes it inherits (``pipelink``): no socket, no
key, nothing another process could connect to.

Each worker gets a folder of its own in the daemon's (``folders_in``), removed when it is
reaped, so that a worker killed at its timeout leaves nothing behind: its slot file and
the user's modules shipped to it. In its slot file it writes the id of each task message
as it starts it (a store into shared pages, no system call), so when it dies the daemon
knows which of the two messages it held it was running, even though the result it sent
for the first one died with it, unsent."""

from __future__ import annotations

import logging
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from deathstar.exitcodes import ExitCode
from deathstar.pipelink import DaemonPipe, make_pipe
from deathstar.slot import make_slot, read_slot

log = logging.getLogger("deathstar.daemon")

#: A worker that dies this soon after its start counts as a crash loop; its replacement
#: waits RESPAWN_BACKOFF_S (doubling, capped at RESPAWN_BACKOFF_MAX_S).
EARLY_DEATH_S = 2.0
RESPAWN_BACKOFF_S = 0.25
RESPAWN_BACKOFF_MAX_S = 10.0


def describe_exit(returncode: int) -> str:
    """'signal 9 (SIGKILL)' or 'exit code 1'."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown"
        return f"signal {-returncode} ({name})"
    return f"exit code {returncode}"


#: The slot file in each worker's folder.
SLOT_FILE = "slot"


@dataclass
class Exited:
    """A worker process that has exited, as the supervisor reports it: with the id of the
    task message it last started (``running``, from its slot file; None if unknown)."""

    pid: int
    returncode: int
    running: int | None = None

    @property
    def reason(self) -> str:
        return describe_exit(self.returncode)


@dataclass
class Supervisor:
    """Keeps ``count`` worker processes alive, each with its pipes in ``links``.

    ``poll`` reaps exited workers, starts replacements (with backoff on crash loops) and
    returns the exits so the broker can report their tasks lost. ``stop`` ends them all.
    """

    count: int
    max_tasks: int | None = None
    max_memory: int | None = None
    heartbeat_s: float | None = None
    log_dir: str | None = None  # each worker's output goes to worker-PID.log there
    folders_in: str | None = None  # where each worker's folder goes (see the docstring)
    procs: dict[int, tuple[subprocess.Popen[bytes], float]] = field(default_factory=dict)
    folders: dict[int, str] = field(default_factory=dict)  # pid -> its folder
    links: dict[bytes, DaemonPipe] = field(default_factory=dict)  # routing id -> pipes
    pidfds: dict[int, int] = field(default_factory=dict)  # pid -> a fd readable at its exit
    restarts: int = 0
    recycled: int = 0
    _backoff_s: float = RESPAWN_BACKOFF_S
    _next_spawn: float = 0.0
    _spawned: int = 0

    def start(self) -> None:
        while len(self.procs) < self.count:
            self._spawn()

    def _spawn(self) -> None:
        to_worker, from_worker = make_pipe(), make_pipe()
        ends = (to_worker[0], from_worker[1])  # the worker's: it reads one, writes the other
        cmd = [sys.executable, "-m", "deathstar.worker", "--connect", "pipe:%d,%d" % ends,
               "--parent-pid", str(os.getpid())]
        folder = slot = modules = None
        if self.folders_in is not None:
            self._spawned += 1
            folder = os.path.join(self.folders_in, f"worker-{self._spawned}")
            os.mkdir(folder, 0o700)
            slot, modules = os.path.join(folder, SLOT_FILE), os.path.join(folder, "modules")
            make_slot(slot)
        for flag, value in (("--max-tasks", self.max_tasks), ("--max-memory", self.max_memory),
                            ("--heartbeat", self.heartbeat_s), ("--log-dir", self.log_dir),
                            ("--slot", slot), ("--modules", modules)):
            if value is not None:
                cmd += [flag, str(value)]
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, close_fds=True,
                                    pass_fds=ends)
        except BaseException:
            os.close(to_worker[1])
            os.close(from_worker[0])
            raise
        finally:
            for fd in ends:
                with contextlib.suppress(OSError):
                    os.close(fd)
        link = DaemonPipe(from_worker[0], to_worker[1], proc.pid)
        self.links[link.ident] = link
        self.procs[proc.pid] = (proc, time.monotonic())
        with contextlib.suppress(AttributeError, OSError):  # Linux >= 5.3; else polled
            self.pidfds[proc.pid] = os.pidfd_open(proc.pid)
        if folder is not None:
            self.folders[proc.pid] = folder

    def poll(self, now: float) -> list[Exited]:
        """Reap exited workers and start replacements; returns what exited."""
        exited = []
        for pid, (proc, started) in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.procs[pid]
            with contextlib.suppress(KeyError, OSError):
                os.close(self.pidfds.pop(pid))
            folder = self.folders.pop(pid, None)
            running = None
            if folder is not None:
                running = read_slot(os.path.join(folder, SLOT_FILE))
                shutil.rmtree(folder, ignore_errors=True)
            if code == ExitCode.WORKER_RECYCLED:
                self.recycled += 1
                log.info("worker %d reached its task or memory limit; replacing it", pid)
                continue
            self.restarts += 1
            exited.append(Exited(pid, code, running))
            if now - started < EARLY_DEATH_S:
                self._next_spawn = now + self._backoff_s
                self._backoff_s = min(self._backoff_s * 2, RESPAWN_BACKOFF_MAX_S)
            else:
                self._backoff_s = RESPAWN_BACKOFF_S
        for ex in exited:
            log.warning("worker %d exited with %s; starting a replacement", ex.pid, ex.reason)
        if len(self.procs) < self.count and now >= self._next_spawn:
            for _ in range(self.count - len(self.procs)):
                self._spawn()
        return exited

    def exit_fds(self) -> set[int] | None:
        """File descriptors that become readable when a worker exits (poll them, and call
        ``poll`` when one is); None when some worker has none, so ``poll`` must run on a
        timer instead."""
        if len(self.pidfds) < len(self.procs):
            return None
        return set(self.pidfds.values())

    def next_spawn(self) -> float | None:
        """When ``poll`` must run to start missing workers (None: none are missing)."""
        return self._next_spawn if len(self.procs) < self.count else None

    def take_reaped_links(self) -> list[DaemonPipe]:
        """The pipes of workers ``poll`` reaped: the caller reads what they left, then
        closes them."""
        gone = [ident for ident, link in self.links.items() if link.pid not in self.procs]
        return [self.links.pop(ident) for ident in gone]

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is one of our worker processes (not a hand-started one)."""
        return pid in self.procs

    def kill(self, pid: int) -> None:
        """Kill one worker now (a hung task); ``poll`` then replaces it."""
        entry = self.procs.get(pid)
        if entry is not None and entry[0].poll() is None:
            entry[0].kill()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate every worker, killing those still alive after ``timeout_s``."""
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc, _ in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        for link in self.links.values():
            link.close()
        self.links.clear()
        for fd in self.pidfds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pidfds.clear()
