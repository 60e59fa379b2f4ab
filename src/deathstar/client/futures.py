"""The executor's calls and their futures: ``Call``, one submitted call waiting in the
executor's queue; ``CallFuture``, a Future that the client's I/O thread may resolve
itself as long as no done-callback was added to it (a callback then runs in the
executor's own thread, never in the I/O thread); ``settle``; ``Feed``, the job that runs
consecutive calls of one function."""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from deathstar.client.job import FINISHED, Job


class CallFuture(cf.Future[Any]):
    """A ``concurrent.futures.Future`` that knows whether a done-callback was added, and
    whether a thread is blocked in ``result`` or ``exception``."""

    def __init__(self) -> None:
        super().__init__()
        self._hook_lock = threading.Lock()
        self._hooked = False
        self._blocked = 0  # threads waiting in result() or exception()

    def result(self, timeout: float | None = None) -> Any:
        return self._wait(super().result, timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        exc: BaseException | None = self._wait(super().exception, timeout)
        return exc

    def _wait(self, method: Callable[[float | None], Any], timeout: float | None) -> Any:
        """``method(timeout)``, counted in ``awaited`` while it may block."""
        if self.done():
            return method(timeout)
        with self._hook_lock:
            self._blocked += 1
        try:
            return method(timeout)
        finally:
            with self._hook_lock:
                self._blocked -= 1

    @property
    def awaited(self) -> bool:
        """Whether a thread is blocked on its outcome (a hint: it may change at once)."""
        return self._blocked > 0

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


class FeedOwner(Protocol):
    """What a feed asks of its executor (``executor.Executor``)."""

    _inbox: queue.SimpleQueue[tuple[Feed | None, Any]]

    def _take(self, feed: Feed) -> tuple[int, tuple[Any, ...], dict[str, Any] | None]: ...

    def _close_idle(self, feed: Feed) -> bool: ...

    def _resolve_here(self, feed: Feed, outcomes: list[Any]) -> Settle | None: ...

    def _end_quietly(self, feed: Feed) -> bool: ...

    def _handle(self, feed: Feed, item: Any) -> None: ...


class Feed:
    """A job that runs consecutive calls of one function: its input iterator (read by the
    I/O thread when a node has room; a ``job.Resumable``: it ends at the first call of
    another function, or once idle ``config.FEED_IDLE_S``, and stays open while the queue
    is empty meanwhile) and its ``out`` (resolves outcomes, or passes them on to the
    executor's thread)."""

    def __init__(self, executor: FeedOwner, fn_hash: str):
        self.executor = executor
        self.fn_hash = fn_hash
        self.futures: dict[int, CallFuture] = {}  # taken and not yet resolved
        self.closed = False  # it takes no more calls (its job ends once they are answered)
        self.starved = False  # it found the queue empty: a call for it must wake the loop
        self.cancelled = False
        self.job: Job | None = None

    def __iter__(self) -> Feed:
        return self

    def __next__(self) -> tuple[int, tuple[Any, ...], dict[str, Any] | None]:
        return self.executor._take(self)

    def dry(self) -> bool:
        return self.starved and not self.closed

    def ended(self) -> bool:
        return self.closed

    def close_idle(self) -> bool:
        return self.executor._close_idle(self)

    def put(self, item: Any) -> None:
        """What the feed's job delivers (I/O thread): outcomes are resolved here, one
        thread hop sooner, unless a future has done-callbacks (those run in the
        executor's thread), and so is the end of a job that answered every call (no
        future to settle, no thread to wake); the rest goes to the executor's thread."""
        if isinstance(item, list):
            item = self.executor._resolve_here(self, item)
            if item is None:
                return
        elif item is FINISHED and self.executor._end_quietly(self):
            return
        self.executor._inbox.put((self, item))
