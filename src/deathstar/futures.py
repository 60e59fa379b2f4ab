"""``concurrent.futures`` on a deathstar cluster: ``Executor`` (and ``Cluster.executor``)
and the joblib backend.

Submitted calls wait in the executor's own queue, as pending futures that can still be
cancelled, and are handed to the cluster a few at a time (about twice its capacity), each
as a one-call job; a handed-over future is running and can no longer be cancelled, as
with ``ProcessPoolExecutor``. Futures are resolved in the client's I/O thread, which runs
their done-callbacks.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Sequence

from deathstar.client import Cluster, MapOptions, ordered
from deathstar.job import FINISHED, Job


class _FutureSink:
    """Receives a one-call job's outcome (in the I/O thread) and resolves its future."""

    def __init__(self, executor: Executor, future: cf.Future[Any]):
        self.executor = executor
        self.future = future

    def put(self, item: Any) -> None:
        if item is FINISHED:
            return
        if isinstance(item, BaseException):
            self.resolve(False, item)
            return
        for _, ok, value, _ in item:
            self.resolve(ok, value)

    def resolve(self, ok: bool, value: Any) -> None:
        if not self.future.done():
            if ok:
                self.future.set_result(value)
            else:
                self.future.set_exception(value)
        self.executor._finished(self)


class Executor(cf.Executor):
    """A ``concurrent.futures.Executor`` whose calls run on a deathstar cluster.

    ``cluster``: a ``Cluster`` (left open on shutdown), or what ``Cluster`` takes (node
    names, None for the embedded local cluster; then it is closed on shutdown).
    ``options``: ``Cluster.map``'s options (timeout, max_attempts, seed, ...) for every
    call. Exceptions of the user's function come back as ``RemoteError`` (the original as
    its ``.exception``), dead workers as ``WorkerCrashed``, timeouts as ``TaskTimeout``.
    """

    def __init__(self, cluster: Cluster | str | Sequence[str] | None = None, **options: Any):
        self._options = MapOptions(**options)
        self._owns = not isinstance(cluster, Cluster)
        self._cluster = cluster if isinstance(cluster, Cluster) else Cluster(cluster)
        self._lock = threading.Lock()
        self._queued: deque[tuple[cf.Future[Any], Job]] = deque()
        self._running: dict[_FutureSink, Job] = {}
        self._shutdown = False

    @property
    def cluster(self) -> Cluster:
        return self._cluster

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """Schedule ``fn(*args, **kwargs)``; returns its Future at once. Raises
        RuntimeError after shutdown, SerializationError if ``fn`` can't be pickled."""
        future: cf.Future[Any] = cf.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            job = self._cluster.make_job(fn, iter([(args, kwargs)]), self._options, {},
                                         total=1, out=_FutureSink(self, future))
            self._queued.append((future, job))
        self._pump()
        return future

    def _window(self) -> int:
        return max(2, 2 * self._cluster.capacity)

    def _pump(self) -> None:
        """Hand queued calls to the cluster while fewer than the window are running."""
        while True:
            with self._lock:
                if not self._queued or len(self._running) >= self._window():
                    return
                future, job = self._queued.popleft()
                if not future.set_running_or_notify_cancel():
                    continue  # cancelled while it waited here
                self._running[job.out] = job
            self._cluster.engine.submit(job)

    def _finished(self, sink: _FutureSink) -> None:
        with self._lock:
            self._running.pop(sink, None)
        self._pump()

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int | None = None) -> Iterator[Any]:
        """Like the stdlib's: results in order, each exception raised when its item is
        reached, ``TimeoutError`` if the whole map is not done ``timeout`` s after this
        call. Inputs are read lazily as the cluster has room (an endless iterable is
        fine); ``chunksize`` None batches adaptively."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        deadline = None if timeout is None else time.monotonic() + timeout
        calls = ((args, None) for args in zip(*iterables))
        options = {**self._options.__dict__, "chunksize": chunksize}
        stream = self._cluster.outcomes(fn, calls, deadline=deadline, **options)

        def results() -> Iterator[Any]:
            try:
                for _, ok, value, _ in ordered(stream):
                    if not ok:
                        raise value
                    yield value
            finally:
                stream.close()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; with ``cancel_futures`` the queued ones are cancelled and the
        running ones stopped on their nodes (their futures get CancelledError); with
        ``wait`` block until the running ones are done. An owned cluster is closed; the
        daemons always keep running."""
        with self._lock:
            self._shutdown = True
            queued = list(self._queued) if cancel_futures else []
            if cancel_futures:
                self._queued.clear()
            running = dict(self._running) if cancel_futures else {}
        for future, _ in queued:
            future.cancel()
        for sink, job in running.items():
            self._cluster.engine.cancel(job)
            sink.resolve(False, cf.CancelledError("cancelled by shutdown(cancel_futures=True)"))
        if wait:
            while True:
                with self._lock:
                    pending = [s.future for s in self._running] + [f for f, _ in self._queued]
                if not pending:
                    break
                cf.wait(pending)
        if self._owns:
            self._cluster.close()


# ---------------------------------------------------------------------------- joblib


def register_joblib() -> None:
    """Make ``joblib.parallel_config(backend="deathstar", cluster=...)`` run joblib's
    batches on a deathstar cluster (its capacity is joblib's ``n_jobs=-1``)."""
    from joblib import register_parallel_backend

    register_parallel_backend("deathstar", _joblib_backend_class())


def _joblib_backend_class() -> type:
    from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase

    class DeathstarBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
        """joblib's backend API (submit + retrieve_result_callback) over an Executor."""

        supports_retrieve_callback = True
        supports_return_generator = True

        def __init__(self, cluster: Any = None, nesting_level: Any = None,
                     inner_max_num_threads: Any = None, **options: Any):
            super().__init__(nesting_level=nesting_level,
                             inner_max_num_threads=inner_max_num_threads)
            self.cluster_spec = cluster
            self.options = options
            self.executor: Executor | None = None

        def _ensure(self) -> Executor:
            if self.executor is None:
                self.executor = Executor(self.cluster_spec, **self.options)
            return self.executor

        def effective_n_jobs(self, n_jobs: int) -> int:
            capacity = max(1, self._ensure().cluster.capacity)
            return capacity if n_jobs is None or n_jobs < 0 else min(n_jobs, capacity)

        def configure(self, n_jobs: int = 1, parallel: Any = None, **backend_kwargs: Any
                      ) -> int:
            self.parallel = parallel
            return self.effective_n_jobs(n_jobs)

        def submit(self, func: Callable[[], Any], callback: Any = None) -> cf.Future[Any]:
            future = self._ensure().submit(func)
            if callback is not None:
                future.add_done_callback(callback)
            return future

        def retrieve_result_callback(self, out: cf.Future[Any]) -> Any:
            return out.result()

        def terminate(self) -> None:
            if self.executor is not None:
                self.executor.shutdown(wait=False, cancel_futures=True)
                self.executor = None

        def abort_everything(self, ensure_ready: bool = True) -> None:
            self.terminate()

    return DeathstarBackend
