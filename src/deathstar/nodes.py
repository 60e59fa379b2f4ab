"""Node addresses: how a user names nodes, and where their ports are.

``node`` means exec port 6000 and status port 6001; ``node:P`` means exec P, status P+1.
A cluster is a comma list, ``@file`` (one node a line, ``#`` comments), ``PROVIDER:NAME``
(the nodes of a deployed cluster, such as ``ec2:NAME``: resolved by whatever registered that
prefix with ``register_resolver``; ``deathstar.deploy`` registers its providers), or, when
none is given, the ``DEATHSTAR_CLUSTER`` variable. No cluster at all means the embedded
local one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from deathstar import config


class ClusterSpecError(ValueError):
    """A node or cluster specification that cannot be understood; the message says why."""


#: Turns the NAME of a ``PREFIX:NAME`` cluster spec into its nodes; raises ClusterSpecError.
Resolver = Callable[[str], "list[NodeAddress]"]

_resolvers: dict[str, Resolver] = {}


def register_resolver(prefix: str, resolver: Resolver) -> None:
    """Make ``PREFIX:NAME`` in a cluster spec mean ``resolver(NAME)`` (a deploy provider's
    nodes). Registering a prefix again replaces its resolver."""
    if not prefix.isidentifier():
        raise ValueError(f"a cluster prefix must be a word, not {prefix!r}")
    _resolvers[prefix] = resolver


def resolvers() -> dict[str, Resolver]:
    """The registered ``PREFIX:`` resolvers (a copy)."""
    return dict(_resolvers)


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """A node as the user named it, with the endpoints of its exec and status ports."""

    name: str
    host: str
    port: int
    server_key: bytes | None = None  # its CurveZMQ public key, when known (ec2 nodes)
    ipc: str | None = None  # a folder of ipc sockets instead of TCP (the embedded daemon)
    hosted: str | None = None  # its name in this process (an embedded daemon: hosting)

    @property
    def exec_endpoint(self) -> str:
        if self.ipc is not None:
            return f"ipc://{self.ipc}/exec"
        return f"tcp://{self._host()}:{self.port}"

    @property
    def status_endpoint(self) -> str:
        if self.ipc is not None:
            return f"ipc://{self.ipc}/status"
        return f"tcp://{self._host()}:{self.port + 1}"

    def _host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host


def parse_node(spec: str) -> NodeAddress:
    """Parse ``host``, ``host:port``, ``[v6addr]`` or ``[v6addr]:port``."""
    text = spec.strip()
    if not text:
        raise ClusterSpecError("empty node name")
    if text.startswith("tcp://"):
        text = text[len("tcp://"):]
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ClusterSpecError(f"node {spec!r}: unclosed '['")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ClusterSpecError(f"node {spec!r}: expected ':port' after ']'")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ClusterSpecError(f"node {spec!r}: no host")
    port = config.DEFAULT_PORT
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65535:
            raise ClusterSpecError(f"node {spec!r}: port must be a number from 1 to 65534")
        port = int(port_text)
    return NodeAddress(spec.strip(), host, port)


def parse_cluster(spec: str | Sequence[str | NodeAddress] | None,
                  _named: frozenset[str] = frozenset()) -> list[NodeAddress] | None:
    """Turn a cluster given by the user into node addresses; None means embedded local.

    Accepts a list of node names (or ``NodeAddress``es), a comma-separated string,
    ``@path`` to a file of node names, ``PROVIDER:NAME`` (registered resolvers), and names of clusters in the config
    file's ``[clusters]``.
    ``None`` falls back to ``DEATHSTAR_CLUSTER``, and to None when unset.
    """
    if spec is None:
        spec = os.environ.get("DEATHSTAR_CLUSTER") or None
        if spec is None:
            return None
    nodes: list[NodeAddress] = []
    for part in ([spec] if isinstance(spec, str) else list(spec)):
        if isinstance(part, NodeAddress):
            nodes.append(part)
            continue
        for piece in str(part).split(","):
            piece = piece.strip()
            if piece.startswith("@"):
                nodes.extend(parse_node(n) for n in _read_node_file(piece[1:]))
            elif piece in config.named_clusters():  # a cluster named in config.toml
                if piece in _named:
                    raise ClusterSpecError(f"cluster {piece!r} names itself")
                nodes.extend(parse_cluster(config.named_clusters()[piece],
                                           _named | {piece}) or [])
            elif piece.partition(":")[0] in _resolvers:  # a deployed cluster: ec2:NAME...
                prefix, _, name = piece.partition(":")
                nodes.extend(_resolvers[prefix](name))
            elif piece:
                nodes.append(parse_node(piece))
    if not nodes:
        raise ClusterSpecError("the cluster names no node")
    seen: set[tuple[str, int]] = set()
    for node in nodes:
        if (node.host, node.port) in seen:
            raise ClusterSpecError(f"node {node.name!r} is named twice")
        seen.add((node.host, node.port))
    return nodes


def _read_node_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ClusterSpecError(f"cannot read node file {path}: {exc.strerror}") from None
    names: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        names.extend(p.strip() for p in line.split(",") if p.strip())
    return names
