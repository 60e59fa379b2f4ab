"""The client's view of one node: its link, state, tasks in flight, and figures."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from deathstar import config
from deathstar.client.job import Task
from deathstar.client.links import Link
from deathstar.nodes import NodeAddress

#: Node states.
CONNECTING = "connecting"
READY = "ready"
UNREACHABLE = "unreachable"
REFUSED = "refused"
DOWN = "down"  # was ready, went silent or restarted; reconnecting with backoff

RECONNECT_MIN_S = 1.0
#: How long to hold off a node whose daemon answered "busy" (doubling up to the max).
BUSY_BACKOFF_MIN_S = 0.05
BUSY_BACKOFF_MAX_S = 2.0
RECONNECT_MAX_S = 32.0


@dataclass(eq=False)
class Node:
    """The client's view of one node: its link, state, and tasks in flight there."""

    address: NodeAddress
    link: Link | None = None  # a socket, or a HostedPeer (a daemon in our loop)
    state: str = CONNECTING
    error: str = ""
    capacity: int = 0
    heartbeat_s: float = config.HEARTBEAT_INTERVAL_S
    hostname: str = ""
    versions: dict[str, Any] = field(default_factory=dict)
    shares_memory: bool = False  # it proved it reads our /dev/shm: large buffers go there
    inflight: dict[int, Task] = field(default_factory=dict)
    # blob hash -> the send id of the first task sent after it (the node has it, unless
    # it dropped it from its cache since)
    blobs_sent: dict[str, int] = field(default_factory=dict)
    deadline: float = 0.0  # handshake deadline, or next reconnect when down
    backoff_s: float = RECONNECT_MIN_S
    last_seen: float = 0.0
    last_sent: float = 0.0
    done: int = 0
    failed: int = 0
    downs: int = 0  # times it was declared lost (silent, restarted) while in use
    bytes_sent: int = 0  # payload bytes: function blobs and inputs
    busy_until: float = 0.0  # the daemon said our queue there is full: send nothing till
    busy_backoff_s: float = BUSY_BACKOFF_MIN_S
    rate: float = 0.0  # inputs done per second, as last measured
    rate_since: float = field(default_factory=time.monotonic)
    rate_done: int = 0
    # seconds a message spends in flight beyond its run: to the node, through its daemon's
    # queue-free hand-off to a worker, and back (``learn_lag``); None until measured
    lag_s: float | None = None

    @property
    def name(self) -> str:
        return self.address.name

    def window(self, short: bool, message_s: float | None = None) -> int:
        """Messages to keep in flight here: one per worker plus a few queued at the
        daemon; with short messages (``short``, each expected to run ``message_s``) also
        one waiting behind each worker's current one, and enough queued to cover the
        node's lag: what its workers finish meanwhile (at least ``PREFETCH_SHORT``, at
        most ``PREFETCH_DEPTH_MAX`` per worker, and half of what a daemon queues for one
        client: more would be answered "busy")."""
        if not short:
            return self.capacity + config.PREFETCH_PER_NODE
        queued = config.PREFETCH_SHORT
        if self.lag_s is not None and message_s is not None:
            cover = math.ceil(self.capacity * self.lag_s / max(message_s, 1e-6))
            queued = max(queued, min(cover, self.capacity * config.PREFETCH_DEPTH_MAX,
                                     config.CLIENT_QUEUE_MESSAGES // 2))
        return 2 * self.capacity + queued

    def learn_lag(self, sample_s: float) -> None:
        """Fold in one message's time in flight beyond its run, for a message sent while
        a worker here was free (it waited in no queue). A shorter one is taken as it is, a
        longer one moves the figure a quarter of the way: a slow moment (a worker starting,
        a busy machine) does not deepen the queue for long."""
        sample_s = max(0.0, sample_s)
        if self.lag_s is None or sample_s < self.lag_s:
            self.lag_s = sample_s
        else:
            self.lag_s += 0.25 * (sample_s - self.lag_s)

    def items_in_flight(self) -> int:
        return sum(len(t.indices) for t in self.inflight.values())

    def stats(self, now: float, late_results: int) -> dict[str, Any]:
        """This node's row of ``Cluster.node_stats`` (the rate over the last second or
        more)."""
        if now - self.rate_since >= 1.0:
            self.rate = (self.done - self.rate_done) / (now - self.rate_since)
            self.rate_since, self.rate_done = now, self.done
        return {"node": self.name, "state": self.state, "workers": self.capacity,
                "in_flight": self.items_in_flight(), "done": self.done,
                "failed": self.failed, "rate": self.rate, "error": self.error,
                "downs": self.downs, "late_results": late_results,
                "bytes_sent": self.bytes_sent,
                "lag_ms": None if self.lag_s is None else self.lag_s * 1000}
