"""A map as the client's I/O thread sees it: a ``Job`` (the function blob, the inputs read
lazily, the output queue, the retry queue, the batch size policy) and its ``Task``s (one
message's worth of inputs each)."""

from __future__ import annotations

import queue
import time
from collections import deque
from itertools import islice
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

from deathstar import config, serialize
from deathstar.client.outcomes import Batch, Outcome, consecutive
from deathstar.errors import (TaskFailed, TaskTimeout, WorkerCrashed, describe,
                              remote_exception)
from deathstar.report import CRASHED, ERROR, OK, TIMEOUT, TaskRecord

#: Put on a job's queue after its last outcome.
FINISHED = object()


class JobInputError(Exception):
    """A job's inputs cannot be read (the user's iterator raised) or pickled; ``cause`` is
    what its consumer raises."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


class Resumable(Protocol):
    """A job's input source that may run dry for a while and give inputs again later (an
    executor's queue of calls): a short read ends the job only once it has ``ended``."""

    def dry(self) -> bool:
        """No input to read now: reading waits for one to come (I/O thread; a hint, read
        without a lock: its source wakes the loop when an input comes)."""

    def ended(self) -> bool:
        """No input will come any more (I/O thread, after a short read)."""

    def close_idle(self) -> bool:
        """End now unless an input waits to be read; True when it has ended (I/O
        thread)."""


@dataclass(eq=False)
class Task:
    """One message's worth of inputs of a job, kept until its result is in."""

    job: Job
    indices: range | list[int]
    payload: list[Any]
    attempts: int = 1  # the attempt this send is (worker crashes and timeouts count)
    last_reason: str = ""
    node_losses: int = 0  # re-sends because a node was lost (a budget of its own)
    avoid: str = ""  # the node where it last failed: another is preferred
    nbytes: int = field(init=False)  # the payload's bytes, counted once
    # when it was sent to a node that had a free worker (its lag is measured), else 0.0
    sent_free_at: float = 0.0

    def __post_init__(self) -> None:
        self.nbytes = serialize.payload_size(self.payload)


@dataclass(eq=False)
class Job:
    """One map: its function blob, its inputs (read lazily), and its output queue."""

    id: int
    fn_hash: str
    blob: list[Any]
    items: Iterator[tuple[int, tuple[Any, ...], dict[str, Any] | None]]
    total: int | None
    chunksize: int | None
    max_attempts: int
    timeout_s: float | None = None
    timeout_retries: int = 0
    seed: int | None = None  # workers seed their generators with seed + index
    capture: bool = False  # bring back what each input prints
    out: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    retry: deque[Task] = field(default_factory=deque)
    exhausted: bool = False
    outstanding: int = 0  # tasks sent and not yet answered
    read: int = 0  # inputs taken from ``items``
    per_item_s: float | None = None
    bytes_per_item: float | None = None  # pickled input bytes, as the last batches had
    cancelled: bool = False
    # Back-pressure: outcomes handed to the consumer vs taken by it. While too many wait,
    # no new inputs are read, so memory stays bounded when the consumer is slow.
    delivered: int = 0
    consumed: int = 0
    throttled: bool = False
    ended: bool = False  # the consumer took FINISHED or the job's exception
    wake: Callable[[], None] = lambda: None  # set by the I/O thread's submit
    # Outcomes not yet handed to the consumer (``hand_held``) and since when: each item
    # waits at most ``hold_s`` (0: none waits; a consumer that resolves in the I/O thread)
    hold_s: float = 0.0
    held: list[Any] = field(default_factory=list)
    held_since: float = 0.0
    # The function's own pickle and the modules known to travel with it: when inputs
    # refer to a local module that is not among them, the blob is made again with it
    # (``ship_more``). None: the caller ships what its inputs need (the Executor).
    inner: list[Any] | None = None
    modules: set[str] = field(default_factory=set)
    # The fast path of a map over a list, tuple or range: its inputs are this sequence
    # (input i is ``fn(plain[i], **common)``), sliced into messages; ``items`` is unused.
    plain: Sequence[Any] | None = None
    columnar: bool = False  # the consumer takes a ``Batch`` for a message that all ran
    # ``items`` may run dry and resume (``Resumable``): the job then stays open until its
    # source ends, or it has been idle ``config.FEED_IDLE_S`` (``idle_due``)
    resumable: Resumable | None = None
    active_at: float = field(default_factory=time.monotonic)  # an input read or answered

    def deliver(self, outcomes: list[Any] | Batch) -> None:
        """Hand a list of outcomes (or a ``Batch``) to the consumer (I/O thread): at once
        (after those held, in order) when the job holds none back or when they are
        ``config.DELIVERY_AT_ONCE`` or more, else with the next ones within ``hold_s``
        (``hand_held``)."""
        self.delivered += len(outcomes)
        self.active_at = time.monotonic()
        if not self.hold_s or len(outcomes) >= config.DELIVERY_AT_ONCE:
            self.hand_held()
            self.out.put(outcomes)
            return
        if not self.held:
            self.held_since = time.monotonic()
        self.held.append(outcomes)

    def hand_held(self, now: float | None = None) -> None:
        """Hand the held outcomes to the consumer (I/O thread), in the order they came:
        all of them when ``now`` is None, else once the first has waited ``hold_s``."""
        if self.held and (now is None or now >= self.held_due()):
            for item in self.held:
                self.out.put(item)
            self.held.clear()

    def held_due(self) -> float:
        """When the outcomes held now must go (only meaningful while ``held``)."""
        return self.held_since + self.hold_s

    def end(self, last: Any) -> None:
        """Hand the consumer what ends the job (``FINISHED`` or the exception it raises),
        after every outcome held (I/O thread)."""
        self.hand_held()
        self.out.put(last)

    def readable(self) -> bool:
        """Inputs may be read now: not exhausted, not waiting for its source to have
        some, not throttled (``backlogged``) (I/O thread)."""
        if self.exhausted or self.resumable is not None and self.resumable.dry():
            return False
        return not self.backlogged()

    def backlogged(self) -> bool:
        """Too many outcomes wait for the consumer: read no more inputs for now (I/O
        thread)."""
        self.throttled = self.delivered - self.consumed > config.MAX_PENDING_RESULTS
        return self.throttled

    def read_batch(self, capacity: int) -> Task | None:
        """Read and pickle the next batch of inputs (``batch_size`` of them) as a Task;
        None when none are left. Raises JobInputError when the input iterator fails or an
        input cannot be pickled (naming its index)."""
        indices, inputs = self._next_inputs(self.batch_size(capacity))
        if not inputs:
            return None
        names: set[str] | None = None if self.inner is None else set()
        try:
            payload = serialize.dumps(inputs, names)
        except Exception:
            for index, one in zip(indices, inputs):
                try:
                    serialize.dumps(one)
                except Exception as exc:
                    raise JobInputError(serialize.SerializationError(
                        f"input {index} cannot be pickled: {type(exc).__name__}: {exc}")
                    ) from exc
            raise
        if names and not names <= self.modules:
            self.ship_more(names)
        task = Task(self, indices, payload)
        self.bytes_per_item = _folded(self.bytes_per_item, task.nbytes / len(inputs))
        return task

    def _next_inputs(self, size: int) -> tuple[range | list[int], list[Any]]:
        """The next ``size`` inputs (fewer at the end, which exhausts the job) and their
        indices, a range when they have no gap: a ``plain`` job's are the next slice of
        its sequence (no object per input), others ``(args, kwargs)`` from ``items``."""
        if self.plain is not None:
            start, stop = self.read, min(self.read + size, len(self.plain))
            self.exhausted = stop >= len(self.plain)
            self.read = max(start, stop)
            return range(start, stop), list(self.plain[start:stop])
        try:
            chunk = list(islice(self.items, size))
        except Exception as exc:  # the user's input iterator failed (a malformed line...)
            raise JobInputError(exc) from exc
        self.exhausted = len(chunk) < size and (self.resumable is None
                                                or self.resumable.ended())
        if chunk:
            self.read += len(chunk)
            self.active_at = time.monotonic()
        indices: range | list[int] = [index for index, _, _ in chunk]
        if consecutive(indices):
            indices = range(indices[0], indices[-1] + 1)
        return indices, [(args, kwargs) for _, args, kwargs in chunk]

    def ship_more(self, names: set[str]) -> None:
        """Inputs refer to modules ``names``: if local ones are among them that the blob
        lacks, the blob is made again with them (a new hash: each node gets it before
        the next task). Raises JobInputError when a module cannot be shipped."""
        assert self.inner is not None
        self.modules |= names
        try:
            bundle = serialize.bundle_for(self.modules)
        except serialize.ShippingError as exc:
            raise JobInputError(serialize.SerializationError(str(exc))) from exc
        blob = serialize.function_blob(self.inner, bundle)
        self.fn_hash, self.blob = serialize.content_hash(blob), blob

    def take(self, timeout: float | None = None) -> list[Outcome] | Batch | None:
        """The next list of outcomes, or ``Batch`` for a ``columnar`` job (consumer
        thread), blocking at most ``timeout`` seconds (``queue.Empty`` past it); None once
        the job has finished; raises the exception that ended the job. What it returns
        counts as consumed."""
        item = self.out.get(timeout=timeout)
        if item is FINISHED:
            self.ended = True
            return None
        if isinstance(item, BaseException):
            self.ended = True
            raise item
        self.mark_consumed(len(item))
        return item if isinstance(item, Batch) else list(item)

    def mark_consumed(self, count: int) -> None:
        """``count`` outcomes were taken by the consumer: once the backlog has halved, a
        throttled job reads inputs again (the I/O thread is woken)."""
        self.consumed += count
        if self.throttled and self.delivered - self.consumed <= config.MAX_PENDING_RESULTS // 2:
            self.throttled = False
            self.wake()

    @property
    def blob_bytes(self) -> int:
        return serialize.payload_size(self.blob)

    def done(self) -> bool:
        return self.exhausted and not self.retry and self.outstanding == 0

    def idle_due(self) -> float | None:
        """When a resumable job with nothing to send and nothing in flight ends (None for
        any other job): ``config.FEED_IDLE_S`` after its last input was read or
        answered."""
        if self.resumable is None or self.exhausted or self.outstanding or self.retry:
            return None
        return self.active_at + config.FEED_IDLE_S

    def close_if_idle(self, now: float) -> None:
        """End a resumable job idle past ``idle_due`` (I/O thread): its source closes,
        unless an input came for it meanwhile (its idle time then starts again)."""
        due = self.idle_due()
        if due is None or now < due:
            return
        assert self.resumable is not None
        if self.resumable.close_idle():
            self.exhausted = True
        else:
            self.active_at = now

    def batch_size(self, capacity: int) -> int:
        """Inputs for the next message: fixed by ``chunksize``, else sized so a batch keeps
        a worker busy about BATCH_TARGET_S, the map cut into whole rounds of equal
        messages (a round: one message per worker; a map of little work is one round),
        shrinking near the end so workers finish together."""
        size = self.typical_batch()
        if not self.chunksize and self.total:
            workers = max(capacity, 1)
            rounds = -(-self.total // (workers * size))
            size = -(-self.total // (rounds * workers))
            remaining = self.total - self.read
            share = -(-remaining // (2 * workers))
            size = max(1, min(size, max(share, self.smallest_batch()), remaining))
        return size

    def smallest_batch(self) -> int:
        """The fewest inputs worth a message near the end of a map: those that run
        ``config.BATCH_MIN_S``; a shorter message costs more in messaging than it
        evens out between workers."""
        if self.per_item_s is None:
            return 1
        return int(config.BATCH_MIN_S / max(self.per_item_s, 1e-9))

    def typical_batch(self) -> int:
        """Inputs per message away from the end of the map: ``chunksize``; one while the
        task time is unknown or a timeout applies (it is per input); else what fills
        BATCH_TARGET_S, within BATCH_MAX_ITEMS (BATCH_MAX_ITEMS_KNOWN for a map of known
        length) and, as far as the inputs' size is known, BATCH_MAX_BYTES."""
        if self.chunksize:
            return self.chunksize
        if self.timeout_s or self.per_item_s is None:
            return 1
        size = min(int(config.BATCH_TARGET_S / max(self.per_item_s, 1e-7)),
                   config.BATCH_MAX_ITEMS if self.total is None
                   else config.BATCH_MAX_ITEMS_KNOWN)
        if self.bytes_per_item:
            size = min(size, int(config.BATCH_MAX_BYTES / self.bytes_per_item))
        return max(1, size)

    def message_estimate(self, n: int) -> float | None:
        """Seconds a message of ``n`` inputs is expected to run (None: not known yet)."""
        return None if self.per_item_s is None else self.per_item_s * n

    # ------------------------------------------------------------------ retries

    def pick_retry(self, node: str, alone: bool) -> Task | None:
        """The first task waiting to be re-sent that may go to ``node``: one that failed
        there waits for another node, unless ``node`` is the only one."""
        for i, task in enumerate(self.retry):
            if alone or task.avoid != node:
                del self.retry[i]
                return task
        return None

    def requeue(self, task: Task, *, charge: bool, node: str = "", worker: str = "",
                sig: int = 0) -> None:
        """Send a task again. A worker crash (``charge``) costs an attempt; a crashed batch
        is split so an input that kills its worker is isolated. Out of attempts: each of
        its inputs fails with WorkerCrashed."""
        if self.cancelled:
            return
        if not charge:
            self.retry.append(task)
            return
        if task.attempts >= self.max_attempts:
            self.fail_task(task, node, worker, lambda i: WorkerCrashed(
                task.last_reason, task.attempts, signal=sig, index=i, node=node,
                worker=worker), CRASHED)
            return
        if len(task.indices) == 1:
            self.retry.append(Task(self, task.indices, task.payload, task.attempts + 1,
                                   task.last_reason, task.node_losses, task.avoid))
            return
        items = serialize.loads(task.payload)
        for index, item in zip(task.indices, items):
            self.retry.append(Task(self, [index], serialize.dumps([item]), task.attempts + 1,
                                   task.last_reason, task.node_losses, task.avoid))

    def timed_out(self, task: Task, node: str, worker: str) -> None:
        """The daemon killed the worker running ``task`` at its timeout: the input fails
        with TaskTimeout, unless the user allowed retries of timeouts."""
        if task.attempts <= self.timeout_retries:
            self.retry.append(Task(self, task.indices, task.payload, task.attempts + 1,
                                   f"timed out on {node}", task.node_losses, node))
            return
        timeout = self.timeout_s or 0.0
        self.fail_task(task, node, worker, lambda i: TaskTimeout(
            timeout, task.attempts, index=i, node=node, worker=worker), TIMEOUT)

    # ------------------------------------------------------------------ results

    def complete(self, task: Task, node: str, worker: str, oks: bytes,
                 starts: Sequence[float], ends: Sequence[float], payload: list[Any],
                 shared: list[int], raw: bool = False) -> int:
        """Deliver the outcomes of a result for ``task`` (``oks``: a byte per input,
        nonzero if it ran; the payload: the values, each pickled on its own, and outputs
        when captured). A value that cannot be unpickled here fails its own input with a
        ``RemoteError`` (whatever its unpickling raised, ``SystemExit`` included); a
        payload that cannot be read at all fails every input. ``raw``: the worker says
        every value is a plain scalar, sent as it is. Returns how many failed."""
        n = len(task.indices)
        try:
            if len(oks) != n:
                raise ValueError(f"{len(oks)} outcomes for {n} inputs")
            values, outputs = self._read_values(payload, shared, n)
        except BaseException as exc:  # noqa: B036 - unpickling may raise anything
            values = [_unreadable(exc)] * n
            outputs = [""] * n
            oks = bytes(n)
            if len(starts) != n:
                starts = ends = [0.0] * n
        self.learn(starts, ends, n)
        if self.columnar and not self.capture and oks.count(0) == 0:
            try:
                self.deliver(Batch(task.indices, values if raw else serialize.unseal_all(values),
                                   node, worker, starts, ends, task.attempts))
                return 0
            except BaseException:  # noqa: B036 - a value's own code ran: see each below
                pass
        outcomes: list[Outcome] = []
        attempts = task.attempts
        failed = 0
        for index, ok, value, start, end, output in zip(task.indices, oks, values, starts,
                                                        ends, outputs):
            if ok:
                try:
                    value = serialize.unseal(value)
                except BaseException as exc:  # noqa: B036 - the value's own code ran
                    ok, value = 0, _unreadable(exc)
            if ok:
                record = TaskRecord(index, node, worker, start, end, attempts, OK, "", output)
                outcomes.append((index, True, value, record))
                continue
            failed += 1
            error = remote_exception(value, index=index, node=node, worker=worker)
            info = describe(error)
            record = TaskRecord(index, node, worker, start, end, attempts, ERROR,
                                f"{info['type']}: {info['message']}", output)
            outcomes.append((index, False, error, record))
        self.deliver(outcomes)
        return failed

    def learn(self, starts: Sequence[float], ends: Sequence[float], n: int) -> None:
        """Fold a message's run times into the estimate of seconds per input: from the
        first start to the last end (what a worker spends per input, between inputs
        included), without a pass over every input."""
        per_item = max(0.0, ends[-1] - starts[0]) / n if n and len(ends) == n else 0.0
        self.per_item_s = _folded(self.per_item_s, per_item)

    def _read_values(self, payload: list[Any], shared: list[int], n: int
                     ) -> tuple[list[Any], list[str]]:
        values = serialize.loads(payload, shared)
        outputs = [""] * n
        if self.capture:
            values, outputs = values
        if not isinstance(values, list) or len(values) != n or len(outputs) != n:
            raise ValueError("result list of the wrong shape")
        return values, outputs

    def fail_task(self, task: Task, node: str, worker: str,
                  make_error: Callable[[int], TaskFailed], outcome: str) -> None:
        """Deliver every input of ``task`` as failed with ``make_error(index)``."""
        if self.cancelled:
            return
        now = time.time()
        outcomes: list[Outcome] = []
        for index in task.indices:
            error = make_error(index)
            record = TaskRecord(index, node, worker, now, now, task.attempts, outcome,
                                str(error))
            outcomes.append((index, False, error, record))
        self.deliver(outcomes)


def _folded(estimate: float | None, measured: float) -> float:
    """An estimate with a new measurement folded in (the mean of the two; the
    measurement itself when there is no estimate yet)."""
    return measured if estimate is None else 0.5 * (estimate + measured)


def _unreadable(exc: BaseException) -> dict[str, Any]:
    """The error info of a result that could not be unpickled here."""
    return {"type": "deathstar.ResultError",
            "message": f"the result could not be unpickled here: {exc!r}", "traceback": ""}
