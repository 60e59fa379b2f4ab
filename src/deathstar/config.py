"""Every tunable of deathstar, documented once.

Each constant can be overridden by an environment variable named ``DEATHSTAR_`` plus the
constant's name without its unit suffix (``DEATHSTAR_HEARTBEAT_INTERVAL=0.2``). The values
are read once, at import.
"""

from __future__ import annotations

import os


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get("DEATHSTAR_" + name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"DEATHSTAR_{name}={raw!r} is not a number") from None


def _env_int(name: str, default: int) -> int:
    return int(_env_float(name, default))


#: Exec port of a node named without a port; its status port is the next one and the
#: port for hand-started workers the one after.
DEFAULT_PORT = _env_int("PORT", 6000)

#: Seconds between heartbeats on a link that is otherwise quiet.
HEARTBEAT_INTERVAL_S = _env_float("HEARTBEAT_INTERVAL", 1.0)

#: Heartbeats a peer may miss before it is declared dead (window = interval x liveness).
LIVENESS = _env_int("LIVENESS", 5)

#: Seconds a client waits for a node's handshake before naming it unreachable.
CONNECT_TIMEOUT_S = _env_float("CONNECT_TIMEOUT", 5.0)

#: Attempts a task gets when its worker dies under it (crash, kill, OOM) before the input
#: fails with WorkerCrashed.
MAX_ATTEMPTS = _env_int("MAX_ATTEMPTS", 3)

#: Times a task may be re-sent because its node was lost (silent, restarted, stopping)
#: before the input fails: a lost node is not the task's fault, so this budget is apart
#: from MAX_ATTEMPTS, but it is bounded so a task that takes its node down cannot loop.
MAX_NODE_LOSSES = _env_int("MAX_NODE_LOSSES", 10)

#: Messages a client keeps in flight per node beyond its worker count, so that a worker
#: finds its next task already queued at its broker when it finishes one.
PREFETCH_PER_NODE = _env_int("PREFETCH", 2)

#: Adaptive batching aims at batches that keep a worker busy about this long: long enough
#: that per-message cost vanishes, short enough that load balancing stays fine.
BATCH_TARGET_S = _env_float("BATCH_TARGET", 0.02)

#: Upper bound on inputs per message whatever the measured task time.
BATCH_MAX_ITEMS = _env_int("BATCH_MAX_ITEMS", 4096)

#: Largest message the exec and worker ports accept, in bytes.
MAX_MESSAGE_BYTES = _env_int("MAX_MESSAGE_BYTES", 512 * 1024 * 1024)

#: Largest message the status port accepts, in bytes.
MAX_STATUS_MESSAGE_BYTES = _env_int("MAX_STATUS_MESSAGE_BYTES", 4096)

#: Bytes of function-and-common-argument blobs a daemon keeps cached.
BLOB_CACHE_BYTES = _env_int("BLOB_CACHE_BYTES", 2 * 1024 * 1024 * 1024)

#: Seconds between checks of the daemon's worker processes (exit is noticed this fast).
SUPERVISE_INTERVAL_S = _env_float("SUPERVISE_INTERVAL", 0.1)

#: Seconds to wait for an embedded local daemon to report its ports.
EMBEDDED_START_TIMEOUT_S = _env_float("EMBEDDED_START_TIMEOUT", 20.0)

#: Set DEATHSTAR_DEBUG=1 to log every message each component sends and receives.
DEBUG = os.environ.get("DEATHSTAR_DEBUG", "") not in ("", "0")
