"""The one interface every provider implements (EC2, SSH hosts, SLURM allocations), and the
folder where the client keeps a deployed cluster's state.

A provider brings up daemons somewhere, names them, and takes them down again:

- ``up(options)`` starts the cluster (idempotent for one name) and returns its nodes;
- ``nodes(name)`` gives the addresses (with each node's CurveZMQ public key) that
  ``--cluster PREFIX:NAME`` resolves to, raising ``ClusterSpecError`` when there are none;
- ``list(name)`` gives one row per node or instance (what ``PREFIX list`` prints);
- ``down(name)`` stops everything ``up`` made; a cluster that does not exist is not an
  error (idempotent).

``deathstar.deploy`` registers each provider's ``nodes`` under its ``prefix`` with the
address model, so no module below this floor imports a provider.

Cluster state lives in ``<config folder>/clusters/NAME/`` (``cluster_dir``). Names match
``[A-Za-z0-9_-]{1,64}`` wherever a name becomes a path or a tag, and the path is checked to
stay under ``clusters/``: ``../..`` or ``../keys`` is refused, never joined.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

from deathstar import config
from deathstar.nodes import ClusterSpecError, NodeAddress

__all__ = ["BadClusterName", "Provider", "check_name", "cluster_dir", "clusters_root"]

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


class BadClusterName(ClusterSpecError):
    """A cluster name that could reach outside the clusters folder (or into a tag)."""


class Provider(Protocol):
    """What ``deathstar.deploy`` knows of a provider (module-level functions satisfy it)."""

    #: The cluster-spec prefix: ``ec2``, ``ssh``, ``slurm``.
    prefix: str

    def nodes(self, name: str) -> list[NodeAddress]:
        """The running nodes of cluster ``name``; ClusterSpecError when there are none."""

    def list(self, name: str | None = None) -> list[dict[str, Any]]:
        """One row per node of cluster ``name`` (of every cluster when None)."""

    def down(self, name: str) -> dict[str, Any]:
        """Stop everything ``up`` made for ``name``; idempotent."""


def check_name(name: str) -> str:
    """``name`` when it matches ``[A-Za-z0-9_-]{1,64}``; else BadClusterName naming it."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise BadClusterName(f"cluster name {name!r}: use 1 to 64 of A-Z a-z 0-9 _ -")
    return name


def clusters_root() -> Path:
    """``<config folder>/clusters``: every deployed cluster's state folder is in here."""
    return config.config_dir() / "clusters"


def cluster_dir(name: str) -> Path:
    """The state folder of cluster ``name`` (not created). Raises BadClusterName for a name
    that is not a plain word or whose path would leave ``clusters_root()``."""
    root = clusters_root()
    path = root / check_name(name)
    if path.resolve().parent != root.resolve():
        raise BadClusterName(f"cluster name {name!r}: its folder {path} leaves {root}")
    return path
