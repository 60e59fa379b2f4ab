"""deathstar: run a Python function over a list of inputs on many machines at once.

The public API::

    deathstar.map(fn, items, cluster=None, **common)  -> MapResult (ordered, with .report)
    deathstar.Cluster(nodes)                           connect once; map / imap / imap_unordered
    deathstar.Executor(cluster, **options)             concurrent.futures on the cluster
    deathstar.register_joblib()                        joblib backend "deathstar"
    deathstar.node_summary(report)                     per-node jobs completed, failed, busy s
    deathstar.RemoteError                              an exception raised by the user's function
"""

from deathstar._version import __version__
from deathstar import deploy  # registers the providers' cluster specs (ec2:NAME)
from deathstar.client import Cluster, MapResult, NoNodesError, map, query_status
from deathstar.errors import RemoteError, TaskFailed, TaskTimeout, WorkerCrashed
from deathstar.client.executor import Executor
from deathstar.client.joblib_backend import register_joblib
from deathstar.report import TaskRecord, node_summary

__all__ = [
    "Cluster",
    "Executor",
    "MapResult",
    "NoNodesError",
    "RemoteError",
    "TaskFailed",
    "TaskRecord",
    "TaskTimeout",
    "WorkerCrashed",
    "__version__",
    "deploy",
    "map",
    "node_summary",
    "query_status",
    "register_joblib",
]
