"""The embedded local cluster: the same daemon a node runs, hosted in the client's own
process. Its loop runs in a thread (``reactor.Reactor``) that also runs the engine of
every client of this process that uses it (``hosting``), so client and daemon hand each
other messages in memory (``daemon.sessions.hosted``): no socket, no other thread woken. Its
workers are child processes of this one. Other processes of this user (``deathstar
status``) reach it over ipc sockets in a private folder (mode 0700): no other user of the
machine can reach it, and no keys are needed. Everything the daemon promises holds
here as on a node: it is the same loop (crash attribution, timeouts that kill,
heartbeats, recycling, cancellation).

Calls that name no cluster (``deathstar.map``, ``Executor()``, a joblib ``Parallel``)
share one embedded daemon per process instead (``acquire_shared``), as loky reuses its
executor: its workers stay warm, with what they imported, from one call to the next. It
stops ``SHARED_IDLE_S`` after its last user let go, at interpreter exit, and is replaced
when it died (or when this process is a fork of the one that started it)."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import threading
from typing import TYPE_CHECKING, Any

from deathstar import config, scratch
from deathstar.nodes import NodeAddress

if TYPE_CHECKING:
    from deathstar.daemon.loop import Daemon


class LocalDaemonError(RuntimeError):
    """The embedded daemon did not start; the message says why."""


class LocalDaemon:
    """A daemon hosted in this process, with ``workers`` workers (default one per core)
    and any further ``Daemon`` ``options`` (``max_tasks_per_worker``...).

    The constructor returns once the daemon has bound its sockets (not once its workers
    are up: tasks queue there meanwhile). Raises LocalDaemonError when it cannot."""

    def __init__(self, workers: int | None = None, **options: Any):
        from deathstar.daemon.loop import Daemon  # the daemon's modules, on first use

        daemon_log = logging.getLogger("deathstar.daemon")
        if daemon_log.level == logging.NOTSET and not config.DEBUG:
            daemon_log.setLevel(logging.WARNING)  # its start and stop are no news here

        self.folder = scratch.make_folder("deathstar-local-")  # 0700: ours alone
        # its name in this process (``hosting``); no socket is bound there
        self.name = os.path.basename(self.folder)
        try:
            self.daemon = Daemon(workers=workers, ipc=self.folder,
                                 log_dir=str(config.log_dir()), **options)
            self.daemon.bind()
        except Exception as exc:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise LocalDaemonError(f"the embedded daemon did not start: {exc}") from exc
        self.address = NodeAddress("local", "localhost", 0, ipc=self.folder,
                                   hosted=self.name)
        self.pid = os.getpid()
        #: The loop the daemon runs in; a client's engine joins it (``Engine(reactor=)``).
        self.reactor = self.daemon.reactor
        self.reactor.add(self.daemon)
        with _hosted_lock:
            _hosted[self.name] = self

    def alive(self) -> bool:
        """Its loop runs (in this process: a fork has none)."""
        return self.pid == os.getpid() and not self.daemon.ended.is_set()

    def hosts(self) -> dict[str, Daemon]:
        """For an engine in ``reactor``: this daemon by its endpoint, reached in memory."""
        return {self.name: self.daemon}

    def wait_stopped(self, timeout_s: float | None = None) -> bool:
        """Block until the daemon has stopped and closed (at most ``timeout_s``)."""
        return self.daemon.ended.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the daemon: running tasks may finish for ``timeout_s``, then its workers
        are ended. Blocks until it has stopped."""
        if self.pid != os.getpid():
            return  # a fork: the daemon lives in the parent
        if self.reactor.owns_thread():
            raise RuntimeError("the embedded daemon cannot be stopped from its own loop")
        with _hosted_lock:
            _hosted.pop(self.name, None)
        self.daemon.request_stop(timeout_s)
        self.daemon.ended.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


_hosted: dict[str, LocalDaemon] = {}  # this process's embedded daemons, by their name
_hosted_lock = threading.Lock()


def hosting(addresses: list[NodeAddress]) -> LocalDaemon | None:
    """The embedded daemon of this process one of ``addresses`` names, if one is alive:
    a client of it runs its engine in its loop."""
    with _hosted_lock:
        for address in addresses:
            local = _hosted.get(address.hosted or "")
            if local is not None and local.alive():
                return local
    return None


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
            if daemon is None or not daemon.alive() or self.pid != os.getpid():
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
