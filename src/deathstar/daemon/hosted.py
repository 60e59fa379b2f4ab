"""A client whose engine runs in its daemon's own loop (the embedded cluster): the two
hand each other their messages' frames in memory, with no socket between them, so a
message costs neither a ZeroMQ send nor a turn of the loop of its own. Everything else
(hello, heartbeats, sessions, routing) is as for a client on a socket."""

from __future__ import annotations

from collections import deque
from typing import Any, MutableMapping

#: Who a hosted client's messages come from, in the daemon's sessions (no key is this).
HOSTED_CLIENT = "(hosted client)"


class HostedPeer:
    """The link of one hosted client. Its client's end is a ``client.links.Link``
    (``send_multipart``, ``take``, ``has_mail``, ``close``); the
    daemon's end is ``put`` and the shared ``to_daemon`` queue (the sender's routing id
    and the frames), read in the loop's next turn. Frames go as they are: a message made
    here (``protocol.Packed``) is not decoded again. Both ends run in the same thread:
    nothing here is locked."""

    def __init__(self, ident: bytes, to_daemon: deque[tuple[bytes, list[Any]]],
                 registry: MutableMapping[bytes, HostedPeer]):
        self.ident = ident
        self.to_daemon = to_daemon
        self.registry = registry  # the daemon's hosted peers, by routing id
        self.inbox: deque[list[Any]] = deque()  # the daemon's messages to the client
        self.pollable: None = None  # nothing to poll: ``has_mail``

    # ------------------------------------------------------------------ client's end

    def send_multipart(self, frames: list[Any], flags: int = 0, copy: bool = False) -> None:
        if self.ident in self.registry:  # else closed: gone, as on a closed socket
            self.to_daemon.append((self.ident, frames))

    def take(self) -> list[Any] | None:
        """The daemon's next message, or None (``recv_multipart`` without the raise)."""
        return self.inbox.popleft() if self.inbox else None

    def has_mail(self) -> bool:
        return bool(self.inbox)

    def close(self, linger: int = 0) -> None:
        """The client leaves: what it sent before still reaches the daemon."""
        self.registry.pop(self.ident, None)
        self.inbox.clear()

    # ------------------------------------------------------------------ daemon's end

    def put(self, frames: list[Any]) -> None:
        self.inbox.append(frames)
