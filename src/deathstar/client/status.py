"""The status-port client: ask daemons for their capacity, load and counters (what
``deathstar status`` shows, what providers wait on), and the client keys every connection
to a TCP node uses."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import zmq

from deathstar import config, protocol
from deathstar.keys import (NO_KEYS, ClientKeys, chosen_dir, connect_with, default_dir,
                            ensure_keys, load_client_keys)
from deathstar.nodes import NodeAddress, parse_cluster

__all__ = ["load_keys", "query_status"]

log = logging.getLogger("deathstar.client")


def load_keys(keys: str | Path | None, addresses: list[NodeAddress]) -> ClientKeys | None:
    """The client keys to use with TCP nodes: ``keys``, else ``$DEATHSTAR_KEYS`` or the
    config file's, else the default folder, where they are made when the user has none
    yet (the connection is never plaintext unless told ``"none"``, for nodes started with
    ``--insecure``). Checked to hold every node's public key. Raises ``KeyFileError``
    naming the file that is missing, not the user's, or too open."""
    chosen = chosen_dir(keys)
    if chosen == NO_KEYS:
        return None
    folder = Path(chosen) if chosen is not None else default_dir()
    if chosen is None and ensure_keys(folder):
        log.warning("made keys in %s (the first connection without keys): nodes must "
                    "have your client.key in their authorized/ folder", folder)
    client_keys = load_client_keys(folder)
    for address in addresses:
        client_keys.server_key(address)
    return client_keys


def query_status(nodes: str | Sequence[str] | Sequence[NodeAddress],
                 timeout: float = config.CONNECT_TIMEOUT_S,
                 keys: str | Path | None = None) -> list[dict[str, Any]]:
    """Ask every node's status port at once. Returns one map per node, in the order
    given: the node's status fields plus ``node`` (as named) and ``error`` (empty when
    it answered, else why not). Blocks at most ``timeout`` seconds. ``keys`` as for
    ``Cluster`` (none are used for ``NodeAddress``es of the embedded daemon)."""
    addresses: list[NodeAddress]
    if not isinstance(nodes, str) and all(isinstance(n, NodeAddress) for n in nodes):
        addresses = [n for n in nodes if isinstance(n, NodeAddress)]
    else:
        addresses = parse_cluster([str(n) for n in nodes] if not isinstance(nodes, str)
                                  else nodes) or []
    remote = [a for a in addresses if a.ipc is None]
    client_keys = load_keys(keys, remote) if remote else None
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    socks: dict[zmq.Socket[bytes], NodeAddress] = {}
    answers: dict[str, dict[str, Any]] = {}
    poller = zmq.Poller()
    try:
        for address in addresses:
            sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
            if client_keys is not None and address.ipc is None:
                connect_with(sock, client_keys.public, client_keys.secret,
                             client_keys.server_key(address))
            sock.connect(address.status_endpoint)
            sock.send_multipart(protocol.pack(protocol.STATUS))
            socks[sock] = address
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while len(answers) < len(addresses):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for sock, _ in poller.poll(int(remaining * 1000)):
                address = socks[sock]
                frames = sock.recv_multipart()
                try:
                    env = protocol.decode_envelope(frames[0])
                except protocol.VersionMismatch as exc:
                    answers[address.name] = {"error": str(exc)}
                except protocol.ProtocolError as exc:
                    answers[address.name] = {"error": f"bad status reply: {exc}"}
                else:
                    answers[address.name] = {k: v for k, v in env.items() if k not in "vt"}
                poller.unregister(sock)
    finally:
        for sock in socks:
            sock.close(linger=0)
    rows = []
    for address in addresses:
        row = {"node": address.name, "error": ""}
        row.update(answers.get(address.name) or {
            "error": f"no answer from {address.status_endpoint} within {timeout:g} s"})
        rows.append(row)
    return rows
