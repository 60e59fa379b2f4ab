"""Keeping the nodes supplied: the engine's half that picks each node's next task
message (retries first, jobs in turn), sizes and pickles it, and sends it. It runs in
the engine's loop only (``Engine`` is a ``Supplier``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterable

from deathstar import config, protocol, shm
from deathstar.client.job import Job, JobInputError, Task
from deathstar.client.node import Node
from deathstar.client.sharing import MemoryLink


def large(nbytes: float) -> bool:
    """Whether a message of ``nbytes`` of inputs is large: it goes through shared memory to
    a node that shares this machine's (``shm.SHARED_MIN_BYTES``), a daemon in this loop
    takes it before the next is pickled (``Supplier.fill``), and neither its time in
    flight nor its node's lag is what a small message's is (``send_task``,
    ``message_shape``)."""
    return nbytes >= shm.SHARED_MIN_BYTES


class Supplier:
    """Tops every ready node up to its window with task messages."""

    jobs: dict[int, Job]
    memory: MemoryLink
    next_send_id: int
    #: ``fill`` stopped early, for a daemon in this thread to take what it sent first
    filling: bool = False

    if TYPE_CHECKING:  # what the engine (a Supplier) provides
        def ready_nodes(self) -> list[Node]: ...

        def send(self, node: Node, frames: list[Any]) -> None: ...

        def fail_job(self, job: Job, exc: BaseException) -> None: ...

    def fill(self) -> None:
        """Top every ready node up to its window, taking jobs in turn. A node whose daemon
        runs in this loop gets one message at a time while it may have idle workers, and
        after each large one: the daemon hands each to a worker, and reads the results
        that came meanwhile (its turn comes before ours again, ``filling``), before the
        next is pickled and written."""
        self.filling = False
        if not self.jobs:
            return
        ready = self.ready_nodes()
        capacity = 0
        for node in ready:
            capacity += node.capacity
        shape: tuple[bool, float | None] | None = None  # worked out if needed
        now = time.monotonic()
        for node in ready:
            if node.busy_until > now:
                continue
            # below both windows, whether the messages are short does not matter
            below_both = min(node.window(True), node.window(False))
            while True:
                if len(node.inflight) >= below_both:
                    if shape is None:
                        shape = self.message_shape()
                    if len(node.inflight) >= node.window(*shape):
                        break
                task = self.next_task(node, capacity, alone=len(ready) == 1)
                if task is None:
                    break
                self.send_task(node, task)
                if node.address.hosted and (len(node.inflight) <= node.capacity
                                            or large(task.nbytes)):
                    self.filling = True
                    break

    def message_shape(self) -> tuple[bool, float | None]:
        """Whether every job's messages are short, and then the longest a message of
        theirs is expected to run; None instead when a message of one of them is
        ``large``: such messages do not queue deeper to cover a node's lag
        (``Node.window``): each holds its memory while it waits, and its own transfer is
        most of what it spends in flight."""
        longest: float | None = 0.0
        for job in self.jobs.values():
            size = job.typical_batch()
            est = job.message_estimate(size)
            if est is None or est > config.PREFETCH_MAX_EST_S:
                return False, None
            if large((job.bytes_per_item or 0.0) * size):
                longest = None
            elif longest is not None:
                longest = max(longest, est)
        return True, longest

    def next_task(self, node: Node, capacity: int, alone: bool) -> Task | None:
        """The next task for ``node``: a retry first (unless it failed on this node and
        another node could take it), else a fresh batch; jobs take turns."""
        for job in list(self.jobs.values()):
            if job.cancelled:
                continue
            task = job.pick_retry(node.name, alone)
            if task is None and job.readable():
                task = self.read_batch(job, capacity)
            if task is None:
                continue
            # rotate jobs so concurrent maps share the nodes
            self.jobs.pop(job.id)
            self.jobs[job.id] = job
            return task
        return None

    def read_batch(self, job: Job, capacity: int) -> Task | None:
        """The job's next batch of fresh inputs; a job whose inputs cannot be read or
        pickled fails (its consumer raises why)."""
        try:
            return job.read_batch(capacity)
        except JobInputError as exc:
            self.fail_job(job, exc.cause)
            return None

    def send_task(self, node: Node, task: Task) -> None:
        """Send ``task`` to ``node`` (its function's blob first if the node lacks it)."""
        job = task.job
        has_blob = job.fn_hash in node.blobs_sent
        # a worker there is free and has what it needs but the inputs (not the function's
        # blob, fetched on the way): this message waits for nothing, and times the lag,
        # unless its inputs are large (their transfer would read as lag)
        task.sent_free_at = time.monotonic() if has_blob and not large(task.nbytes) \
            and len(node.inflight) < node.capacity else 0.0
        if not has_blob:
            self.send(node, protocol.pack(protocol.BLOB, job.blob, h=job.fn_hash))
            node.blobs_sent[job.fn_hash] = self.next_send_id
            node.bytes_sent += job.blob_bytes
        send_id = self.next_send_id
        self.next_send_id += 1
        node.inflight[send_id] = task
        job.outstanding += 1
        extra: dict[str, Any] = {}
        if job.seed is not None:
            extra.update({protocol.F_SEED: job.seed, protocol.F_IX: list(task.indices)})
        if job.plain is not None:
            extra[protocol.F_PLAIN] = True
        if job.capture:
            extra[protocol.F_CAP] = True
        est = job.message_estimate(len(task.indices))
        if est is not None:  # lets the daemon queue a message behind a short one
            extra[protocol.F_EST] = est
        payload = task.payload
        if node.shares_memory:  # large buffers through /dev/shm: one copy, both ways
            payload, fields = self.memory.share(send_id, payload)
            extra.update(fields)
        self.send(node, protocol.pack(protocol.TASK, payload, id=send_id, fn=job.fn_hash,
                                      n=len(task.indices), timeout=job.timeout_s, **extra))
        node.bytes_sent += task.nbytes

    def release(self, send_id: int, given_back: Iterable[int] = ()) -> None:
        """A sent task is answered, lost or dropped: its shared-memory files go, but for
        those its worker gave back (``MemoryLink.release``)."""
        self.memory.release(send_id, given_back)
