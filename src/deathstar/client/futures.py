"""The executor's calls and their futures: ``Call``, one submitted call waiting in the
executor's queue; ``CallFuture``, a Future that the client's I/O thread may resolve
itself as long as no done-callback was added to it (a callback then runs in the
executor's own thread, never in the I/O thread); ``settle``."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from dataclasses import dataclass
from typing import Any, Callable


class CallFuture(cf.Future[Any]):
    """A ``concurrent.futures.Future`` that knows whether a done-callback was added."""

    def __init__(self) -> None:
        super().__init__()
        self._hook_lock = threading.Lock()
        self._hooked = False

    def add_done_callback(self, fn: Callable[[cf.Future[Any]], object]) -> None:
        with self._hook_lock:
            self._hooked = True
        super().add_done_callback(fn)

    def settle_unless_hooked(self, ok: bool, value: Any) -> bool:
        """Resolve it in the calling thread (``settle``) unless it has a done-callback:
        True when resolved here. A callback added meanwhile waits for the resolution,
        then runs at once in the thread that adds it, as on any resolved Future."""
        with self._hook_lock:
            if self._hooked:
                return False
            settle(self, ok, value)
            return True


@dataclass(eq=False)
class Call:
    """A submitted call waiting in the executor's queue."""

    future: CallFuture
    index: int  # the executor's submission number: the input index of its record
    fn_hash: str
    blob: list[Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] | None


@dataclass(eq=False)
class Settle:
    """Calls whose futures have done-callbacks, to resolve in the executor's thread:
    (future, ok, result or exception)."""

    calls: list[tuple[CallFuture, bool, Any]]


def settle(future: cf.Future[Any], ok: bool, value: Any) -> None:
    """Resolve ``future`` with the result ``value`` (``ok``) or the exception ``value``;
    nothing when it was resolved already (by hand, or cancelled)."""
    try:
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    except cf.InvalidStateError:
        pass
