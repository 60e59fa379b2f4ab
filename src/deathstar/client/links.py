"""The client's end of its link to one node (``Node.link``): a ZeroMQ DEALER socket to
the node's daemon (``SocketLink``), or, for the embedded daemon that runs in the engine's
own loop, a ``daemon.hosted.HostedPeer`` that hands the frames over in memory. The engine
uses both alike (``Link``)."""

from __future__ import annotations

from typing import Any, Protocol

import zmq

from deathstar import config
from deathstar.keys import ClientKeys, connect_with
from deathstar.nodes import NodeAddress


class Link(Protocol):
    """What the engine does with a link. ``pollable`` is what its loop polls for input
    (None when input waits in memory: ``has_mail`` says so)."""

    @property
    def pollable(self) -> zmq.Socket[bytes] | None:
        """The socket to poll, or None."""

    def send_multipart(self, frames: list[Any], flags: int = 0, copy: bool = False) -> None:
        """Send a message (``flags``: ``zmq.NOBLOCK`` to raise rather than wait)."""

    def take(self) -> list[Any] | None:
        """The next message's frames, or None when none waits (never blocks)."""

    def has_mail(self) -> bool:
        """Whether a message waits that ``pollable`` does not show."""

    def close(self, linger: int = 0) -> None:
        """Close the link; what was sent may still go out for ``linger`` ms."""


class SocketLink:
    """A link over a ZeroMQ DEALER socket (``pollable``)."""

    def __init__(self, sock: zmq.Socket[bytes]):
        self.pollable: zmq.Socket[bytes] | None = sock
        self.sock = sock

    def send_multipart(self, frames: list[Any], flags: int = 0, copy: bool = False) -> None:
        self.sock.send_multipart(frames, flags, copy=copy)

    def take(self) -> list[Any] | None:
        try:
            return self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None

    def has_mail(self) -> bool:
        return False  # the poll shows it

    def close(self, linger: int = 0) -> None:
        self.sock.close(linger=linger)


def open_socket(ctx: zmq.Context[zmq.Socket[bytes]], address: NodeAddress,
                heartbeat_s: float, keys: ClientKeys | None) -> SocketLink:
    """A link to ``address``'s daemon over a new DEALER socket (CurveZMQ with ``keys``;
    ZeroMQ's own heartbeats at ``heartbeat_s``). Connects without waiting."""
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, config.MAX_MESSAGE_BYTES)
    sock.copy_threshold = config.ZERO_COPY_MIN_BYTES
    sock.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat_s * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(heartbeat_s * config.LIVENESS * 1000))
    if keys is not None:
        connect_with(sock, keys.public, keys.secret, keys.server_key(address))
    sock.connect(address.exec_endpoint)
    return SocketLink(sock)
