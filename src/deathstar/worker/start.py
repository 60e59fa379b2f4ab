"""How a worker process starts: ``python -m deathstar.worker`` (what a daemon runs for
each of its workers) and ``deathstar worker`` (by hand) parse their arguments here, set up
logging and where the user's output goes, and run a ``Worker`` until it is told to stop."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

from deathstar import config
from deathstar.worker.process import Worker


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the parent check in the loop remains
        pass


def main(connect: str, parent_pid: int | None = None, *,
         heartbeat_s: float = config.HEARTBEAT_INTERVAL_S, max_tasks: int | None = None,
         max_memory: int | None = None,
         curve: tuple[bytes, bytes, bytes] | None = None,
         log_dir: str | None = None, slot: str | None = None,
         modules: str | None = None) -> int:
    """Entry point of a worker process (``deathstar worker`` and the daemon's children).
    ``connect``: the daemon's worker endpoint, or ``pipe:READ,WRITE`` (the inherited
    pipes of a worker its daemon started); ``curve``: (public, secret, daemon public)
    keys for an endpoint that needs them; ``slot``: the daemon's slot file for this
    worker; ``modules``: the folder for the user's modules shipped here (its daemon's,
    removed when this worker is reaped; else a folder of the temporary directory)."""
    logging.basicConfig(level=logging.DEBUG if config.DEBUG else logging.INFO,
                        format=f"%(asctime)s worker {os.getpid()} %(levelname)s %(message)s")
    if parent_pid is not None:
        set_parent_death_signal()
        # The user's prints must never mix into the daemon's (or embedded client's) stdout.
        os.dup2(2, 1)
    if log_dir is not None:
        # What tasks print (C code too) goes to this worker's own log file on its node.
        os.makedirs(log_dir, exist_ok=True)
        fd = os.open(os.path.join(log_dir, f"worker-{os.getpid()}.log"),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    return Worker(connect, parent_pid=parent_pid, heartbeat_s=heartbeat_s,
                  max_tasks=max_tasks, max_memory=max_memory, curve=curve, slot=slot,
                  modules=modules).run()


def cli_main() -> int:
    """``python -m deathstar.worker``: the daemon starts its own workers this way."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m deathstar.worker")
    parser.add_argument("--connect", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--heartbeat", type=float, default=config.HEARTBEAT_INTERVAL_S)
    parser.add_argument("--max-tasks", type=int, default=None)
    parser.add_argument("--max-memory", type=int, default=None)
    parser.add_argument("--log-dir", default=None)
    parser.add_argument("--slot", default=None)
    parser.add_argument("--modules", default=None)
    ns = parser.parse_args()
    return main(ns.connect, ns.parent_pid, heartbeat_s=ns.heartbeat, max_tasks=ns.max_tasks,
                max_memory=ns.max_memory, log_dir=ns.log_dir, slot=ns.slot,
                modules=ns.modules)
