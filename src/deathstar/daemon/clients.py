"""The daemon's clients: a session per client (opened by its hello, kept by its
messages and heartbeats, dropped at its goodbye or after its silence), the task messages
each has queued here (in turn, round robin: ``ready``), the function blobs each sent,
and what goes back to each: welcomes, results, lost messages, heartbeats. A hosted
client (its engine in the daemon's own loop) is reached in memory, the others through
the exec port."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable

from deathstar import config, heartbeats, protocol, shm
from deathstar.daemon.books import BlobCache, ClientConn, Counters
from deathstar.daemon.hosted import HostedPeer
from deathstar.daemon.routing import Handler
from deathstar.daemon.sockets import Links
from deathstar.daemon.workers import WorkerSessions
from deathstar.protocol import Message

log = logging.getLogger("deathstar.daemon")


class ClientSessions:
    """The daemon's clients and their queues. The daemon sets ``pool`` (its workers, to
    stop what a client no longer wants) and, once its ports are bound, ``links`` (what
    sends through the exec port); ``closed``: the daemon is stopping (no new session,
    no new task)."""

    pool: WorkerSessions
    links: Links

    def __init__(self, counters: Counters, blobs: BlobCache, *, heartbeat_s: float,
                 node_name: str, capacity: Callable[[], int],
                 remote_only: Callable[[], bool]):
        self.counters = counters
        self.blobs = blobs
        self.heartbeat_s = heartbeat_s
        self.node_name = node_name
        self.capacity = capacity  # workers a client may keep busy here
        self.remote_only = remote_only  # no worker here reads this machine's memory
        self.clients: dict[bytes, ClientConn] = {}
        self.ready: deque[bytes] = deque()  # clients with queued tasks, round robin
        self.hosted: dict[bytes, HostedPeer] = {}  # clients in the daemon's own loop
        self.closed = False
        self.handlers: dict[str, Handler] = {
            protocol.BLOB: self.on_blob,
            protocol.TASK: self.on_task,
            protocol.CANCEL: self.on_cancel,
            protocol.HEARTBEAT: lambda client, frames, msg: None,
            protocol.BYE: lambda client, frames, msg: self.drop(client.ident),
        }

    def send(self, ident: bytes, frames: list[Any]) -> None:
        """A message to a client: in memory to a hosted one, else through the exec
        port."""
        self.links.send(ident, frames)
        client = self.clients.get(ident)
        if client is not None:
            client.last_sent = time.monotonic()

    def on_hello(self, ident: bytes, user: str, msg: Message) -> None:
        try:
            warnings = protocol.handshake(msg.env["versions"], "client")
        except protocol.VersionMismatch as exc:
            self.send(ident, protocol.refused(str(exc)))
            return
        for warning in warnings:
            log.warning("%s", warning)
        if self.closed:
            self.send(ident, protocol.refused("the daemon is stopping"))
            return
        if ident in self.clients:
            self.drop(ident)  # a client that reconnected starts afresh
        if len(self.clients) >= config.MAX_CLIENTS:
            self.send(ident, protocol.refused(
                f"this daemon serves {config.MAX_CLIENTS} clients already (max_clients)"))
            return
        hb = heartbeats.clamp_heartbeat(msg.env["hb"])
        self.clients[ident] = ClientConn(ident, hb, time.monotonic(), user=user)
        probe = msg.env.get(protocol.F_PROBE)  # read here: we share the client's memory
        proof = None if probe is None or self.remote_only() else shm.prove_shared(probe)
        self.send(ident, protocol.welcome(self.heartbeat_s, self.node_name,
                                                 self.capacity(), proof))

    def on_blob(self, client: ClientConn, frames: list[Any], msg: Message) -> None:
        self.counters.blobs_received += 1
        self.counters.blob_bytes_received += self.blobs.put(msg.env["h"], msg.payload)
        client.blobs.add(msg.env["h"])

    def on_task(self, client: ClientConn, frames: list[Any], msg: Message) -> None:
        ident = client.ident
        if self.closed:
            self.send_lost(ident, [msg.env["id"]], "the daemon is stopping", "",
                           code=protocol.LOST_STOPPING)
        elif self.blobs.get(msg.env["fn"]) is None:
            self.send_lost(ident, [msg.env["id"]], "function not cached here", "",
                           code=protocol.LOST_BLOB)
        elif not client.has_room(msg, config.CLIENT_QUEUE_MESSAGES, config.CLIENT_QUEUE_BYTES):
            self.counters.tasks_busy += 1
            self.send_lost(ident, [msg.env["id"]], (
                f"this client's queue here is full ({len(client.queue)} messages, "
                f"{client.queued_bytes} bytes; limits {config.CLIENT_QUEUE_MESSAGES}, "
                f"{config.CLIENT_QUEUE_BYTES})"), "", code=protocol.LOST_BUSY)
        else:
            if not client.queue:
                self.ready.append(ident)
            client.enqueue(msg)

    def on_cancel(self, client: ClientConn, frames: list[Any], msg: Message) -> None:
        """Drop the named task messages (all of the client's when ``ids`` is empty) from
        the queue, and kill the workers running any of them."""
        ident = client.ident
        ids = set(msg.env["ids"])
        client.keep(lambda m: bool(ids) and m.env["id"] not in ids)
        self.unready(client)
        self.pool.kill_running(lambda a: a.client == ident and (not ids or a.id in ids),
                          "its client cancelled it")

    def return_queued(self, client: ClientConn, reason: str) -> None:
        """Hand a client's queued tasks back as lost, so it sends them elsewhere."""
        ids = [m.env["id"] for m in client.keep(lambda m: False)]
        self.unready(client)
        if ids:
            self.send_lost(client.ident, ids, reason, "", code=protocol.LOST_STOPPING)

    def unready(self, client: ClientConn) -> None:
        """Take a client whose queue emptied out of the round robin."""
        if not client.queue and client.ident in self.ready:
            self.ready.remove(client.ident)

    def send_lost(self, ident: bytes, ids: list[int], reason: str, worker: str,
                  code: str = protocol.LOST_CRASH, sig: int = 0) -> None:
        """Tell a client its task messages will not be answered, and why (``code``, one
        of ``protocol.LOST_CODES``; ``sig`` the signal that killed the worker). Nothing
        when the client is gone."""
        if ident in self.clients:
            self.send(ident, protocol.lost(ids, reason, worker, code, sig))

    def requeue(self, ident: bytes, msg: Message) -> None:
        """A task message a worker gave back unstarted goes first in its client's queue
        (dropped when the client is gone)."""
        client = self.clients.get(ident)
        if client is None:
            return
        client.enqueue_first(msg)
        if ident not in self.ready:
            self.ready.appendleft(ident)

    def relay(self, ident: bytes, frames: list[Any], msg: Message) -> None:
        """A worker's result (``msg``, decoded from ``frames``) to its client (nothing
        when the client is gone); a hosted client takes the decoded message."""
        if ident in self.clients:
            self.send(ident, protocol.Packed(frames, msg.env))

    def drop(self, ident: bytes) -> None:
        """Forget a client: its queued tasks and its cached blobs no other client uses."""
        client = self.clients.pop(ident, None)
        if client is None:
            return
        client.queue.clear()
        self.unready(client)
        self.pool.kill_running(lambda a: a.client == ident, "its client is gone")
        in_use = set().union(*(c.blobs for c in self.clients.values()))
        for h in client.blobs - in_use:
            self.blobs.discard(h)

    def expire(self, now: float) -> None:
        for ident, client in list(self.clients.items()):
            if now - client.last_seen > heartbeats.liveness_window(client.heartbeat_s,
                                                                 self.heartbeat_s):
                log.warning("client silent for %.1f s; dropping its work",
                            now - client.last_seen)
                self.drop(ident)

    def close(self) -> None:
        """The daemon is stopping: no new session or task; what is queued goes back."""
        self.closed = True
        for client in self.clients.values():
            self.return_queued(client, "the daemon is stopping")

    def beat(self, now: float) -> None:
        beat = protocol.heartbeat(self.capacity())
        for ident, client in self.clients.items():
            if now - client.last_sent >= self.heartbeat_s * 0.9:
                self.send(ident, beat)
