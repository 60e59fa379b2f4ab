"""The client's I/O loop (``reactor``: a thread of its own, or the embedded daemon's): it
owns every socket to every node, keeps each node supplied with task messages in
proportion to its capacity (``supply.Supplier``), and hands results to the threads that
consume them. User threads talk to it only through ``Engine.submit`` / ``cancel`` /
``close`` (a command queue, and ``Reactor.wake``); it answers through each job's queue.

Loop: poll until the next deadline -> handle node messages -> handle commands ->
housekeeping (handshake deadlines, heartbeats, liveness, reconnects) -> top nodes up ->
finish jobs. One map is one ``Job``; one message to a node is one ``Task`` (a batch of
inputs). A task is matched to its result by a send id that is new at every send, so a late
result of a task that was sent again elsewhere is recognised and dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Mapping

import zmq

from deathstar import config, heartbeats, protocol, shm
from deathstar.errors import TaskFailed, WorkerCrashed
from deathstar.keys import ClientKeys
from deathstar.nodes import NodeAddress
from deathstar.protocol import Message
from deathstar.reactor import Reactor
from deathstar.client import links
from deathstar.client.job import FINISHED, Job
from deathstar.client.outcomes import Outcome
from deathstar.client.lost import LOST_HANDLERS, lost_crash
from deathstar.client.sharing import MemoryLink
from deathstar.client.supply import Supplier
from deathstar.client.node import (BUSY_BACKOFF_MIN_S, CONNECTING, DOWN, READY, RECONNECT_MAX_S,
                                   RECONNECT_MIN_S, REFUSED, UNREACHABLE, Node)
from deathstar.report import CRASHED

if TYPE_CHECKING:
    from deathstar.daemon.loop import Daemon

log = logging.getLogger("deathstar.client")

#: Functions whose seconds per input the client remembers for their next jobs.
ESTIMATES_KEPT = 256


class NoNodesError(ConnectionError):
    """No node of the cluster could be used; the message names each and why."""


class Engine(Supplier):
    """The I/O loop. Construct, ``start()``, wait on ``connected``, submit jobs.

    It runs in ``reactor``'s thread (the embedded daemon's loop, for a cluster that uses
    one: a message between them then changes no thread), or in a thread of its own."""

    def __init__(self, addresses: list[NodeAddress], *, connect_timeout: float,
                 heartbeat_s: float = config.HEARTBEAT_INTERVAL_S,
                 keys: ClientKeys | None = None, reactor: Reactor | None = None,
                 hosts: Mapping[str, Daemon] | None = None):
        self.reactor = reactor or Reactor("deathstar-client")
        # daemons running in ``reactor`` itself, by their name: reached in memory
        self.hosts = hosts or {}
        self.started = False
        self.ended = threading.Event()  # the loop has closed every socket
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.nodes = [Node(a) for a in addresses]
        self.connect_timeout = connect_timeout
        self.heartbeat_s = heartbeat_s
        self.keys = keys
        self.jobs: dict[int, Job] = {}
        self.commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.connected = threading.Event()  # every node answered or timed out
        self.closing = False
        self.crashed: BaseException | None = None
        self.next_send_id = 1
        # large buffers for nodes that prove they share this machine's /dev/shm
        self.memory = MemoryLink()
        self.late_results = 0
        # the seconds per input of the functions run lately (by hash), and the pickled
        # bytes of their inputs (``Job.bytes_per_item``): their next jobs start from them
        self.estimates: OrderedDict[str, tuple[float, float | None]] = OrderedDict()
        self.snapshot: list[dict[str, Any]] = []
        self.next_snapshot = 0.0
        self.stall = heartbeats.StallClock(heartbeat_s, time.monotonic())
        self.handlers: dict[str, Callable[[Node, Message], None]] = {
            protocol.WELCOME: self.on_welcome,
            protocol.REFUSED: self.on_refused,
            protocol.RESULT: self.on_result,
            protocol.LOST: self.on_lost,
            protocol.HEARTBEAT: self.on_heartbeat,
        }
        self.command_handlers: dict[str, Callable[[Any], None]] = {
            "job": self.add_job,
            "cancel": self.cancel_job,
            "close": self.start_closing,
            "wake": lambda _: None,  # the loop goes round and tops the nodes up
        }

    # ------------------------------------------------------------------ user side

    def submit(self, job: Job) -> None:
        """Start ``job`` (any thread); its outcomes arrive on ``job.out``."""
        job.wake = self.wake
        self._command("job", job)

    def cancel(self, job: Job) -> None:
        self._command("cancel", job)

    def wake(self) -> None:
        """Make the loop go round (a consumer caught up with a throttled job)."""
        self._command("wake", None)

    def start(self) -> None:
        """Run the loop (returns at once; ``connected`` is set once every node answered
        or timed out)."""
        self.started = True
        self.reactor.add(self)

    def is_alive(self) -> bool:
        """Started and not ended."""
        return self.started and not self.ended.is_set()

    def on_loop_thread(self) -> bool:
        """Whether the caller runs in this engine's loop (which cannot wait for itself)."""
        return self.reactor.owns_thread()

    def close(self) -> None:
        """Say goodbye to every node and end the loop; returns when it has ended. Raises
        RuntimeError when called from the loop's own thread."""
        if self.is_alive():
            if self.on_loop_thread():
                raise RuntimeError("a client's engine cannot be closed from its own loop")
            self._command("close", None)
            self.ended.wait()

    def _command(self, what: str, arg: Any) -> None:
        self.commands.put((what, arg))
        self.reactor.wake()

    def ready_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.state == READY]

    # ------------------------------------------------------------------ main loop

    # ------------------------------------------------------------------ the loop's part

    def begin(self) -> None:
        now = time.monotonic()
        for node in self.nodes:
            self.connect(node, now)

    def pollables(self) -> tuple[Any, ...]:
        """Every node socket (a hosted daemon's link is no socket: ``has_input``)."""
        return tuple(n.link.pollable for n in self.nodes
                     if n.link is not None and n.link.pollable is not None)

    def has_input(self) -> bool:
        """A command, or a hosted daemon's message, waits, or ``fill`` has more to send."""
        if self.filling or not self.commands.empty():
            return True
        for node in self.nodes:  # (a loop: this runs several times a turn)
            if node.link is not None and node.link.has_mail():
                return True
        return False

    def deadline(self) -> float:
        return self.next_deadline(time.monotonic())

    def step(self, ready: dict[Any, int], now: float) -> bool:
        """Read what is ready, run the commands, housekeeping, top the nodes up, finish
        jobs; False once closing."""
        for node in self.nodes:
            if node.link is not None and (node.link.pollable in ready
                                          or node.link.has_mail()):
                self.drain(node)
        self.run_commands()
        self.housekeeping(time.monotonic())
        self.fill()
        self.finish_jobs(time.monotonic())
        return not self.closing

    def failed(self, exc: BaseException) -> None:
        """A bug here must reach the user, not hang them."""
        log.error("the client's I/O loop failed", exc_info=exc)
        self.crashed = exc
        for job in self.jobs.values():
            job.end(exc)
        self.connected.set()

    def end(self) -> None:
        try:
            for node in self.nodes:
                self.disconnect(node, say_bye=True)
            self.memory.close()
        finally:
            self.ended.set()

    def next_deadline(self, now: float) -> float:
        """When the loop must wake with no message: heartbeats, handshake and reconnect
        deadlines, a busy node's back-off, the node figures' refresh while a map runs and
        the end of an idle executor's job (an idle connected client wakes once a
        heartbeat interval)."""
        deadlines = [now + self.heartbeat_s]
        if self.jobs:
            deadlines.append(self.next_snapshot)
            for job in self.jobs.values():
                if job.held:
                    deadlines.append(job.held_due())
                idle = job.idle_due()
                if idle is not None:
                    deadlines.append(idle)
        deadlines += [n.busy_until for n in self.nodes if n.busy_until > now]
        deadlines += [n.deadline for n in self.nodes if n.state in (CONNECTING, DOWN)]
        return min(deadlines)

    def drain(self, node: Node) -> None:
        while node.link is not None:
            frames = node.link.take()
            if frames is None:
                return
            msg = protocol.in_memory(frames)  # a hosted daemon's: decoded there
            try:
                if msg is None:
                    msg = protocol.decode(frames)
            except protocol.ProtocolError as exc:
                log.warning("dropped a bad message from node %s: %s", node.name, exc)
                if isinstance(exc, protocol.VersionMismatch):
                    self.mark_failed(node, REFUSED, f"node {node.name}: {exc}")
                continue
            node.last_seen = time.monotonic()
            handler = self.handlers.get(msg.type)
            if handler is None:
                log.warning("dropped an unexpected %s message from node %s", msg.type,
                            node.name)
            else:
                handler(node, msg)

    def run_commands(self) -> None:
        while True:
            try:
                what, arg = self.commands.get_nowait()
            except queue.Empty:
                return
            self.command_handlers[what](arg)

    def add_job(self, job: Job) -> None:
        known = self.estimates.get(job.fn_hash)
        if known is not None and job.per_item_s is None:  # it starts with big batches
            job.per_item_s, job.bytes_per_item = known
        self.jobs[job.id] = job
        self.fail_if_no_nodes()

    def start_closing(self, _: None) -> None:
        self.closing = True

    # ------------------------------------------------------------------ connections

    def connect(self, node: Node, now: float) -> None:
        host = self.hosts.get(node.address.hosted or "")
        node.link = host.connect_hosted() if host is not None else links.open_socket(
            self.ctx, node.address, self.heartbeat_s, self.keys)
        if node.state != DOWN:
            node.state = CONNECTING
            node.deadline = now + self.connect_timeout
        self.send(node, self.hello())

    def hello(self) -> list[Any]:
        return protocol.hello(self.heartbeat_s, self.memory.probe_path())

    def disconnect(self, node: Node, say_bye: bool = False) -> None:
        if node.link is None:
            return
        if say_bye and node.state == READY:
            try:
                node.link.send_multipart(protocol.pack(protocol.BYE), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            node.link.close(linger=200)
        else:
            node.link.close(linger=0)
        node.link = None

    def send(self, node: Node, frames: list[Any]) -> None:
        assert node.link is not None
        node.link.send_multipart(frames, copy=False)
        node.last_sent = time.monotonic()

    def mark_failed(self, node: Node, state: str, error: str) -> None:
        """A node that cannot be used now: unreachable, refused, or gone down."""
        log.warning("%s", error)
        node.state, node.error = state, error
        self.requeue_inflight(node)
        node.blobs_sent.clear()
        self.check_connected()
        self.fail_if_no_nodes()

    def check_connected(self) -> None:
        if all(n.state != CONNECTING for n in self.nodes):
            self.connected.set()

    def fail_if_no_nodes(self) -> None:
        """With no node ready or still connecting, every job fails with NoNodesError."""
        if any(n.state in (READY, CONNECTING) for n in self.nodes):
            return
        if not self.jobs:
            return
        error = NoNodesError(self.no_nodes_message())
        for job in list(self.jobs.values()):
            job.end(error)
            self.jobs.pop(job.id, None)

    def no_nodes_message(self) -> str:
        lines = [f"  {n.name}: {n.error or n.state}" for n in self.nodes]
        return "no node of the cluster can be used:\n" + "\n".join(lines)

    # ------------------------------------------------------------------ node messages

    def on_welcome(self, node: Node, msg: Message) -> None:
        try:
            for warning in protocol.handshake(msg.env["versions"], f"node {node.name}"):
                log.warning("%s", warning)
        except protocol.VersionMismatch as exc:
            self.mark_failed(node, REFUSED, str(exc))
            self.disconnect(node)
            return
        node.state, node.error = READY, ""
        node.capacity = max(0, int(msg.env["workers"]))
        node.heartbeat_s = heartbeats.clamp_heartbeat(msg.env["hb"])
        node.hostname = str(msg.env["node"])
        node.versions = dict(msg.env["versions"])
        node.shares_memory = self.memory.proved_by(msg)
        node.backoff_s = RECONNECT_MIN_S
        self.check_connected()

    def on_refused(self, node: Node, msg: Message) -> None:
        hello_first = msg.env.get(protocol.F_CODE) == protocol.REFUSED_HELLO
        if hello_first and node.state == CONNECTING:
            # A restarted daemon answers each message that was queued while it was down
            # with "say hello first"; the hello we sent after the first one is on its way.
            return
        if hello_first and node.state == READY:
            # The daemon does not know us (it restarted): our tasks there are gone.
            node.downs += 1
            self.requeue_inflight(node)
            node.blobs_sent.clear()
            node.state = CONNECTING
            node.deadline = time.monotonic() + self.connect_timeout
            self.send(node, self.hello())
            return
        self.mark_failed(node, REFUSED, f"node {node.name} refused us: {msg.env['reason']}")
        self.disconnect(node)

    def on_heartbeat(self, node: Node, msg: Message) -> None:
        workers = msg.env.get(protocol.F_WORKERS)
        if workers is not None:
            node.capacity = workers

    def on_result(self, node: Node, msg: Message) -> None:
        task = node.inflight.pop(msg.env["id"], None)
        self.release(msg.env["id"], msg.env.get(protocol.F_FREE, ()))
        try:
            shared = protocol.shared_frames(msg)
        except protocol.ProtocolError as exc:
            log.warning("node %s: %s", node.name, exc)
            shared = []
        if task is None or task.job.cancelled:
            shm.discard_shared(msg.payload, shared)
        if task is None:
            self.late_results += 1  # its task was already re-run elsewhere
            return
        job = task.job
        job.outstanding -= 1
        node.busy_backoff_s = BUSY_BACKOFF_MIN_S
        if job.cancelled:
            return
        oks, starts, ends = protocol.result_outcomes(msg)
        if task.sent_free_at and len(ends):
            node.learn_lag(time.monotonic() - task.sent_free_at - (ends[-1] - starts[0]))
        failed = job.complete(task, node.name, msg.env["worker"], oks, starts, ends,
                              msg.payload, shared, raw=bool(msg.env.get(protocol.F_RAW)))
        node.done += len(task.indices) - failed
        node.failed += failed
        if job.per_item_s is not None:
            self.estimates[job.fn_hash] = (job.per_item_s, job.bytes_per_item)
            self.estimates.move_to_end(job.fn_hash)
            if len(self.estimates) > ESTIMATES_KEPT:
                self.estimates.popitem(last=False)

    def on_lost(self, node: Node, msg: Message) -> None:
        """The node will not answer these tasks; ``code`` says why, and ``LOST_HANDLERS``
        what to do about it (an unknown or missing code is a crash)."""
        handler = LOST_HANDLERS.get(msg.env.get(protocol.F_CODE, protocol.LOST_CRASH),
                                    lost_crash)
        for send_id in msg.env["ids"]:
            task = node.inflight.pop(send_id, None)
            if task is None:
                continue
            self.release(send_id)
            task.job.outstanding -= 1
            handler(node, send_id, task, msg)

    # ------------------------------------------------------------------ retries

    def requeue_inflight(self, node: Node) -> None:
        """A node was lost: its tasks go to other nodes, charged to their node-loss
        budget, not to their attempts."""
        for send_id, task in node.inflight.items():
            self.release(send_id)
            task.job.outstanding -= 1
            task.node_losses += 1
            task.avoid = node.name
            if task.node_losses > config.MAX_NODE_LOSSES:
                task.last_reason = f"node {node.name} lost ({node.error or 'silent'})"
                task.job.fail_task(task, node.name, "", lambda i: WorkerCrashed(
                    f"its node was lost {task.node_losses} times; last: {task.last_reason}",
                    task.attempts, index=i, node=node.name), CRASHED)
            else:
                task.job.requeue(task, charge=False)
        node.inflight.clear()

    def cancel_job(self, job: Job) -> None:
        """Stop a job: what is queued at the nodes is dropped there; then FINISHED."""
        self.abort_job(job)
        job.end(FINISHED)

    def fail_job(self, job: Job, exc: BaseException) -> None:
        """Stop a job whose inputs cannot be sent; its consumer raises ``exc``."""
        self.abort_job(job)
        job.end(exc)

    def abort_job(self, job: Job) -> None:
        job.cancelled = True
        self.jobs.pop(job.id, None)
        for node in self.nodes:
            ids = [sid for sid, t in node.inflight.items() if t.job is job]
            for sid in ids:
                del node.inflight[sid]
                self.release(sid)
            if ids and node.link is not None and node.state == READY:
                self.send(node, protocol.cancel(ids))

    # ------------------------------------------------------------------ housekeeping

    def housekeeping(self, now: float) -> None:
        if self.stall.stalled(now):  # we were frozen, not the nodes silent
            for node in self.nodes:
                node.last_seen = max(node.last_seen, now)
        for node in self.nodes:
            if node.state == CONNECTING and now >= node.deadline:
                self.disconnect(node)
                hint = "" if self.keys is None else (
                    f" (connecting with the keys in {self.keys.folder}: a node without "
                    "keys, or with other keys, does not answer either)")
                self.mark_failed(node, UNREACHABLE,
                                 f"node {node.name} ({node.address.exec_endpoint}) did not "
                                 f"answer within {self.connect_timeout:g} s{hint}")
            elif node.state == READY:
                if now - node.last_seen > heartbeats.liveness_window(node.heartbeat_s,
                                                                   self.heartbeat_s):
                    self.node_down(node, now, f"node {node.name} silent for "
                                              f"{now - node.last_seen:.1f} s")
                elif now - node.last_sent >= self.heartbeat_s * 0.9:
                    self.send(node, protocol.heartbeat())
            elif node.state == DOWN and now >= node.deadline:
                self.disconnect(node)
                self.connect(node, now)
                node.deadline = now + node.backoff_s
                node.backoff_s = min(node.backoff_s * 2, RECONNECT_MAX_S)
        if now >= self.next_snapshot or not self.jobs:
            self.next_snapshot = now + config.NODE_FIGURES_S
            self.take_snapshot(now)
        if not self.jobs:
            self.memory.trim(now)

    def node_down(self, node: Node, now: float, reason: str) -> None:
        node.downs += 1
        self.disconnect(node)
        self.mark_failed(node, DOWN, reason + "; its tasks go to other nodes")
        node.deadline = now + node.backoff_s

    def take_snapshot(self, now: float) -> None:
        self.snapshot = [node.stats(now, self.late_results) for node in self.nodes]

    def finish_jobs(self, now: float) -> None:
        """End the jobs that are done (an executor's that stayed idle too); hand over
        the outcomes held long enough."""
        for job in list(self.jobs.values()):
            job.close_if_idle(now)
            if job.done():
                del self.jobs[job.id]
                job.end(FINISHED)
            else:
                job.hand_held(now)


__all__ = ["Engine", "Job", "NoNodesError", "Outcome", "FINISHED", "TaskFailed"]
