"""Executors at interpreter exit, as the stdlib's: an exit hook (run by ``threading``
before the interpreter joins its threads, as ``concurrent.futures`` registers its own)
waits for every live executor's outstanding calls, and from then on creating an executor
or submitting to one raises RuntimeError. A dropped executor releases its thread and its
Cluster through ``released_by`` (a ``weakref.finalize`` callback)."""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Any, Protocol

from deathstar.reactor import on_loop_thread


class _Waitable(Protocol):
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None: ...


class _Closable(Protocol):
    def close(self) -> None: ...


_live: weakref.WeakSet[Any] = weakref.WeakSet()
_exiting = False


def register(executor: _Waitable) -> None:
    """Have ``executor`` waited for at interpreter exit."""
    _live.add(executor)


def check_not_exiting() -> None:
    """RuntimeError once the interpreter is exiting."""
    if _exiting:
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")


def _at_exit() -> None:
    global _exiting
    _exiting = True
    for executor in list(_live):
        executor.shutdown(wait=True)


def released_by(inbox: queue.SimpleQueue[Any], cluster: _Closable | None) -> None:
    """An executor was garbage-collected without ``shutdown``: end its thread (a
    ``(None, None)`` item) and close the Cluster it opened (from another thread when
    called in the Cluster's own I/O thread, which cannot wait for itself)."""
    inbox.put((None, None))
    if cluster is None:
        return
    if on_loop_thread():
        threading.Thread(target=cluster.close, daemon=True).start()
    else:
        cluster.close()


getattr(threading, "_register_atexit")(_at_exit)
