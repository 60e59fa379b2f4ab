"""deathstar: run a Python function over a list of inputs on many machines at once.

The public API::

    deathstar.map(fn, items, cluster=None, **common)  -> MapResult (ordered, with .report)
    deathstar.Cluster(nodes)                           connect once; map / imap / imap_unordered
    deathstar.Executor(cluster, **options)             concurrent.futures on the cluster
    deathstar.register_joblib()                        joblib backend "deathstar"
    deathstar.node_summary(report)                     per-node jobs completed, failed, busy s
    deathstar.RemoteError                              an exception raised by the user's function

The names are loaded on first use (PEP 562), so that a worker or daemon process, which
imports ``deathstar.worker`` or ``deathstar.daemon`` and never these, starts without
loading the client, the CLI's libraries or the providers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from deathstar import deploy  # registers the providers' cluster specs (ec2:NAME); cheap
from deathstar._version import __version__

if TYPE_CHECKING:
    from deathstar.client import Cluster, MapResult, NoNodesError, map, query_status
    from deathstar.client.executor import Executor
    from deathstar.client.joblib_backend import register_joblib
    from deathstar.errors import RemoteError, TaskFailed, TaskTimeout, WorkerCrashed
    from deathstar.report import TaskRecord, node_summary

#: Public name -> the module that defines it.
_HOMES = {
    "Cluster": "deathstar.client", "MapResult": "deathstar.client",
    "NoNodesError": "deathstar.client", "map": "deathstar.client",
    "query_status": "deathstar.client", "Executor": "deathstar.client.executor",
    "register_joblib": "deathstar.client.joblib_backend",
    "RemoteError": "deathstar.errors", "TaskFailed": "deathstar.errors",
    "TaskTimeout": "deathstar.errors", "WorkerCrashed": "deathstar.errors",
    "TaskRecord": "deathstar.report", "node_summary": "deathstar.report",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'deathstar' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


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
