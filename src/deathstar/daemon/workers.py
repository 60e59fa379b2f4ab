"""The daemon's workers: their sessions (ready, results, lost, fetch, exit, silence), the
messages each holds (the one it runs, at most one prefetched behind a short one), which
worker is free next, and killing the ones whose message must stop (a timeout, a cancel, a
client gone). It talks to clients only through the two callbacks it is given: ``relay``
(a result's frames) and ``lost`` (task messages that will not be answered); both ignore a
client that is gone."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from typing import Any, Callable

import zmq

from deathstar import heartbeats, protocol
from deathstar.daemon.books import Assignment, BlobCache, Counters, WorkerConn
from deathstar.daemon.supervisor import Exited, Supervisor
from deathstar.protocol import Message

log = logging.getLogger("deathstar.daemon")

#: Relay a result (its frames, and their decoding) to the client with this identity.
Relay = Callable[[bytes, list[Any], Message], None]
#: Tell a client these task messages will not be answered: (client, ids, reason, worker,
#: code, sig).
Lost = Callable[..., None]
#: Queue a client's task message again, first (a worker gave it back unstarted).
Requeue = Callable[[bytes, Message], None]


class WorkerSessions:
    """The workers of one daemon, by identity. ``sock`` (the worker ROUTER) is set when
    the daemon binds."""

    def __init__(self, supervisor: Supervisor, counters: Counters, blobs: BlobCache, *,
                 heartbeat_s: float, node_name: str, capacity: Callable[[], int],
                 relay: Relay, lost: Lost, requeue: Requeue,
                 bad_message: Callable[[str, object], None]):
        self.supervisor = supervisor
        self.counters = counters
        self.blobs = blobs
        self.heartbeat_s = heartbeat_s
        self.node_name = node_name
        self.capacity = capacity
        self.relay = relay
        self.lost = lost
        self.requeue = requeue
        self.bad_message = bad_message
        self.sock: zmq.Socket[bytes] | Any = None
        self.workers: dict[bytes, WorkerConn] = {}
        self.idle: deque[bytes] = deque()  # workers holding nothing
        # workers that may take a message behind the short ones they hold (``listed``)
        self.prefetchable: deque[bytes] = deque()
        self.next_timeout = float("inf")  # the earliest deadline of a running task
        self.next_recall = float("inf")  # when a waiting message should move, if one should
        self.handlers: dict[str, Callable[[Any, list[Any], Message], None]] = {
            protocol.RESULT: self.on_result,
            protocol.LOST: self.on_lost,
            protocol.FETCH: self.on_fetch,
            protocol.HEARTBEAT: lambda worker, frames, msg: None,
            protocol.BYE: lambda worker, frames, msg: self.forget(
                worker, f"worker {worker.name} stopped", code=protocol.LOST_STOPPING),
        }

    def __len__(self) -> int:
        return len(self.workers)

    def busy(self) -> int:
        """Workers holding a message."""
        return sum(1 for w in self.workers.values() if w.assigned)

    def running_count(self) -> int:
        return sum(len(w.assigned) for w in self.workers.values())

    def kill_running(self, match: Callable[[Assignment], bool], why: str) -> None:
        """Stop running task messages that ``match``: a local worker is killed (and
        replaced); a hand-started one cannot be, so its result will be dropped."""
        for worker in list(self.workers.values()):
            if worker.assigned and match(worker.assigned[0]) and \
                    self.supervisor.owns(worker.pid):
                log.info("killing worker %s: %s", worker.name, why)
                self.counters.tasks_killed += 1
                self.supervisor.kill(worker.pid)
                self.forget(worker, f"worker {worker.name} killed: {why}")

    def enforce_timeouts(self, now: float) -> None:
        """Kill the workers whose task message ran past its deadline; the client is told
        ``timeout``, and a fresh worker replaces a local one. Sets the next deadline."""
        self.next_timeout = float("inf")
        for worker in list(self.workers.values()):
            if not worker.assigned:
                continue
            job = worker.assigned[0]
            if job.deadline is None:
                continue
            if now < job.deadline:
                self.next_timeout = min(self.next_timeout, job.deadline)
                continue
            reason = f"input ran past its timeout of {job.timeout_s:g} s"
            log.warning("worker %s: %s; killing it", worker.name, reason)
            self.counters.tasks_timed_out += 1
            self.supervisor.kill(worker.pid)
            self.forget(worker, reason, code=protocol.LOST_TIMEOUT)

    def task_started(self, job: Assignment) -> None:
        """A task message began running: its deadline may be the next one."""
        if job.deadline is not None:
            self.next_timeout = min(self.next_timeout, job.deadline)

    def greet(self, ident: bytes, user: str, msg: Message) -> None:
        try:
            for warning in protocol.handshake(msg.env["versions"],
                                              f"worker {msg.env['worker']}"):
                log.warning("%s", warning)
        except protocol.VersionMismatch as exc:
            log.warning("refused worker %s: %s", msg.env["worker"], exc)
            self.sock.send_multipart([ident, *protocol.refused(str(exc))])
            return
        if ident in self.workers:
            self.forget(self.workers[ident], "it said ready again")
        self.workers[ident] = WorkerConn(ident, msg.env["worker"], msg.env["pid"],
                                         heartbeats.clamp_heartbeat(msg.env["hb"]),
                                         time.monotonic(), user=user)
        self.idle.append(ident)
        self.sock.send_multipart([ident, *protocol.welcome(
            self.heartbeat_s, self.node_name, self.capacity())])

    def on_result(self, worker: WorkerConn, frames: list[Any], msg: Message) -> None:
        job = worker.take(msg.env["id"])
        if job is None:
            self.bad_message("workers", f"result for a task worker {worker.name} does not hold")
            return
        self.counters.tasks_done += job.n
        self.slot_freed(worker)
        self.relay(job.client, frames, msg)

    def on_lost(self, worker: WorkerConn, frames: list[Any], msg: Message) -> None:
        for send_id in msg.env["ids"]:
            job = worker.take(send_id) if isinstance(send_id, int) else None
            if job is None:
                continue
            self.slot_freed(worker)
            if job.recalled and job.msg is not None and \
                    msg.env.get(protocol.F_CODE) == protocol.LOST_UNSTARTED:
                self.counters.tasks_recalled += 1
                self.requeue(job.client, job.msg)  # given back: an idle worker takes it
            else:  # the worker could not get the function
                self.lost(job.client, [job.id], msg.env["reason"], worker.name,
                          code=protocol.LOST_BLOB)

    def slot_freed(self, worker: WorkerConn) -> None:
        """A message left ``worker``: it is idle, or may take a message behind its short
        current one."""
        if not worker.assigned:
            self.idle.append(worker.ident)
            return
        self.task_started(worker.assigned[0])  # the one waiting behind started (take)
        self.list_prefetchable(worker)

    def list_prefetchable(self, worker: WorkerConn) -> None:
        """Put ``worker`` on the ``prefetchable`` list if it may take another message
        behind those it holds and is not on it already."""
        if not worker.listed and worker.can_prefetch():
            worker.listed = True
            self.prefetchable.append(worker.ident)

    def on_fetch(self, worker: WorkerConn, frames: list[Any], msg: Message) -> None:
        payload = self.blobs.get(msg.env["h"])
        if payload is None:
            reply = protocol.pack(protocol.MISSING, h=msg.env["h"])
        else:
            reply = protocol.pack(protocol.BLOB, payload, h=msg.env["h"])
        self.sock.send_multipart([worker.ident, *reply], copy=False)

    def on_exit(self, exited: Exited) -> None:
        for worker in list(self.workers.values()):
            if worker.pid == exited.pid:
                self.forget(worker, f"worker {worker.name} died: {exited.reason}",
                                   sig=max(0, -exited.returncode), running=exited.running)

    def expire(self, now: float) -> None:
        """Drop workers silent past the liveness window (a hung process cannot beat);
        a local one is killed so the supervisor starts a fresh one."""
        for worker in list(self.workers.values()):
            if now - worker.last_seen > heartbeats.liveness_window(worker.heartbeat_s,
                                                                 self.heartbeat_s):
                reason = f"worker {worker.name} hung: silent for {now - worker.last_seen:.1f} s"
                log.warning("%s", reason)
                if self.supervisor.owns(worker.pid):
                    self.supervisor.kill(worker.pid)
                self.forget(worker, reason)

    def forget(self, worker: WorkerConn, reason: str, code: str = protocol.LOST_CRASH,
               sig: int = 0, running: int | None = None) -> None:
        """Drop a worker; the tasks it held are reported lost to their clients: the one it
        ran with ``code`` (a crash costs that message an attempt), those waiting behind
        it as ``unstarted`` (they never ran: sent again at no cost). ``running``: the id its
        slot file says it last started; when that is a later one, it had finished those
        before it, whose results died with it: they go again at no cost instead."""
        self.workers.pop(worker.ident, None)
        try:
            self.idle.remove(worker.ident)
        except ValueError:
            pass
        for position, job in enumerate(worker.crash_order(running)):
            self.counters.tasks_lost += 1
            if position == 0:
                self.lost(job.client, [job.id], reason, worker.name, code=code, sig=sig)
            else:
                self.lost(job.client, [job.id], f"{reason} before it started, or before "
                          "its result left", worker.name, code=protocol.LOST_UNSTARTED)
        worker.assigned.clear()

    def free_worker(self, own: bool = False) -> WorkerConn | None:
        """An idle worker, else one that may take a message behind its short one (stale
        entries are skipped), else None. The worker is taken off its list. ``own``: only
        one this daemon started (it reads this machine's shared memory, as the daemon
        does; a hand-started worker may run anywhere)."""
        for i, ident in enumerate(self.idle):
            if not own or self.supervisor.owns(self.workers[ident].pid):
                del self.idle[i]
                return self.workers[ident]
        passed: list[bytes] = []
        found = None
        while self.prefetchable:
            ident = self.prefetchable.popleft()
            worker = self.workers.get(ident)
            if worker is None:
                continue  # gone
            if not worker.can_prefetch():
                worker.listed = False  # stale: listed again when it may take one
                continue
            if own and not self.supervisor.owns(worker.pid):
                passed.append(ident)
                continue
            worker.listed = False
            found = worker
            break
        self.prefetchable.extendleft(reversed(passed))
        return found

    def assign(self, worker: WorkerConn, client: bytes, msg: Message) -> None:
        """Give ``worker`` a client's task message: it runs it now if it holds nothing,
        else (short ones held) right after them."""
        job = Assignment(client, msg.env["id"], msg.env["n"], msg.env["timeout"],
                         est_s=protocol.task_estimate(msg.env))
        worker.assigned.append(job)
        if len(worker.assigned) > 1:
            job.msg = msg  # it waits: keep it, should it have to move
            self.counters.tasks_prefetched += 1
        else:
            job.start(time.monotonic())
            self.task_started(job)
        self.list_prefetchable(worker)
        self.sock.send_multipart([worker.ident, msg.raw, *msg.payload], copy=False)

    def rebalance(self, now: float) -> None:
        """With idle workers and nothing queued: ask back the messages waiting behind ones
        that overran their estimate, all those of one worker per idle worker (a prefetch
        must never cost the makespan; given back, they go to the idle workers). Sets
        ``next_recall`` for the loop's deadline."""
        self.next_recall = float("inf")
        spare = len(self.idle)
        for worker in self.workers.values():
            if spare <= 0:
                return
            if len(worker.assigned) < 2:
                continue  # (most workers: no list made for them, turn after turn)
            waiting = [job for job in itertools.islice(worker.assigned, 1, None)
                       if not job.recalled]
            if not waiting:
                continue
            due = worker.assigned[0].overdue()
            if due is None:
                continue
            if now < due:
                self.next_recall = min(self.next_recall, due)
                continue
            for job in waiting:
                job.recalled = True
            spare -= 1
            self.sock.send_multipart([worker.ident,
                                      *protocol.recall([job.id for job in waiting])])
