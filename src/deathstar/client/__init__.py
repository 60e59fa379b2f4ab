"""The client: ``Cluster`` and ``map``, the I/O thread, jobs, the embedded daemon, status
queries, the ``concurrent.futures`` executor and the joblib backend."""

from deathstar.client.cluster import Cluster, MapResult, NoNodesError, map, ordered
from deathstar.client.status import query_status

__all__ = ["Cluster", "MapResult", "NoNodesError", "map", "ordered", "query_status"]
