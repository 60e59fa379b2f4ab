"""Where nodes come from: providers that start daemons and name them: EC2, SSH hosts,
SLURM jobs.

Importing this package registers each provider's ``PREFIX:NAME`` cluster specs with the
address model (``deathstar.nodes.register_resolver``), so ``Cluster("ec2:burst")`` works
without anything below this floor knowing a provider. A provider's module is loaded when
a spec names it (the package face imports this package in every process, workers
included, which never need a provider).
"""

from __future__ import annotations

import importlib
from typing import Callable

from deathstar.nodes import NodeAddress, register_resolver

#: Cluster-spec prefix -> the provider module whose ``cluster_nodes`` resolves it.
PROVIDERS = {"ec2": "deathstar.deploy.ec2", "ssh": "deathstar.deploy.ssh",
             "slurm": "deathstar.deploy.slurm"}


def _resolver(module: str) -> Callable[[str], list[NodeAddress]]:
    def resolve(name: str) -> list[NodeAddress]:
        nodes: list[NodeAddress] = importlib.import_module(module).cluster_nodes(name)
        return nodes
    return resolve


for _prefix, _module in PROVIDERS.items():
    register_resolver(_prefix, _resolver(_module))

__all__ = ["PROVIDERS"]
