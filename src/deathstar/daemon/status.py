"""The status map a daemon answers a status request with (``deathstar status``)."""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

from deathstar import config, heartbeats, protocol
from deathstar.daemon.books import BlobCache, Counters
from deathstar.daemon.clients import ClientSessions
from deathstar.daemon.supervisor import Supervisor
from deathstar.daemon.workers import WorkerSessions
from deathstar.keys import Gatekeeper


class Daemon(Protocol):
    """What of a daemon (``loop.Daemon``) its status shows."""

    pool: WorkerSessions
    sessions: ClientSessions
    counters: Counters
    blobs: BlobCache
    supervisor: Supervisor
    gate: Gatekeeper
    node_name: str
    started: float
    stopping: bool


def status_map(daemon: Daemon) -> dict[str, Any]:
    """What ``deathstar status`` shows of a daemon: its versions, its workers and what
    they do, its queues and their limits, its counters."""
    busy = daemon.pool.busy()
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = -1.0
    return {
        "hostname": daemon.node_name,
        "versions": protocol.local_versions(),
        "workers": len(daemon.pool),
        "idle": len(daemon.pool) - busy,
        "busy": busy,
        "queued": sum(len(c.queue) for c in daemon.sessions.clients.values()),
        "queued_bytes": sum(c.queued_bytes for c in daemon.sessions.clients.values()),
        "tasks_busy": daemon.counters.tasks_busy,
        "tasks_recalled": daemon.counters.tasks_recalled,
        "blob_cache_entries": len(daemon.blobs),
        "limits": {"clients": config.MAX_CLIENTS,
                   "client_queue_messages": config.CLIENT_QUEUE_MESSAGES,
                   "client_queue_bytes": config.CLIENT_QUEUE_BYTES,
                   "blob_cache_bytes": config.BLOB_CACHE_BYTES,
                   "blob_cache_entries": config.BLOB_CACHE_ENTRIES,
                   "heartbeat_s": [heartbeats.HEARTBEAT_MIN_S, heartbeats.HEARTBEAT_MAX_S]},
        "clients": len(daemon.sessions.clients),
        "tasks_done": daemon.counters.tasks_done,
        "tasks_lost": daemon.counters.tasks_lost,
        "tasks_timed_out": daemon.counters.tasks_timed_out,
        "tasks_killed": daemon.counters.tasks_killed,
        "tasks_prefetched": daemon.counters.tasks_prefetched,
        "worker_restarts": daemon.supervisor.restarts,
        "workers_recycled": daemon.supervisor.recycled,
        "blobs_received": daemon.counters.blobs_received,
        "blobs_cached": len(daemon.blobs),
        "blob_cache_bytes": daemon.blobs.bytes,
        "blobs_evicted": daemon.blobs.evicted,
        "blob_bytes_received": daemon.counters.blob_bytes_received,
        "bad_messages": daemon.counters.bad_messages,
        "refused_handshakes": daemon.gate.refused,
        "uptime_s": round(time.monotonic() - daemon.started, 3),
        "load1": load1,
        "stopping": daemon.stopping,
    }
