"""How a message reaches its handler in the daemon: admitted (authenticated), decoded and
validated, matched to its peer's session, dispatched through the port's handler table.
Nothing a peer sends can stop the daemon: a message that fails any step, or whose handler
raises, is a counted, rate-limited "bad message" log line."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import zmq

from deathstar import protocol
from deathstar.daemon.books import ClientConn, Counters, RateLimitedLog, WorkerConn
from deathstar.keys import CLIENTS, Gatekeeper
from deathstar.protocol import Message

log = logging.getLogger("deathstar.daemon")

#: A port's handler of one message type: (the sending peer's session, the frames after the
#: identity, the decoded message).
Handler = Callable[[Any, list[Any], Message], None]

#: Who a message from one of the daemon's own workers comes from (its pipe says so; no
#: key is ever this string, so no peer on a socket can pass for one).
OWN_WORKERS = "(own worker)"


@dataclass
class Port:
    """A ROUTER port's routing: its greeting message type and what answers it, the sessions
    it opened (by peer identity), and the handlers of everything else."""

    name: str
    role: str  # keys.CLIENTS or keys.WORKERS: whose keys this port admits
    sock: zmq.Socket[bytes] | Any  # what sends to its peers (``send_multipart``)
    greeting: str
    greet: Callable[[bytes, str, Message], None]
    peers: Mapping[bytes, ClientConn | WorkerConn]
    handlers: dict[str, Handler]


class Router:
    """Admits, decodes and routes the messages of the daemon's ROUTER ports."""

    def __init__(self, gate: Gatekeeper, counters: Counters):
        self.gate = gate
        self.counters = counters
        self.bad_log = RateLimitedLog()

    def receive(self, port: Port, frames: list[Any], user: str | None = None,
                msg: Message | None = None) -> tuple[bytes, str, Message] | None:
        """Admit and decode a message from a ROUTER: (identity, authenticated key, message),
        or None when it was dropped (unauthenticated, malformed: counted) or refused
        (another protocol version: the peer is told, naming both). ``user``: who sent it,
        when the channel itself says so (an own worker's pipe); ``msg``: the message
        already, when it was made in this process (a hosted client's)."""
        if msg is not None and user is not None:
            return protocol.frame_bytes(frames[0]), user, msg
        if user is None:
            user = self.gate.user(frames, port.role)
        if user is None:
            self.bad_message(port.name, "a message from an unauthenticated peer")
            return None
        try:
            ident, rest = protocol.split_identity(frames)
            return ident, user, protocol.decode(rest)
        except protocol.VersionMismatch as exc:
            log.warning("refused a peer on the %s port: %s", port.name, exc)
            port.sock.send_multipart([protocol.frame_bytes(frames[0]),
                                      *protocol.refused(str(exc))])
        except protocol.ProtocolError as exc:
            self.bad_message(port.name, exc)
        return None

    def route(self, port: Port, frames: list[Any], user: str | None = None,
              msg: Message | None = None) -> None:
        """One message on a ROUTER port: the greeting (hello, ready) opens a session; any
        other message from a peer without one is answered "introduce yourself"; the rest
        go to the port's handler table. A handler that fails on a message is a counted bad
        message, never the end of the daemon."""
        received = self.receive(port, frames, user, msg)
        if received is None:
            return
        ident, user, msg = received
        try:
            if msg.type == port.greeting:
                port.greet(ident, user, msg)
                return
            peer = port.peers.get(ident)
            if peer is not None and peer.user != user:
                # a session belongs to the key that opened it, not to a routing id
                self.bad_message(port.name, f"{msg.type} message for another key's session")
                return
            if peer is None:  # we restarted, or expired it, or it never said hello
                port.sock.send_multipart([ident, *protocol.refused(
                    f"say {port.greeting} first", code=protocol.REFUSED_HELLO)])
                return
            peer.last_seen = time.monotonic()
            handler = port.handlers.get(msg.type)
            if handler is None:
                self.bad_message(port.name, f"unexpected {msg.type} message")
                return
            handler(peer, frames[1:], msg)
        except Exception as exc:  # noqa: BLE001 - a peer's message must never stop us
            log.exception("handling a %s message on the %s port failed", msg.type, port.name)
            self.bad_message(port.name, f"{msg.type} message: {type(exc).__name__}: {exc}")

    def answer_status(self, sock: zmq.Socket[bytes], frames: list[Any],
                      status_map: Callable[[], dict[str, Any]]) -> None:
        """Answer a status request (also one of another protocol version: the reply names
        ours, and the peer compares)."""
        if not self.gate.admits(frames, CLIENTS):
            self.bad_message("status", "a request from an unauthenticated peer")
            return
        try:
            ident, rest = protocol.split_identity(frames)
            if len(rest) != 1:
                raise protocol.ProtocolError(f"status request of {len(rest)} frames")
            msg: Message | None = protocol.decode(rest)
        except protocol.VersionMismatch:
            msg = None
        except protocol.ProtocolError as exc:
            self.bad_message("status", exc)
            return
        if msg is not None and msg.type != protocol.STATUS:
            self.bad_message("status", f"unexpected {msg.type} message")
            return
        sock.send_multipart([ident, *protocol.pack(protocol.STATUS, **status_map())])

    def bad_message(self, port: str, why: object) -> None:
        self.counters.bad_messages += 1
        self.bad_log.warning("dropped a bad message on the %s port: %s", port, why)
