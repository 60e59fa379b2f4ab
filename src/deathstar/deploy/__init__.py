"""Where nodes come from: providers that start daemons and name them (EC2 today).

Importing this package registers each provider's ``PREFIX:NAME`` cluster specs with the
address model (``deathstar.nodes.register_resolver``), so ``Cluster("ec2:burst")`` works
without anything below this floor knowing a provider.
"""

from deathstar.deploy import ec2
from deathstar.nodes import register_resolver

register_resolver("ec2", ec2.cluster_nodes)

__all__ = ["ec2"]
