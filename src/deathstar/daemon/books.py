"""What a daemon knows of its peers: clients (their queues, liveness, blobs) and workers
(the task messages they hold), plus the blobs it caches for them, its counters and a
rate-limited log."""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from deathstar import config
from deathstar.protocol import Message
from deathstar.serialize import payload_size
from deathstar.slot import slot_value

log = logging.getLogger("deathstar.daemon")


@dataclass
class ClientConn:
    """A client that said hello: its queued task messages and its liveness."""

    ident: bytes
    heartbeat_s: float
    last_seen: float
    last_sent: float = 0.0
    user: str = ""  # the authenticated key that opened the session ("" without keys)
    queue: deque[Message] = field(default_factory=deque)
    queued_bytes: int = 0  # payload bytes of the queued messages
    blobs: set[str] = field(default_factory=set)

    def has_room(self, msg: Message, max_messages: int, max_bytes: int) -> bool:
        """Whether ``msg`` may queue: an empty queue takes any one message; else both
        bounds must hold with it."""
        if not self.queue:
            return True
        return (len(self.queue) < max_messages
                and self.queued_bytes + _size(msg) <= max_bytes)

    def enqueue(self, msg: Message) -> None:
        self.queue.append(msg)
        self.queued_bytes += _size(msg)

    def enqueue_first(self, msg: Message) -> None:
        """Put back a message a worker gave back unstarted: it goes next."""
        self.queue.appendleft(msg)
        self.queued_bytes += _size(msg)

    def dequeue(self) -> Message:
        msg = self.queue.popleft()
        self.queued_bytes -= _size(msg)
        return msg

    def keep(self, wanted: Callable[[Message], bool]) -> list[Message]:
        """Keep the queued messages ``wanted`` says to; returns the others."""
        dropped = [m for m in self.queue if not wanted(m)]
        self.queue = deque(m for m in self.queue if wanted(m))
        self.queued_bytes = sum(_size(m) for m in self.queue)
        return dropped


def _size(msg: Message) -> int:
    """Its payload's bytes (worked out once: a queued message is weighed three times)."""
    if msg.size < 0:
        msg.size = payload_size(msg.payload)
    return msg.size


class BlobCache:
    """Function-and-common-argument blobs by content hash, at most ``limit_bytes`` of
    them and at most ``limit_entries``: past either the least recently used go first (the
    newest always stays). Each entry counts ``ENTRY_OVERHEAD`` bytes besides its frames,
    so that empty blobs are not free. Evicting is safe: a task or a worker's fetch naming
    a blob that is gone is answered lost with code ``blob``, and the client sends the blob
    again."""

    #: Bytes an entry costs besides its frames (its key, frames list, bookkeeping).
    ENTRY_OVERHEAD = 1024

    def __init__(self, limit_bytes: int, limit_entries: int = 4096):
        self.limit_bytes = limit_bytes
        self.limit_entries = limit_entries
        self.bytes = 0
        self.evicted = 0
        self._blobs: OrderedDict[str, tuple[list[Any], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blobs)

    def put(self, h: str, payload: list[Any]) -> int:
        """Cache a blob (the most recently used now); returns its size in bytes."""
        self.discard(h)
        size = payload_size(payload) + self.ENTRY_OVERHEAD
        self._blobs[h] = (payload, size)
        self.bytes += size
        while (self.bytes > self.limit_bytes or len(self._blobs) > self.limit_entries) \
                and len(self._blobs) > 1:
            old, (_, old_size) = self._blobs.popitem(last=False)
            self.bytes -= old_size
            self.evicted += 1
            log.info("blob cache over %d bytes or %d entries: dropped blob %s (%d bytes)",
                     self.limit_bytes, self.limit_entries, old, old_size)
        return size

    def get(self, h: str) -> list[Any] | None:
        """The blob, now the most recently used; None if not cached."""
        entry = self._blobs.get(h)
        if entry is None:
            return None
        self._blobs.move_to_end(h)
        return entry[0]

    def discard(self, h: str) -> None:
        entry = self._blobs.pop(h, None)
        if entry is not None:
            self.bytes -= entry[1]


@dataclass
class Assignment:
    """A task message a worker holds: whose, its id, its inputs, when it times out, and
    whether it is short enough (by its client's estimate) for the worker to hold another
    message behind it."""

    client: bytes
    id: int
    n: int
    timeout_s: float | None
    deadline: float | None = None  # monotonic, set when it starts running; None: no limit
    est_s: float | None = None  # the client's estimate of its run time
    started: float | None = None  # monotonic, when it became the message the worker runs
    msg: Message | None = None  # kept while it waits behind another: it may be recalled
    recalled: bool = False  # asked back from its worker (which may have started it)

    @property
    def short(self) -> bool:
        """Its client expects it to run at most ``config.PREFETCH_MAX_EST_S``."""
        return self.est_s is not None and self.est_s <= config.PREFETCH_MAX_EST_S

    def start(self, now: float) -> None:
        """It is now the message the worker runs: its timeout starts."""
        self.started = now
        self.msg = None
        if self.timeout_s:
            self.deadline = now + self.timeout_s * self.n

    def overdue(self) -> float | None:
        """When a message waiting behind this one should move to an idle worker: once this
        one has run past twice its estimate (plus 10 ms). None when it has not started or
        has no estimate."""
        if self.started is None or self.est_s is None:
            return None
        return self.started + max(2 * self.est_s, 0.01) + 0.01


@dataclass
class WorkerConn:
    """A worker that said ready, and the task messages it holds: the one it runs first,
    then those prefetched behind it (``can_prefetch``; the worker reads each as soon as
    it is done with the one before)."""

    ident: bytes
    name: str
    pid: int
    heartbeat_s: float
    last_seen: float
    user: str = ""  # the authenticated key that opened the session ("" without keys)
    assigned: deque[Assignment] = field(default_factory=deque)
    listed: bool = False  # in its pool's ``prefetchable`` list (once at most)

    def can_prefetch(self) -> bool:
        """Another message may wait behind those it holds: it runs a short one and holds
        no other, or it holds fewer than ``config.PREFETCH_WORKER_MAX``, all short, and
        those waiting are expected to run less than ``config.PREFETCH_COVER_S`` in all."""
        held = self.assigned
        if not held or not held[0].short:
            return False
        if len(held) == 1:
            return True
        if len(held) >= config.PREFETCH_WORKER_MAX:
            return False
        waiting = 0.0
        for job in itertools.islice(held, 1, None):
            if not job.short:
                return False
            waiting += job.est_s or 0.0  # (a short one has an estimate)
        return waiting < config.PREFETCH_COVER_S

    def crash_order(self, running: int | None) -> list[Assignment]:
        """The messages it held, the one it died running first: its first, unless its slot
        file says it had started a later one (``running``, a slot value), whose result had
        not left: then that one, those behind it, and those before it (finished, their
        results gone with it)."""
        held = list(self.assigned)
        if running is not None and held and slot_value(held[0].id) != running:
            for position, job in enumerate(held):
                if slot_value(job.id) == running:
                    return held[position:] + held[:position]
        return held

    def take(self, send_id: int) -> Assignment | None:
        """Remove and return the first message it holds with this id (the worker answers
        in the order it was given them, save a message parked while its function was
        fetched); the next one starts running."""
        for i, job in enumerate(self.assigned):
            if job.id == send_id:
                del self.assigned[i]
                if i == 0 and self.assigned:
                    self.assigned[0].start(time.monotonic())
                return job
        return None


@dataclass
class Counters:
    tasks_done: int = 0
    tasks_lost: int = 0
    tasks_timed_out: int = 0
    tasks_killed: int = 0  # running tasks of clients that cancelled or vanished
    tasks_prefetched: int = 0  # messages given to a worker behind its current one
    tasks_busy: int = 0  # messages answered "busy": their client's queue was full
    tasks_recalled: int = 0  # messages given back unstarted by a busy worker, to move
    blobs_received: int = 0  # functions + common arguments, each sent once per client
    blob_bytes_received: int = 0
    bad_messages: int = 0


class RateLimitedLog:
    """At most one log line per ``interval_s``; says how many were suppressed."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.next_at = 0.0
        self.suppressed = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return
        if self.suppressed:
            msg += f" ({self.suppressed} similar lines suppressed)"
        log.warning(msg, *args)
        self.suppressed = 0
        self.next_at = now + self.interval_s
