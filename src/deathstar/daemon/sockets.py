"""A daemon's three ROUTER sockets and how they are bound.

    exec     clients: TCP port P (or ``ipc`` folder/exec)
    status   anyone: TCP port P+1 (or ``ipc`` folder/status)
    workers  hand-started workers on TCP port P+2 (or ``worker_port``; none with
             ``ipc``)

The daemon's own workers talk over pipes, and a client whose engine runs in the daemon's
own loop (the embedded cluster) in memory: ``Links`` sends to either as to the socket.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Protocol, cast

import zmq

from deathstar import config
from deathstar.keys import CLIENTS, WORKERS, Gatekeeper


class _Peer(Protocol):
    def put(self, frames: list[Any]) -> None: ...


class UnsafeFolder(ValueError):
    """An ipc folder others could write to (and so swap or reach the sockets in it)."""


def check_ipc_folder(folder: str) -> None:
    """Refuse an ``--ipc`` folder that is not this user's (or root's), is a symbolic link,
    or that group or others may write: they could replace the sockets or connect to
    them and run code as this user."""
    try:
        problem = config.trust_problem(Path(folder))
    except OSError as exc:
        raise UnsafeFolder(f"--ipc {folder}: {exc.strerror}") from None
    if problem:
        raise UnsafeFolder(f"--ipc folder refused: {problem}")


class Ports:
    """The sockets ``front`` (exec), ``status`` and ``back`` (workers), made secure by
    ``gate``; ``bind`` opens them, ``close`` closes them."""

    def __init__(self, ctx: zmq.Context[Any], gate: Gatekeeper, *, host: str, port: int,
                 worker_port: int | None, ipc: str | None, heartbeat_s: float):
        self.host = host
        self.port = port
        self.worker_port = worker_port
        self.ipc = ipc  # a folder: exec and status are ipc sockets there, no TCP at all
        self.heartbeat_s = heartbeat_s
        self.gate = gate
        self.front = self._router(ctx, config.MAX_MESSAGE_BYTES, CLIENTS)
        self.status = self._router(ctx, config.MAX_STATUS_MESSAGE_BYTES, CLIENTS)
        self.back = self._router(ctx, config.MAX_MESSAGE_BYTES, WORKERS)

    def _router(self, ctx: zmq.Context[Any], max_bytes: int, role: str) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        sock.copy_threshold = config.ZERO_COPY_MIN_BYTES
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting peer keeps its identity
        # Cut TCP sessions to peers that vanished without a FIN; liveness is ours to judge.
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(self.heartbeat_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.heartbeat_s * config.LIVENESS * 1000))
        self.gate.secure(sock, role)
        return sock

    def bind(self) -> dict[str, Any]:
        """Open exec and status (port 0 picks free ones) and the workers' port. Returns
        the ports (and ``ipc``)."""
        old_umask = os.umask(0o077)  # ipc socket files: this user's only
        try:
            if self.ipc is None:
                self._bind_tcp()
                status_port = self.port + 1
            else:
                check_ipc_folder(self.ipc)
                self.front.bind(f"ipc://{self.ipc}/exec")
                self.status.bind(f"ipc://{self.ipc}/status")
                self.port = status_port = 0
                self.worker_port = 0
        finally:
            os.umask(old_umask)
        return {"exec": self.port, "status": status_port, "workers": self.worker_port,
                "ipc": self.ipc}

    def _bind_tcp(self) -> None:
        """Bind exec P, status P+1 and workers (default P+2). With port 0, find a free
        P for which P+1 (and P+2) are free too, so the port convention always holds."""
        for _ in range(50):
            port = self.port
            if port == 0:
                port = self.front.bind_to_random_port(f"tcp://{self.host}", 20000, 60000)
            else:
                self.front.bind(f"tcp://{self.host}:{port}")
            worker_port = port + 2 if self.worker_port is None else self.worker_port
            bound = [self.front]
            try:
                for sock, p in ((self.status, port + 1), (self.back, worker_port)):
                    sock.bind(f"tcp://{self.host}:{p}")
                    bound.append(sock)
            except zmq.ZMQError:
                if self.port != 0:
                    raise
                for sock in bound:  # taken: try another P
                    sock.unbind(cast(bytes, sock.last_endpoint))
                continue
            self.port, self.worker_port = port, worker_port
            return
        raise zmq.ZMQError(msg="no three free consecutive ports found")

    def close(self) -> None:
        for sock in (self.front, self.back, self.status):
            sock.close(linger=0)


class Links:
    """Where a port's message goes: to a peer reached without the socket (``peers``, by
    routing id: an own worker's pipes, a client hosted in the daemon's loop), handed the
    frames as they are (a ``protocol.Packed`` message stays one), else to the socket."""

    def __init__(self, sock: zmq.Socket[bytes], peers: Mapping[bytes, _Peer]):
        self.sock = sock
        self.peers = peers  # kept current by their owner

    def send(self, ident: bytes, frames: list[Any], flags: int = 0, copy: bool = False
             ) -> None:
        """One message to the peer ``ident``."""
        peer = self.peers.get(ident)
        if peer is None:
            self.sock.send_multipart([ident, *frames], flags, copy=copy)
        else:
            peer.put(frames)

    def send_multipart(self, frames: list[Any], flags: int = 0, copy: bool = True) -> None:
        """As a ROUTER's: the routing id first."""
        self.send(frames[0], frames[1:], flags, copy)
