"""The library a user calls: ``deathstar.map`` and ``Cluster``.

A ``Cluster`` connects to every node once (or starts the embedded local daemon when no
node is named) and runs any number of maps over them. The sockets live in an I/O thread
(``engine.Engine``); the methods here feed it inputs and read results back.
"""

from __future__ import annotations

import builtins
import itertools
import queue
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence, cast

from deathstar import config, serialize
from deathstar.client.engine import Engine, NoNodesError
from deathstar.client.job import Job
from deathstar.client.outcomes import Batch, Outcome, as_outcomes, drain, ordered
from deathstar.client.results import Collector, MapResult
from deathstar.client.blobs import FunctionBlobs
from deathstar.client.embedded import LocalDaemon, acquire_shared, hosting, release_shared
from deathstar.client.progress import ProgressFn, resolve as resolve_progress
from deathstar.client.status import load_keys, query_status
from deathstar.nodes import NodeAddress, parse_cluster

log = logging.getLogger("deathstar.client")

OnError = Literal["raise", "return"]

__all__ = ["Cluster", "MapResult", "NoNodesError", "map", "ordered"]


@dataclass(frozen=True)
class MapOptions:
    """The options every map method takes (see ``Cluster.map``)."""

    chunksize: int | None = None
    timeout: float | None = None
    timeout_retries: int = 0
    max_attempts: int = config.MAX_ATTEMPTS
    seed: int | None = None
    capture_output: bool = False

    def __post_init__(self) -> None:
        if self.chunksize is not None and self.chunksize < 1:
            raise ValueError("chunksize must be at least 1")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be more than 0 seconds")
        if self.max_attempts < 1 or self.timeout_retries < 0:
            raise ValueError("max_attempts must be at least 1 and timeout_retries at least 0")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError("seed must be an integer")

    @classmethod
    def split(cls, kwargs: dict[str, Any]
              ) -> tuple[MapOptions, ProgressFn | bool | None, dict[str, Any]]:
        """Take the options (and ``progress``) out of a map call's keywords; the rest are
        the function's common arguments."""
        names = {f.name for f in fields(cls)}
        options = cls(**{k: v for k, v in kwargs.items() if k in names})
        common = {k: v for k, v in kwargs.items() if k not in names and k != "progress"}
        return options, kwargs.get("progress"), common


class Cluster:
    """A connection to a set of nodes, reused across maps.

    ``nodes``: node names (``"host"``, ``"host:port"``), a comma-separated string,
    ``"@file"``, or None for ``DEATHSTAR_CLUSTER`` or, when that is unset, an embedded
    local daemon with ``workers`` workers (default one per core) that stops on ``close``.
    ``shared``: with no nodes and no ``workers``, use the process's shared embedded daemon
    instead (warm workers, kept across calls; ``deathstar.map``, ``Executor()`` and the
    joblib backend do so), which ``close`` leaves running.

    The constructor blocks until every node has answered or ``connect_timeout`` passed.
    ``keys``: a key folder (``deathstar keygen``) to talk CurveZMQ with the nodes; default
    ``$DEATHSTAR_KEYS``, else the default key folder when it has a client key; ``"none"``
    for plain connections (nodes started with ``--insecure``). Raises ``KeyFileError``
    for missing or loosely permitted key files. The embedded local daemon needs no keys.

    Unreachable nodes are logged, named in ``unreachable``, and retried in the background;
    if no node can be used it raises ``NoNodesError`` naming each node and why.
    Thread-safe: several threads may run maps on one Cluster at once.
    """

    def __init__(self, nodes: str | Sequence[str | NodeAddress] | None = None, *,
                 connect_timeout: float = config.CONNECT_TIMEOUT_S,
                 workers: int | None = None,
                 heartbeat_s: float = config.HEARTBEAT_INTERVAL_S,
                 keys: str | Path | None = None, shared: bool = False):
        if workers is not None and workers <= 0:
            raise ValueError(f"workers must be greater than 0, not {workers}")
        addresses = parse_cluster(nodes)
        self.local: LocalDaemon | None = None
        self.shared: LocalDaemon | None = None
        client_keys = None
        if addresses is None and shared and workers is None:
            self.shared = acquire_shared()
            addresses = [self.shared.address]
        elif addresses is None:
            self.local = LocalDaemon(workers)
            addresses = [self.local.address]
        else:
            client_keys = load_keys(keys, addresses)
        self.addresses: list[NodeAddress] = addresses
        self._keys = keys
        self._job_ids = itertools.count(1)
        self._blobs = FunctionBlobs(None)  # the last map's function (no common arguments)
        # a daemon hosted in this process (ours, the shared one, another Cluster's) runs
        # our engine in its own loop
        hosted = hosting(addresses)
        self.engine = Engine(addresses, connect_timeout=connect_timeout,
                             heartbeat_s=heartbeat_s, keys=client_keys,
                             reactor=None if hosted is None else hosted.reactor,
                             hosts=None if hosted is None else hosted.hosts())
        self.engine.start()
        self.engine.connected.wait()
        if self.engine.crashed is not None:
            self.close()
            raise self.engine.crashed
        if not self.engine.ready_nodes():
            message = self.engine.no_nodes_message()
            self.close()
            raise NoNodesError(message)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Disconnect from every node (and stop its own embedded daemon, or let go of the
        shared one). Idempotent."""
        self.engine.close()
        if self.local is not None:
            self.local.stop()
            self.local = None
        if self.shared is not None:
            release_shared(self.shared)
            self.shared = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ information

    @property
    def capacity(self) -> int:
        """Workers across the nodes that are ready now."""
        return sum(n.capacity for n in self.engine.ready_nodes())

    @property
    def unreachable(self) -> list[str]:
        """Nodes that cannot be used now, each with the reason."""
        return [f"{n.name}: {n.error}" for n in self.engine.nodes if n.state != "ready"]

    def status(self, timeout: float = config.CONNECT_TIMEOUT_S) -> list[dict[str, Any]]:
        """Each node's daemon status (its status port, as ``deathstar status`` shows it:
        workers, tasks done, lost, prefetched, bytes of functions received...), in node
        order; a node that does not answer within ``timeout`` seconds has ``error`` set."""
        return query_status(self.addresses, timeout, keys=self._keys)

    def node_stats(self) -> list[dict[str, Any]]:
        """Per node: state, workers, inputs in flight, done, failed, tasks/s, and its lag
        (``lag_ms``: what a message spends in flight beyond its run, measured on messages
        that waited in no queue; None until one was), refreshed four times a second; safe
        to call from any thread."""
        return list(self.engine.snapshot)

    # ------------------------------------------------------------------ maps

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *,
            chunksize: int | None = None, timeout: float | None = None,
            timeout_retries: int = 0, max_attempts: int = config.MAX_ATTEMPTS,
            seed: int | None = None, capture_output: bool = False,
            on_error: OnError = "raise", progress: ProgressFn | bool | None = None,
            **common: Any) -> MapResult:
        """Run ``fn(item, **common)`` for every item; block until all are done.

        Returns the results in input order with the execution report. An input whose
        function raised gives that exception (rebuilt here, the remote traceback as its
        ``__cause__``, ``index``/``node``/``worker`` set on it; a ``RemoteError`` when it
        cannot be rebuilt); with ``on_error="raise"`` (default) the
        first one (by input order) is raised once the whole map has finished, carrying
        the complete ``MapResult`` as ``.result``; with ``on_error="return"`` errors
        stand in place of results.

        Options (every other keyword is a common argument of ``fn``):
        ``chunksize``: inputs per message (default adaptive). ``timeout``: seconds an
        input may run before its worker is killed and it fails with ``TaskTimeout``
        (retried ``timeout_retries`` times). ``max_attempts``: runs an input gets when its
        worker dies under it before it fails with ``WorkerCrashed``. ``seed``: workers
        seed ``random`` and numpy with seed + the input's index before each input, so the
        numbers do not depend on where it runs. ``capture_output``: what each input prints
        comes back in its record's ``output``. ``progress``: a callback ``(done, total)``
        called in this thread as results arrive, or True for a bar on stderr when it is a
        terminal.
        """
        plain = cast(Sequence[Any], items) if type(items) in (list, tuple, range) else None
        calls = None if plain is not None else (((item,), None) for item in items)
        return self._collect(fn, calls, plain, on_error=on_error, total=_length(items),
                             chunksize=chunksize, timeout=timeout,
                             timeout_retries=timeout_retries, max_attempts=max_attempts,
                             seed=seed, capture_output=capture_output, progress=progress,
                             **common)

    def starmap(self, fn: Callable[..., Any], arg_tuples: Iterable[tuple[Any, ...]], *,
                on_error: OnError = "raise", **options_and_common: Any) -> MapResult:
        """Like ``map`` (same options) but each item is a tuple of positional arguments."""
        return self.map_calls(fn, ((args, None) for args in arg_tuples), on_error=on_error,
                              **options_and_common)

    def map_calls(self, fn: Callable[..., Any],
                  calls: Iterable[tuple[tuple[Any, ...], dict[str, Any] | None]], *,
                  on_error: OnError = "raise", **options_and_common: Any) -> MapResult:
        """The general map (``map``'s options): each call is ``(args, kwargs)``;
        ``fn(*args, **common, **kwargs)`` runs for each (a call's own keywords win)."""
        return self._collect(fn, calls, None, on_error=on_error, **options_and_common)

    def _collect(self, fn: Callable[..., Any],
                 calls: Iterable[tuple[tuple[Any, ...], dict[str, Any] | None]] | None,
                 plain: Sequence[Any] | None, *, on_error: OnError,
                 total: int | None = None, **options_and_common: Any) -> MapResult:
        """``map_calls``, or with ``plain`` (a list, tuple or range; ``calls`` None) the
        fast path that slices it into messages. Results are gathered by batch."""
        _check_on_error(on_error)
        collector = Collector()
        for delivered in self.deliveries(fn, iter(()) if calls is None else calls,
                                         total=total, plain=plain, **options_and_common):
            collector.add(delivered)
        result = collector.result()
        if result.errors and on_error == "raise":
            first = result.errors[0]
            try:
                setattr(first, "result", result)
            except (AttributeError, TypeError):
                pass  # an exception with __slots__: it is raised without the result
            raise first
        return result

    def imap(self, fn: Callable[..., Any], items: Iterable[Any], *,
             on_error: OnError = "raise", **options_and_common: Any) -> Iterator[Any]:
        """Yield ``fn(item, **common)`` in input order as results arrive (inputs are read
        lazily, results held back only until their predecessors are in). With
        ``on_error="raise"`` a failed input raises when its turn comes. Takes ``map``'s
        options. Closing the iterator early cancels the inputs not yet run."""
        _check_on_error(on_error)
        calls = (((item,), None) for item in items)
        stream = self.outcomes(fn, calls, total=_length(items), **options_and_common)
        for outcome in ordered(stream):
            box = [outcome]
            del outcome  # a yielded result is the caller's alone: none kept here
            yield _deliver(box.pop(), on_error)

    def imap_unordered(self, fn: Callable[..., Any], items: Iterable[Any], *,
                       on_error: OnError = "raise", **options_and_common: Any
                       ) -> Iterator[Any]:
        """Yield ``fn(item, **common)`` as each finishes, in completion order. Takes
        ``map``'s options."""
        _check_on_error(on_error)
        calls = (((item,), None) for item in items)
        for outcome in self.outcomes(fn, calls, total=_length(items), **options_and_common):
            box = [outcome]
            del outcome
            yield _deliver(box.pop(), on_error)

    def as_completed(self, fn: Callable[..., Any], items: Iterable[Any],
                     **options_and_common: Any) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, result)`` for every item as each finishes (completion order);
        a failed input's result is its exception (what the function raised, or a
        ``TaskFailed``), never raised.
        Takes ``map``'s options."""
        calls = (((item,), None) for item in items)
        for outcome in self.outcomes(fn, calls, total=_length(items), **options_and_common):
            box = [outcome]
            del outcome
            yield _index_and_value(box.pop())

    def outcomes(self, fn: Callable[..., Any],
                 calls: Iterable[tuple[tuple[Any, ...], dict[str, Any] | None]], *,
                 total: int | None = None, indices: Iterable[int] | None = None,
                 deadline: float | None = None, **options_and_common: Any
                 ) -> Iterator[Outcome]:
        """The raw stream: ``(index, ok, value_or_exception, record)`` per input, in
        completion order, each input exactly once. Closing the iterator early cancels
        the inputs not yet run (queued ones are dropped, running ones killed).
        ``indices``: the index each call is known by (default 0, 1, 2, ...).
        ``deadline`` (``time.monotonic()`` value): past it, waiting for the next outcome
        raises ``TimeoutError`` (and cancels the rest). Takes ``map``'s options; other
        keywords are common arguments.

        Raises ``SerializationError`` (before anything is sent) when the function or a
        common argument cannot be pickled, ``NoNodesError`` when no node is left."""
        deliveries = self.deliveries(fn, calls, total=total, indices=indices,
                                     deadline=deadline, columnar=False,
                                     **options_and_common)
        return _one_by_one(deliveries)

    def deliveries(self, fn: Callable[..., Any],
                   calls: Iterable[tuple[tuple[Any, ...], dict[str, Any] | None]], *,
                   total: int | None = None, indices: Iterable[int] | None = None,
                   deadline: float | None = None, columnar: bool = True,
                   plain: Sequence[Any] | None = None, **options_and_common: Any
                   ) -> Iterator[list[Outcome] | Batch]:
        """``outcomes`` by message, for a consumer that handles many inputs at once: a
        ``Batch`` (columns) for a message whose inputs all ran (unless ``columnar`` is
        False), else a list of outcomes; completion order (``job.in_order`` restores
        input order), each input exactly once. ``plain``: the inputs as a list, tuple or
        range, each the one argument (``calls`` is then empty), sliced into messages.
        Takes ``outcomes``' options and raises as it does, before anything is sent."""
        options, progress, common = MapOptions.split(options_and_common)
        job = self.make_job(fn, calls, options, common, total=total, indices=indices)
        job.plain, job.columnar = plain, columnar
        return self._deliveries(job, resolve_progress(progress, total), deadline)

    def make_job(self, fn: Callable[..., Any],
                 calls: Iterable[tuple[tuple[Any, ...], dict[str, Any] | None]],
                 options: MapOptions, common: dict[str, Any], *, total: int | None = None,
                 indices: Iterable[int] | None = None, out: Any = None) -> Job:
        """A job ready for ``engine.submit``: the function and common arguments pickled
        (``SerializationError`` names what cannot be), the calls numbered lazily. ``out``
        replaces the job's queue by any object with ``put`` (called in the I/O thread
        with lists of outcomes, then ``FINISHED``, or an exception)."""
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        self.check_open()
        if common:
            inner, bundle, modules = serialize.pickle_function(fn, common)
            blob = serialize.function_blob(inner, bundle)
            fn_hash = serialize.content_hash(blob)
        else:  # the last map's blob when it is the same function (and modules)
            fn_hash, blob, inner, modules = self._blobs.function(fn)
        # calls before indices: an index may be known only once its call has been read
        numbered = zip(calls, itertools.count() if indices is None else indices)
        job = self.job_from_blob(fn_hash, blob,
                                 ((i, args, kwargs) for (args, kwargs), i in numbered),
                                 options, total=total, out=out)
        job.inner, job.modules = inner, set(modules)  # inputs may need more modules shipped
        return job

    def job_from_blob(self, fn_hash: str, blob: list[Any],
                      items: Iterator[tuple[int, tuple[Any, ...], dict[str, Any] | None]],
                      options: MapOptions, *, total: int | None = None,
                      out: Any = None) -> Job:
        """A job for a function already pickled (``serialize.dumps_function``) and named by
        ``fn_hash``: ``items`` yields ``(index, args, kwargs)`` and is read lazily in the
        I/O thread, as the nodes have room (``out`` as for ``make_job``). Raises
        RuntimeError when this Cluster is closed."""
        self.check_open()
        job = Job(next(self._job_ids), fn_hash, blob, items,
                  total, options.chunksize, options.max_attempts,
                  options.timeout or config.TASK_TIMEOUT_S or None,
                  options.timeout_retries, options.seed, options.capture_output)
        if out is not None:
            job.out = out
        else:  # a consumer thread blocked on ``job.out``: woken once per hold
            job.hold_s = config.DELIVERY_HOLD_S
        return job

    def check_open(self) -> None:
        """Raise RuntimeError when this Cluster is closed (or its I/O thread failed)."""
        if self.engine.crashed is not None or not self.engine.is_alive():
            raise RuntimeError("this Cluster is closed")

    def _deliveries(self, job: Job, progress: ProgressFn | None,
                    deadline: float | None = None) -> Iterator[list[Outcome] | Batch]:
        """What ``job`` delivers, as it comes (submitting it first); closing the iterator
        before the end cancels the rest."""
        self.engine.submit(job)
        done = 0
        try:
            while True:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    delivered = job.take(timeout)
                except queue.Empty:
                    raise TimeoutError("the results did not come in time") from None
                if delivered is None:
                    return
                done += len(delivered)
                if progress is not None:
                    progress(done, job.total)
                yield delivered
        finally:
            if not job.ended and self.engine.is_alive():  # (a closed Cluster dropped it)
                self.engine.cancel(job)


def map(fn: Callable[..., Any], items: Iterable[Any], *,
        cluster: str | Sequence[str] | None = None,
        connect_timeout: float = config.CONNECT_TIMEOUT_S, keys: str | Path | None = None,
        **options_and_common: Any) -> MapResult:
    """Run ``fn(item, **common)`` for every item on ``cluster`` and return the results in
    input order, with ``.report`` (one record per input) and ``.errors``.

    ``cluster``: node names, ``"a,b:7000"``, ``"@nodes.txt"``; None means
    ``DEATHSTAR_CLUSTER`` or else an embedded local daemon started for this call.
    Blocks until every input has a result. Takes ``Cluster.map``'s options (chunksize,
    timeout, max_attempts, timeout_retries, on_error, progress); every other keyword is
    a common argument of ``fn``.
    """
    with Cluster(cluster, connect_timeout=connect_timeout, keys=keys, shared=True) as c:
        return c.map(fn, items, **options_and_common)


def _one_by_one(deliveries: Iterator[list[Outcome] | Batch]) -> Iterator[Outcome]:
    """Each outcome of the deliveries, holding none once yielded (``drain``)."""
    for delivered in deliveries:
        yield from drain(as_outcomes(delivered))


def _deliver(outcome: Outcome, on_error: OnError) -> Any:
    if not outcome[1] and on_error == "raise":
        raise outcome[2]
    return outcome[2]


def _index_and_value(outcome: Outcome) -> tuple[int, Any]:
    return outcome[0], outcome[2]


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "return"):
        raise ValueError(f"on_error must be 'raise' or 'return', not {on_error!r}")


def _length(items: Iterable[Any]) -> int | None:
    try:
        return builtins.len(items)  # type: ignore[arg-type]
    except TypeError:
        return None
