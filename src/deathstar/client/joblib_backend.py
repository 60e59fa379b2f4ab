"""joblib on a deathstar cluster::

    deathstar.register_joblib()
    with joblib.parallel_config(backend="deathstar", cluster=["krypton", "xenon"]):
        results = joblib.Parallel(n_jobs=-1)(joblib.delayed(f)(x) for x in xs)

joblib groups calls into batches (auto-batching, as with loky) and hands each batch to
the backend, which submits ``_call_batch(batch)`` to a deathstar ``Executor``: the function
shipped to the nodes is always that one small function (sent to each node once) and the
batch travels as its argument. Results return through ``submit``'s callback (joblib's
``retrieve_result_callback`` API). ``n_jobs=-1`` (the default under this backend) is the
cluster's capacity. joblib must be installed on the nodes too: the batches are joblib
objects.

The connection: ``cluster`` may be a ``Cluster`` (used as is, left open: the way to reuse
one connection across many ``Parallel`` calls), or what ``Cluster`` takes (node names, None
for ``DEATHSTAR_CLUSTER`` or an embedded local daemon), connected for each ``Parallel``
call and closed at its end. ``initializer``/``initargs`` (as loky takes them) run once in
each worker process before its first batch. Other keywords are ``Cluster.map``'s options.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

from deathstar.client.cluster import Cluster, MapOptions
from deathstar.client.status import query_status
from deathstar.client.executor import Executor
from deathstar.nodes import parse_cluster

__all__ = ["register_joblib", "backend_class"]

ClusterSpec = Cluster | str | Sequence[str] | None


def register_joblib(name: str = "deathstar") -> None:
    """Make ``joblib.parallel_config(backend=name, cluster=..., **options)`` run joblib's
    batches on a deathstar cluster. Raises ImportError when joblib is not installed
    (``pip install deathstar[joblib]``)."""
    from joblib import register_parallel_backend

    register_parallel_backend(name, backend_class())


def _call_batch(batch: Callable[[], Any]) -> Any:
    """Run one joblib batch on a worker."""
    return batch()


@functools.cache
def backend_class() -> type:
    """The joblib backend class (built on first use, so importing deathstar does not
    import joblib)."""
    from joblib.parallel import (
        AutoBatchingMixin,
        ParallelBackendBase,
    )

    class DeathstarBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
        """joblib's backend API (``submit`` + ``retrieve_result_callback``) over a
        deathstar ``Executor``. Its ``cluster`` and options come from
        ``parallel_config``."""

        supports_retrieve_callback = True
        default_n_jobs = -1

        def __init__(self, cluster: ClusterSpec = None, nesting_level: int | None = None,
                     inner_max_num_threads: int | None = None,
                     initializer: Callable[..., Any] | None = None,
                     initargs: tuple[Any, ...] = (), **options: Any):
            super().__init__(nesting_level=nesting_level,
                             inner_max_num_threads=inner_max_num_threads)
            MapOptions(**options)  # a bad option fails in parallel_config, not later
            if initializer is not None and not callable(initializer):
                raise TypeError("initializer must be a callable")
            self.cluster_spec = cluster
            self.options = options
            self.init: dict[str, Any] = {"initializer": initializer, "initargs": initargs}
            self._cluster: Cluster | None = None
            self._executor: Executor | None = None

        def _ensure(self) -> Executor:
            if self._executor is None:
                if self._cluster is None:
                    spec = self.cluster_spec
                    self._cluster = spec if isinstance(spec, Cluster) else Cluster(spec, shared=True)
                self._executor = Executor(self._cluster, **self.init, **self.options)
            return self._executor

        def effective_n_jobs(self, n_jobs: int | None) -> int:
            """``n_jobs`` as given; -1 is the cluster's capacity (-2 one less...)."""
            if n_jobs == 0:
                raise ValueError("n_jobs == 0 in Parallel has no meaning")
            if n_jobs is None:
                n_jobs = self.default_n_jobs
            if n_jobs > 0:
                return n_jobs
            return max(self._capacity() + 1 + n_jobs, 1)

        def _capacity(self) -> int:
            """Workers of the cluster: asked of the connection, or, outside a Parallel
            call, of the nodes' status ports (no connection is left open)."""
            if self._cluster is not None:
                return max(self._cluster.capacity, 1)
            spec = self.cluster_spec
            if isinstance(spec, Cluster):
                return max(spec.capacity, 1)
            addresses = parse_cluster(spec)
            if addresses is None:  # the embedded daemon: one worker per core
                return os.cpu_count() or 1
            rows = query_status(spec or os.environ.get("DEATHSTAR_CLUSTER", ""))
            return max(sum(int(r.get("workers") or 0) for r in rows if not r["error"]), 1)

        def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: Any = None,
                      require: Any = None, **backend_kwargs: Any) -> int:
            """Connect (once per Parallel call) and return the number of workers
            (``n_jobs=1`` runs in this process, as joblib does, without connecting)."""
            self.parallel = parallel
            for key in ("initializer", "initargs"):  # given to Parallel's backend kwargs
                if key in backend_kwargs:
                    self.init[key] = backend_kwargs[key]
            if n_jobs == 1:
                return 1
            self._ensure()
            return self.effective_n_jobs(n_jobs)

        def submit(self, func: Callable[[], Any],
                   callback: Callable[[Any], None] | None = None) -> Any:
            future = self._ensure().submit(_call_batch, func)
            if callback is not None:
                future.add_done_callback(callback)
            return future

        def retrieve_result_callback(self, out: Any) -> Any:
            """The batch's results; the exception the user's function raised is raised
            as itself (as with loky), its ``__cause__`` the remote traceback."""
            return out.result()

        def abort_everything(self, ensure_ready: bool = True) -> None:
            """Cancel what has not run and stop what runs; keep the connection."""
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor.stop_running()
                self._executor = None
            if ensure_ready:
                self._ensure()

        def terminate(self) -> None:
            """End of a Parallel call: close the connection unless it was given."""
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor.stop_running()
                self._executor = None
            if self._cluster is not None and self._cluster is not self.cluster_spec:
                self._cluster.close()
            self._cluster = None
            self.reset_batch_stats()

    return DeathstarBackend
