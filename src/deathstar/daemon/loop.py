"""The daemon: one per node. Routes task messages from clients to workers and their
results back, and answers status queries. A worker gets a message when idle, and a
second one behind it when its current one is short (by the client's estimate), so it
never waits a round trip between short messages yet cannot hoard long ones. It reads
envelopes only: payload frames pass through untouched and are never unpickled here.

Sockets (all ROUTER; the identity frame comes first on every message received):

    exec    clients' DEALERs: hello, blob, task, cancel, heartbeat, bye
    workers the workers' DEALERs, over ipc for local ones and tcp for hand-started ones
    status  anyone: a status request gets the status map back
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections import deque
from typing import Any, Callable

import zmq

from deathstar import config, heartbeats, protocol, scratch
from deathstar.reactor import Reactor
from deathstar.daemon.guard import check_bind
from deathstar.keys import CLIENTS, WORKERS, Gatekeeper, ServerKeys
from deathstar.daemon.hosted import HOSTED_CLIENT, HostedPeer
from deathstar.daemon.sockets import Links, Ports
from deathstar.pipelink import DaemonPipe
from deathstar.daemon.books import BlobCache, ClientConn, Counters, WorkerConn
from deathstar.daemon.clients import ClientSessions
from deathstar.daemon.routing import OWN_WORKERS, Port, Router
from deathstar.daemon.workers import WorkerSessions
from deathstar.daemon.status import status_map
from deathstar.daemon.supervisor import Supervisor

log = logging.getLogger("deathstar.daemon")

#: Messages read from one socket before the loop looks at the others (fairness).
DRAIN_BATCH = 256

#: Seconds a stopping daemon lets running tasks finish before it kills them.
DRAIN_TIMEOUT_S = config._env_float("DRAIN_TIMEOUT", 30.0)


class Daemon:
    """A node's daemon. ``bind`` opens the ports, ``serve`` blocks until stopped."""

    def __init__(self, *, host: str = "0.0.0.0", port: int = config.DEFAULT_PORT,
                 workers: int | None = None, worker_port: int | None = None,
                 heartbeat_s: float = config.HEARTBEAT_INTERVAL_S,
                 max_tasks_per_worker: int | None = None,
                 max_worker_memory: int | None = None,
                 keys: ServerKeys | None = None, zap: bool = True,
                 idle_shutdown_s: float | None = None, max_lifetime_s: float | None = None,
                 log_dir: str | None = None, ipc: str | None = None,
                 reactor: Reactor | None = None):
        self.host = host
        self.ipc = ipc  # a folder: exec and status are ipc sockets there, no TCP at all
        self.port = port
        self.worker_port = worker_port
        self.heartbeat_s = heartbeat_s
        self.node_name = socket.gethostname()
        self.started = time.monotonic()
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.gate = Gatekeeper(self.ctx, keys, zap)
        # its workers' folders (slot files, shipped modules); swept if this process dies
        self.scratch_dir = scratch.make_folder("deathstar-daemon-")
        self.supervisor = Supervisor(os.cpu_count() or 1 if workers is None else workers,
                                     max_tasks=max_tasks_per_worker,
                                     max_memory=max_worker_memory, heartbeat_s=heartbeat_s,
                                     log_dir=log_dir, folders_in=self.scratch_dir)
        self.blobs = BlobCache(config.BLOB_CACHE_BYTES, config.BLOB_CACHE_ENTRIES)
        self.counters = Counters()
        self.router = Router(self.gate, self.counters)
        self.sessions = ClientSessions(self.counters, self.blobs, heartbeat_s=heartbeat_s,
                                       node_name=self.node_name, capacity=self.capacity,
                                       remote_only=self.remote_only)
        self.pool = WorkerSessions(self.supervisor, self.counters, self.blobs,
                                   heartbeat_s=heartbeat_s, node_name=self.node_name,
                                   capacity=self.capacity, relay=self.sessions.relay,
                                   lost=self.sessions.send_lost,
                                   requeue=self.sessions.requeue,
                                   bad_message=self.bad_message)
        self.sessions.pool = self.pool
        self.stopping = False
        self.stop_deadline = 0.0
        # the loop this daemon runs in (``serve``; the embedded daemon's is shared)
        self.reactor = reactor or Reactor("deathstar-daemon")
        self.stop_asked = False  # another thread asked the loop to stop (``request_stop``)
        self.stop_drain_s = DRAIN_TIMEOUT_S
        self.next_supervise = 0.0
        self.watched: set[int] = set()  # the workers' exit descriptors being polled
        self.polled: tuple[Any, ...] | None = None  # ``pollables`` since the last step
        self.crashed: BaseException | None = None  # what ended the loop, if it failed
        # what clients whose engines run in this daemon's loop sent (``connect_hosted``)
        self.hosted_in: deque[tuple[bytes, list[Any]]] = deque()  # (sender, frames)
        self.hosted_count = 0
        self.ended = threading.Event()  # the loop has closed everything
        self.next_heartbeat = 0.0
        self.stall = heartbeats.StallClock(heartbeat_s, time.monotonic())
        # The dead-man's switch: stop after this long without work, or this long in all.
        self.idle_shutdown_s = idle_shutdown_s
        self.max_lifetime_s = max_lifetime_s
        self.last_work = time.monotonic()

    # ------------------------------------------------------------------ setup

    def bind(self) -> dict[str, Any]:
        """Open the exec, status and worker ports (port 0 picks free ones), or with
        ``ipc`` the exec and status sockets in that folder. Returns the ports (and
        ``ipc``)."""
        self.gate.start()
        self.ports = Ports(self.ctx, self.gate, host=self.host, port=self.port,
                           worker_port=self.worker_port, ipc=self.ipc,
                           heartbeat_s=self.heartbeat_s)
        self.front, self.status, self.back = self.ports.front, self.ports.status, self.ports.back
        self.links = Links(self.back, self.supervisor.links)
        self.pool.sock = self.links
        self.sessions.links = Links(self.front, self.sessions.hosted)
        bound = self.ports.bind()
        sessions = self.sessions
        self.exec_port = Port("exec", CLIENTS, sessions.links, protocol.HELLO,
                              sessions.on_hello, sessions.clients, sessions.handlers)
        self.worker_port_ = Port("workers", WORKERS, self.links, protocol.READY,
                                 self.pool.greet, self.pool.workers, self.pool.handlers)
        self.sockets: tuple[Any, ...] = (self.front, self.back, self.status)
        if self.gate.zap_socket is not None:
            self.sockets += (self.gate.zap_socket,)
        return bound

    # ------------------------------------------------------------------ main loop

    def serve(self) -> None:
        """Start the local workers and route messages until stopped (SIGTERM drains), in
        the calling thread; what the loop raises propagates once the daemon is closed."""
        self.reactor.serve(self)
        if self.crashed is not None:
            raise self.crashed

    # The daemon as a part of a loop (``reactor.Part``): alone in a node's main thread, or
    # hosted with the client engines that use it (the embedded cluster).

    def begin(self) -> None:
        self.supervisor.start()
        self.polled = None

    def pollables(self) -> tuple[Any, ...]:
        """The sockets, the own workers' pipes (to write as well, while a message waits
        for room) and their exit descriptors (pidfds), so that a death is noticed at once
        without supervising on a timer. Only a step changes them: they are worked out
        again after one."""
        if self.polled is None:
            self.watched = self.supervisor.exit_fds() or set()
            pipes = self.supervisor.links.values()
            self.polled = (*self.sockets, *self.watched,
                           *(p.read_fd for p in pipes if not p.closed),
                           *((p.write_fd, zmq.POLLOUT) for p in pipes if p.wants_out()))
        return self.polled

    def deadline(self) -> float:
        return self.next_deadline()

    def has_input(self) -> bool:
        """A hosted client's message, or a request to stop, waits."""
        return bool(self.hosted_in) or self.stop_asked

    def connect_hosted(self) -> HostedPeer:
        """A link for a client whose engine runs in this daemon's loop (call it from that
        loop): it is then a client as any other, without a socket."""
        self.hosted_count += 1
        peer = HostedPeer(b"hosted-%d" % self.hosted_count, self.hosted_in,
                          self.sessions.hosted)
        self.sessions.hosted[peer.ident] = peer
        return peer

    def step(self, ready: dict[Any, int], now: float) -> bool:
        """One turn of the loop: read what is ready, then housekeeping and dispatch."""
        self.polled = None
        if self.watched.intersection(ready):
            self.next_supervise = 0.0  # a worker exited: supervise now
        if self.stop_asked:
            self.stop_asked = False
            self.stop()
            self.stop_deadline = min(self.stop_deadline,
                                     time.monotonic() + self.stop_drain_s)
        if self.gate.zap_socket in ready:
            self.gate.handle_zap()  # handshakes wait on this: first
        if self.front in ready:
            self.drain(self.front, self.on_client_message)
        while self.hosted_in:
            ident, frames = self.hosted_in.popleft()
            self.router.route(self.exec_port, [ident, *frames], user=HOSTED_CLIENT,
                              msg=protocol.in_memory(frames))
        if self.back in ready:
            self.drain(self.back, self.on_worker_message)
        self.read_pipes(ready)
        if self.status in ready:
            self.drain(self.status, self.on_status_request)
        self.housekeeping(time.monotonic())
        self.dispatch()
        return not self.finished()

    def failed(self, exc: BaseException) -> None:
        log.error("the daemon's loop failed", exc_info=exc)
        self.crashed = exc

    def end(self) -> None:
        try:
            self.close()
        finally:
            self.ended.set()

    def next_deadline(self) -> float:
        """When the loop must wake with no message: the next heartbeat, supervision, a
        running task's timeout, the end of a drain. Nothing wakes it more often: an idle
        daemon sleeps a heartbeat interval at a time."""
        due = min(self.next_supervise, self.next_heartbeat, self.pool.next_timeout,
                  self.pool.next_recall)
        return min(due, self.stop_deadline) if self.stopping else due

    def supervise_due(self, now: float) -> float:
        """When supervision must run next, short of an exit waking it: on the heartbeat
        clock (the dead man's switch rides on it), at a respawn, and
        every SUPERVISE_INTERVAL_S where exits cannot be watched."""
        due = now + self.heartbeat_s
        spawn = self.supervisor.next_spawn()
        if spawn is not None:
            due = min(due, max(spawn, now + 0.01))
        if self.supervisor.exit_fds() is None:
            due = min(due, now + config.SUPERVISE_INTERVAL_S)
        return due

    def drain(self, sock: zmq.Socket[bytes], handler: Callable[[list[Any]], None]) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handler(frames)

    def housekeeping(self, now: float) -> None:
        """Supervise processes, enforce timeouts, expire silent peers, send heartbeats:
        each on its clock."""
        stalled = self.stall.stalled(now)
        if stalled:
            log.warning("this daemon stalled for %.1f s; not judging peers by it", stalled)
            peers: list[ClientConn | WorkerConn] = [*self.sessions.clients.values(),
                                                    *self.pool.workers.values()]
            for peer in peers:
                peer.last_seen = now
        if now >= self.next_supervise or now >= self.pool.next_timeout:
            exits = self.supervisor.poll(now)
            self.next_supervise = self.supervise_due(now)
            # A dead worker's last result may wait in its pipe: read it first, so the
            # message it was running is the one held responsible (its slot file covers a
            # result that died unsent).
            for pipe in self.supervisor.take_reaped_links():
                self.read_pipe(pipe)
                pipe.close()
            for exited in exits:
                self.pool.on_exit(exited)
            self.pool.enforce_timeouts(now)
            self.dead_mans_switch(now)
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.heartbeat_s
            self.sessions.expire(now)
            self.pool.expire(now)
            self.sessions.beat(now)

    def dead_mans_switch(self, now: float) -> None:
        """Stop (draining) after ``idle_shutdown_s`` without work or ``max_lifetime_s`` in
        all, so a forgotten cloud node does not run up a bill."""
        if self.stopping:
            return
        if self.pool.running_count() or any(c.queue for c in self.sessions.clients.values()):
            self.last_work = now
        elif self.idle_shutdown_s is not None and now - self.last_work > self.idle_shutdown_s:
            log.warning("no work for %.0f s (--idle-shutdown): stopping", now - self.last_work)
            self.stop()
        if self.max_lifetime_s is not None and now - self.started > self.max_lifetime_s:
            log.warning("up for %.0f s (--max-lifetime): stopping", now - self.started)
            self.stop()

    def stop(self) -> None:
        """Drain: accept no new tasks, let running ones finish (up to DRAIN_TIMEOUT_S)."""
        if not self.stopping:
            log.info("stopping: draining %d running task message(s)",
                     self.pool.running_count())
            self.stopping = True
            self.stop_deadline = time.monotonic() + DRAIN_TIMEOUT_S
            self.sessions.close()

    def request_stop(self, drain_s: float = DRAIN_TIMEOUT_S) -> None:
        """Stop, from any thread: as ``stop``, letting running tasks finish for at most
        ``drain_s`` seconds (0: kill them now). ``serve`` returns once done."""
        self.stop_drain_s = min(self.stop_drain_s, drain_s)
        self.stop_asked = True
        self.reactor.wake()  # (nothing when the loop has ended: it is stopped)

    def on_stop_signal(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT (in ``serve``'s thread, which the signal wakes): stop as
        ``request_stop`` does, at the loop's next turn. It takes no lock, since the code
        it interrupted may hold one."""
        self.stop_asked = True

    def finished(self) -> bool:
        if not self.stopping:
            return False
        return self.pool.running_count() == 0 or time.monotonic() >= self.stop_deadline

    def close(self) -> None:
        c = self.counters
        log.info("stopped: %d tasks done, %d lost, %d timed out, %d bad messages dropped, "
                 "%d handshakes refused", c.tasks_done, c.tasks_lost, c.tasks_timed_out,
                 c.bad_messages, self.gate.refused)
        self.supervisor.stop()
        self.ports.close()
        self.gate.stop()
        shutil.rmtree(self.scratch_dir, ignore_errors=True)

    # ------------------------------------------------------------------ clients

    def remote_only(self) -> bool:
        """Every worker here is hand-started (none of ours can read shared memory)."""
        return self.supervisor.count == 0

    def capacity(self) -> int:
        """Workers this node has or is starting: what a client may keep busy here."""
        return max(len(self.pool), self.supervisor.count)

    def on_client_message(self, frames: list[Any]) -> None:
        self.router.route(self.exec_port, frames)

    def on_worker_message(self, frames: list[Any]) -> None:
        self.router.route(self.worker_port_, frames)

    def read_pipes(self, ready: dict[Any, int]) -> None:
        """Read the own workers' pipes that are ready; write what waits for room."""
        if not ready:  # a turn for a hosted client's message
            return
        for pipe in list(self.supervisor.links.values()):
            if pipe.read_fd in ready:
                self.read_pipe(pipe)
            if pipe.write_fd in ready:
                pipe.flush()

    def read_pipe(self, pipe: DaemonPipe) -> None:
        for frames in pipe.receive():
            self.router.route(self.worker_port_, [pipe.ident, *frames], user=OWN_WORKERS)

    # ------------------------------------------------------------------ workers

    # ------------------------------------------------------------------ scheduling

    def dispatch(self) -> None:
        """Give queued task messages to workers, one client after another: idle workers
        first, then a second message to workers running a short one."""
        ready, clients = self.sessions.ready, self.sessions.clients
        while ready:
            client_ident = ready[0]
            client = clients.get(client_ident)
            if client is None or not client.queue:
                ready.popleft()
                continue
            # a message whose buffers are in shared memory goes to a worker of ours
            worker = self.pool.free_worker(own=bool(client.queue[0].env.get(protocol.F_SHM)))
            if worker is None:
                break
            msg = client.dequeue()
            if client.queue:
                ready.rotate(-1)
            else:
                ready.popleft()
            self.pool.assign(worker, client_ident, msg)
        if self.pool.idle and not ready:
            self.pool.rebalance(time.monotonic())
        else:
            self.pool.next_recall = float("inf")

    # ------------------------------------------------------------------ status

    def on_status_request(self, frames: list[Any]) -> None:
        self.router.answer_status(self.status, frames, lambda: status_map(self))

    def bad_message(self, port: str, why: object) -> None:
        self.router.bad_message(port, why)


def run_daemon(*, on_ready: Callable[[dict[str, Any]], None] | None = None,
               insecure: bool = False, **options: Any) -> None:
    """Check the bind against ``guard.check_bind`` (``UnsafeBind`` if a keyless daemon
    would listen on a network address without ``insecure``), bind, report the ports
    through ``on_ready``, serve until SIGTERM/SIGINT drains. ``options`` are ``Daemon``'s."""
    warning = check_bind(options.get("host", "0.0.0.0"), options.get("keys"),
                         insecure=insecure, ipc=options.get("ipc"))
    if warning is not None:
        log.warning("%s", warning)
    daemon = Daemon(**options)
    ports = daemon.bind()
    signal.signal(signal.SIGTERM, daemon.on_stop_signal)
    signal.signal(signal.SIGINT, daemon.on_stop_signal)
    if on_ready is not None:
        on_ready(ports)
    daemon.serve()
