"""What a daemon knows of its peers: clients (their queues, liveness, blobs) and workers
(the task messages they hold), plus its counters and a rate-limited log."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from deathstar.protocol import Message

log = logging.getLogger("deathstar.daemon")


@dataclass
class ClientConn:
    """A client that said hello: its queued task messages and its liveness."""

    ident: bytes
    heartbeat_s: float
    last_seen: float
    last_sent: float = 0.0
    queue: deque[Message] = field(default_factory=deque)
    blobs: set[str] = field(default_factory=set)


@dataclass
class Assignment:
    """A task message a worker holds: whose, its id, its inputs, and when it times out."""

    client: bytes
    id: int
    n: int
    deadline: float | None  # monotonic; None: no timeout
    timeout_s: float | None


@dataclass
class WorkerConn:
    """A worker that said ready, and the task messages it holds (oldest first)."""

    ident: bytes
    name: str
    pid: int
    heartbeat_s: float
    last_seen: float
    assigned: deque[Assignment] = field(default_factory=deque)


@dataclass
class Counters:
    tasks_done: int = 0
    tasks_lost: int = 0
    tasks_timed_out: int = 0
    tasks_killed: int = 0  # running tasks of clients that cancelled or vanished
    blobs_received: int = 0  # functions + common arguments, each sent once per client
    blob_bytes_received: int = 0
    bad_messages: int = 0


class RateLimitedLog:
    """At most one log line per ``interval_s``; says how many were suppressed."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.next_at = 0.0
        self.suppressed = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return
        if self.suppressed:
            msg += f" ({self.suppressed} similar lines suppressed)"
        log.warning(msg, *args)
        self.suppressed = 0
        self.next_at = now + self.interval_s
