"""``concurrent.futures`` on a deathstar cluster: ``Executor`` (and ``Cluster.executor``).

How a submitted call travels:

* ``submit`` pickles the function (content-hashed, as a map's is), checks that the
  arguments pickle, and queues the call in the executor as a pending Future.
* Consecutive calls of one function share one job, a *feed*: the job's input iterator
  takes calls from the head of the executor's queue, and the client's I/O thread reads it
  only when a node has room (so the engine batches tiny calls and ships the function to
  each node once). A call it has taken is running (it is about to be sent); one still in
  the queue can be cancelled. Calls start in submission order: when the head of the queue
  is another function, the feed ends and a feed for that function starts. A feed that
  finds the queue empty stays open (*starved*: the next call of its function wakes the
  I/O thread, and rides in it) until it has been idle ``config.FEED_IDLE_S``: one call at
  a time then costs no job to start and none to end.
* Outcomes come back through the job's ``out`` sink. The I/O thread resolves a future
  that has no done-callback at once (``futures.CallFuture``); the others go to the
  executor's own thread, which resolves them and runs their callbacks (never the I/O
  thread, so a slow callback cannot starve the heartbeats).

``map`` is one lazy job of its own, read as the nodes have room, delivered in input order.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import queue
import threading
import time
import uuid
import weakref
from collections import deque
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Sequence

from deathstar import serialize
from deathstar.client.blobs import FunctionBlobs
from deathstar.client.cluster import Cluster, MapOptions
from deathstar.client.engine import NoNodesError
from deathstar.client.futures import Call, CallFuture, Feed, Settle, settle
from deathstar.client.exits import check_not_exiting, register, released_by
from deathstar.client.job import FINISHED, Job
from deathstar.client.outcomes import Outcome, as_outcomes, drain, ordered

__all__ = ["Executor", "LIVENESS_CHECK_S"]

log = logging.getLogger("deathstar.client.executor")

#: Seconds between checks, while the executor waits for outcomes, that its Cluster is
#: still open: a Cluster closed under a busy executor fails the executor's futures.
LIVENESS_CHECK_S = 1.0

_CANCELLED = "cancelled by shutdown(cancel_futures=True)"


class Executor(cf.Executor):
    """A ``concurrent.futures.Executor`` whose calls run on a deathstar cluster.

    ``cluster``: a ``Cluster`` (used, never closed), or what ``Cluster`` takes (node names,
    ``"a,b:7000"``; None for ``DEATHSTAR_CLUSTER`` or else an embedded local daemon), which
    is then connected here and closed when the executor is shut down. Shutting down never
    stops the daemons. ``options``: ``Cluster.map``'s options (chunksize, timeout,
    timeout_retries, max_attempts, seed, capture_output) for every call; an unknown one
    raises TypeError, a bad value ValueError.

    ``max_workers``: the workers of the embedded local daemon (default one per core);
    it must be more than 0, and only an embedded daemon takes it. ``initializer``:
    called with ``initargs`` in each worker process before its first call of this
    executor (again before the next call if it raised, which fails that call).

    A call whose function raised resolves its future with that very exception (unpickled
    here, the remote traceback as its ``__cause__``, ``index``/``node``/``worker`` set on
    it; ``RemoteError`` when it cannot be rebuilt here); a worker that died on every
    attempt gives ``WorkerCrashed`` (a ``BrokenProcessPool``; the other calls go on), a
    call past ``timeout`` ``TaskTimeout``; an argument that cannot be pickled
    ``SerializationError`` (a ``pickle.PicklingError``). Done-callbacks run in the
    executor's own thread. At interpreter exit, calls submitted and not finished are
    waited for; submitting then raises RuntimeError. An executor dropped without
    ``shutdown`` is shut down (without waiting) when it is garbage-collected.
    Thread-safe.
    """

    def __init__(self, cluster: Cluster | str | Sequence[str] | None = None, *,
                 max_workers: int | None = None,
                 initializer: Callable[..., Any] | None = None,
                 initargs: tuple[Any, ...] = (), **options: Any):
        self._options = MapOptions(**options)
        if max_workers is not None:
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
            if cluster is not None:
                raise ValueError("max_workers sets the workers of the embedded local "
                                 "daemon; a named cluster has the workers its nodes have")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._init = None if initializer is None else (uuid.uuid4().hex, initializer,
                                                       tuple(initargs))
        check_not_exiting()
        self._owns = not isinstance(cluster, Cluster)
        self._cluster = cluster if isinstance(cluster, Cluster) else Cluster(
            cluster, workers=max_workers, shared=True)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when no future is left
        self._pending: deque[Call] = deque()
        self._feed: Feed | None = None  # the feed taking calls from the queue's head
        self._feeds: set[Feed] = set()  # feeds whose job is with the I/O thread
        self._unfinished: set[cf.Future[Any]] = set()
        self._maps: set[Job] = set()
        self._indices = itertools.count()
        self._blobs = FunctionBlobs(self._init)
        self._inbox: queue.SimpleQueue[tuple[Feed | None, Any]] = queue.SimpleQueue()
        self._shutdown = False
        self._released = False
        self._thread = threading.Thread(target=_serve, args=(weakref.ref(self), self._inbox),
                                        daemon=True, name="deathstar-executor")
        self._thread.start()
        register(self)
        self._finalizer = weakref.finalize(self, released_by, self._inbox,
                                           self._cluster if self._owns else None)

    @property
    def cluster(self) -> Cluster:
        """The Cluster the calls run on."""
        return self._cluster

    # ------------------------------------------------------------------ submit

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """Schedule ``fn(*args, **kwargs)`` and return its Future at once (never blocks on
        the cluster). Calls start in submission order as the nodes have room; a call not
        yet started can be cancelled. Raises RuntimeError after ``shutdown`` or when the
        Cluster is closed, TypeError when ``fn`` is not callable; a function or argument
        that cannot be pickled fails the Future with ``SerializationError``."""
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        self._check_accepting()
        future = CallFuture()
        try:
            fn_hash, blob = self._blobs.blob(fn, args, kwargs)
        except serialize.SerializationError as exc:
            future.set_exception(exc)
            return future
        with self._lock:
            self._check_accepting(locked=True)
            self._pending.append(Call(future, next(self._indices), fn_hash, blob, args,
                                       kwargs or None))
            self._unfinished.add(future)
            feed, wake = self._feed, False
            if feed is not None and feed.starved:  # the loop waits for a call: wake it
                feed.starved, wake = False, True
                if feed.fn_hash != fn_hash:  # it would end at this call: it ends now
                    self._end_feed_locked(feed)
            if self._feed is None:
                self._start_feed_locked()
        if wake:
            self._cluster.engine.wake()
        return future

    def _check_accepting(self, locked: bool = False) -> None:
        if not locked:
            with self._lock:
                return self._check_accepting(locked=True)
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        check_not_exiting()
        self._cluster.check_open()

    def _start_feed_locked(self) -> None:
        """Start a job for the calls at the head of the queue (lock held)."""
        head = self._pending[0]
        feed = Feed(self, head.fn_hash)
        feed.job = self._cluster.job_from_blob(head.fn_hash, head.blob, feed, self._options,
                                               out=feed)
        feed.job.resumable = feed
        self._feed = feed
        self._feeds.add(feed)
        self._cluster.engine.submit(feed.job)

    def _take(self, feed: Feed) -> tuple[int, tuple[Any, ...], dict[str, Any] | None]:
        """The next call for ``feed`` (called in the I/O thread when a node has room): it
        becomes running. Cancelled calls are skipped (their waiters notified)."""
        with self._lock:
            while not feed.closed and self._pending \
                    and self._pending[0].fn_hash == feed.fn_hash:
                call = self._pending.popleft()
                if call.future.set_running_or_notify_cancel():
                    feed.futures[call.index] = call.future
                    return call.index, call.args, call.kwargs
                self._settle_locked([call.future])
            if not feed.closed and not self._pending:
                feed.starved = True  # dry for now: the next submit wakes the loop
                raise StopIteration
            self._end_feed_locked(feed)
        raise StopIteration

    def _close_idle(self, feed: Feed) -> bool:
        """End an idle feed (I/O thread) unless a call for it waits in the queue; True
        when it has ended."""
        with self._lock:
            if not feed.closed and self._pending and \
                    self._pending[0].fn_hash == feed.fn_hash:
                return False
            self._end_feed_locked(feed)
        return True

    def _end_feed_locked(self, feed: Feed) -> None:
        """``feed`` takes no more calls; a feed for the queue's head starts (lock held)."""
        feed.closed = True
        if self._feed is feed:
            self._feed = None
            if self._pending:
                self._start_feed_locked()

    # ------------------------------------------------------------------ outcomes

    def _handle(self, feed: Feed, item: Any) -> None:
        """One item from a feed's job, in the executor's thread."""
        try:
            if item is FINISHED:
                self._feed_ended(feed, None)
            elif isinstance(item, BaseException):
                self._feed_ended(feed, item)
            else:
                for future, ok, value in item.calls:  # futures with done-callbacks
                    settle(future, ok, value)
                with self._lock:
                    self._settle_locked([future for future, _, _ in item.calls])
            if self._shutdown:
                self._release_if_idle()
        except Exception:  # a bug here must not leave every later future hanging
            log.exception("the executor's thread failed to handle an outcome")

    def _check_liveness(self) -> None:
        if self._unfinished and not self._cluster_usable():
            self._fail_everything(RuntimeError("the executor's Cluster was closed"))

    def _resolve_here(self, feed: Feed, outcomes: list[Any]) -> Settle | None:
        """Resolve a feed's outcomes in the calling (I/O) thread, each future that has no
        done-callback; those that have one are returned, for the executor's thread."""
        with self._lock:
            futures = [feed.futures.pop(index, None) for index, _, _, _ in outcomes]
        done, later = [], []
        for future, (_, ok, value, _) in zip(futures, outcomes):
            if future is None:
                continue
            if future.settle_unless_hooked(ok, value):
                done.append(future)
            else:
                later.append((future, ok, value))
        if feed.job is not None:
            feed.job.mark_consumed(len(outcomes))
        with self._lock:
            self._settle_locked(done)
        if any(future.awaited for future in done):
            self._cluster.engine.reactor.hand_over()
        return Settle(later) if later else None

    def _feed_ended(self, feed: Feed, error: BaseException | None) -> None:
        """A feed's job finished (``error`` None), was cancelled, or failed. Calls it took
        and never answered fail; when the cluster is unusable so do the queued ones, else
        a new feed takes them."""
        stranded: list[Call] = []
        with self._lock:
            self._feeds.discard(feed)
            feed.closed = True
            feed.job = None  # no cycle job <-> feed keeps this executor alive once dropped
            leftovers = list(feed.futures.values())
            feed.futures.clear()
            if self._feed is feed:
                self._feed = None
            if error is not None and self._pending and self._feed is None:
                if isinstance(error, NoNodesError) or not self._cluster_usable():
                    stranded = list(self._pending)
                    self._pending.clear()
                else:
                    self._start_feed_locked()
        if error is None and leftovers:
            error = (cf.CancelledError(_CANCELLED) if feed.cancelled else
                     RuntimeError("the cluster finished a job without answering a call"))
        for future in leftovers:
            settle(future, False, error)
        for call in stranded:
            if call.future.set_running_or_notify_cancel():
                settle(call.future, False, error)
        with self._lock:
            self._settle_locked(leftovers + [c.future for c in stranded])

    def _end_quietly(self, feed: Feed) -> bool:
        """End ``feed`` in the calling (I/O) thread when it finished with every call
        answered and the executor is not shutting down (nothing to settle, nothing to
        release); False to leave it to the executor's thread."""
        with self._lock:
            if feed.futures or self._shutdown:
                return False
        self._feed_ended(feed, None)
        return True

    def _fail_everything(self, error: BaseException) -> None:
        """The cluster is gone: every call taken or queued fails with ``error``."""
        with self._lock:
            feeds = list(self._feeds)
        for feed in feeds:  # the cluster is unusable: the queued calls fail too
            self._feed_ended(feed, error)

    def _settle_locked(self, futures: Iterable[cf.Future[Any]]) -> None:
        for future in futures:
            self._unfinished.discard(future)
        if not self._unfinished:
            self._idle.notify_all()

    def _cluster_usable(self) -> bool:
        engine = self._cluster.engine
        return engine.crashed is None and engine.is_alive()

    # ------------------------------------------------------------------ map

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int | None = None) -> Iterator[Any]:
        """``fn(*args)`` for the items of ``iterables`` taken together, as the stdlib's:
        results in input order; a call's exception is raised when its item is reached (and
        the rest are cancelled); ``TimeoutError`` when a result is not in ``timeout``
        seconds after this call. Unlike the stdlib's, the inputs are read lazily, as the
        cluster has room (an endless iterable is fine), and the work starts at once.
        ``chunksize``: inputs per message (None: the executor's option, else adaptive).

        Closing or dropping the iterator cancels what has not run. ``shutdown`` leaves an
        open map running (an owned Cluster stays open until it ends) unless
        ``cancel_futures`` is set: then the iterator raises ``CancelledError`` at the first
        result that never came. Raises RuntimeError after shutdown, SerializationError when
        ``fn`` cannot be pickled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        options = self._options if chunksize is None else replace(self._options,
                                                                  chunksize=chunksize)
        self._check_accepting()
        calls = ((args, None) for args in zip(*iterables))
        job = self._cluster.make_job(fn, calls, options, {}, total=_length(iterables))
        with self._lock:
            self._check_accepting(locked=True)
            self._maps.add(job)
        results = self._results(job, deadline)
        next(results)  # submits the job; from here closing the generator cancels it
        return results

    def _results(self, job: Job, deadline: float | None) -> Iterator[Any]:
        engine = self._cluster.engine
        engine.submit(job)
        try:
            yield None  # primed by ``map``
            position = 0
            for outcome in ordered(self._outcomes(job, deadline)):
                position += 1
                if not outcome[1]:
                    raise outcome[2]
                box = [outcome[2]]
                del outcome  # a yielded result is the caller's alone: none kept here
                yield box.pop()
            if not job.exhausted or position < job.read:  # it was cancelled
                raise cf.CancelledError(_CANCELLED)
        finally:
            if not job.ended and engine.is_alive():
                engine.cancel(job)
            with self._lock:
                self._maps.discard(job)
            self._release_if_idle()

    def _outcomes(self, job: Job, deadline: float | None) -> Iterator[Outcome]:
        """A map's outcomes in completion order, checking every ``LIVENESS_CHECK_S`` that
        the cluster is still usable; ``cf.TimeoutError`` past ``deadline``."""
        while True:
            left = LIVENESS_CHECK_S if deadline is None else deadline - time.monotonic()
            try:
                batch = job.take(timeout=min(LIVENESS_CHECK_S, max(0.0, left)))
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise cf.TimeoutError("the map's results did not come in time") from None
                if not self._cluster_usable():
                    raise RuntimeError("the executor's Cluster was closed") from None
                continue
            if batch is None:
                return
            yield from drain(as_outcomes(batch))

    # ------------------------------------------------------------------ shutdown

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more calls. ``cancel_futures``: calls not started are cancelled (as
        the stdlib's, running ones finish and keep their outcome; open maps are cancelled
        and raise ``CancelledError`` at their first missing result).
        ``wait``: block until every submitted call has its outcome (called from a
        done-callback it cannot wait, and does not). The Cluster is closed (if this
        executor opened it) once no call or map is left; the daemons keep running.
        Idempotent."""
        queued: list[cf.Future[Any]] = []
        maps: list[Job] = []
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                queued = [call.future for call in self._pending]
                self._pending.clear()
                self._settle_locked(queued)
                maps = list(self._maps)
                for feed in self._feeds:
                    feed.closed = True  # it takes no more calls; its running ones finish
                self._feed = None
        for future in queued:
            future.cancel()
            future.set_running_or_notify_cancel()  # wakes wait() and as_completed()
        self._cancel_jobs(maps)
        in_own_thread = threading.current_thread() is self._thread
        if wait and not in_own_thread:
            with self._lock:
                while self._unfinished:
                    self._idle.wait()
        self._release_if_idle()
        if wait and self._released and not in_own_thread:
            self._thread.join()

    def _cancel_jobs(self, jobs: list[Job]) -> None:
        engine = self._cluster.engine
        if engine.is_alive():
            for job in jobs:
                engine.cancel(job)

    def stop_running(self) -> None:
        """Stop the calls running on the nodes (their futures fail with
        ``CancelledError``): for joblib's abort, after ``shutdown(cancel_futures=True)``."""
        with self._lock:
            feeds = list(self._feeds)
            for feed in feeds:
                feed.cancelled = feed.closed = True
        self._cancel_jobs([f.job for f in feeds if f.job is not None])

    def _release_if_idle(self) -> None:
        """After shutdown, once nothing is left: stop the executor's thread and close
        an owned Cluster."""
        with self._lock:
            if self._released or not self._shutdown or self._unfinished or self._maps:
                return
            self._released = True
        self._finalizer.detach()
        self._inbox.put((None, None))
        if self._owns:
            if self._cluster.engine.on_loop_thread():
                # a map dropped in the I/O thread: it cannot wait for itself to end
                threading.Thread(target=self._cluster.close, daemon=True).start()
            else:
                self._cluster.close()


def _length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _serve(ref: weakref.ref[Executor], inbox: queue.SimpleQueue[tuple[Feed | None, Any]]
           ) -> None:
    """The executor's thread: resolve futures from what the feeds' jobs deliver. It holds
    the executor only while it handles an item, so that a dropped executor is collected
    (and its finalizer ends this thread)."""
    while True:
        try:
            feed, item = inbox.get(timeout=LIVENESS_CHECK_S)
        except queue.Empty:
            executor = ref()
            if executor is None:
                return
            executor._check_liveness()
            del executor
            continue
        if feed is None:
            return  # released
        feed.executor._handle(feed, item)
        del feed, item
