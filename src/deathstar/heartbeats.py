"""Liveness arithmetic shared by every link (client-daemon, daemon-worker): a peer's
announced heartbeat interval held to a sane range, how long its silence may last, and the
clock that tells a frozen process from silent peers."""

from __future__ import annotations

from typing import Final

from deathstar import config

#: A peer's announced heartbeat interval is held to this range (seconds): a peer that asks
#: for 1e300 must still expire, one that asks for 0 must not flood.
HEARTBEAT_MIN_S: Final = 0.05
HEARTBEAT_MAX_S: Final = config.HEARTBEAT_MAX_S


def clamp_heartbeat(hb: float) -> float:
    """A peer's heartbeat interval, held to ``HEARTBEAT_MIN_S``..``HEARTBEAT_MAX_S``."""
    return min(HEARTBEAT_MAX_S, max(HEARTBEAT_MIN_S, float(hb)))


def liveness_window(peer_hb: float, own_hb: float) -> float:
    """Seconds of silence after which a peer counts as gone: ``LIVENESS`` beats of the
    slower of the two intervals."""
    return max(clamp_heartbeat(peer_hb), own_hb) * config.LIVENESS


class StallClock:
    """Notices that this process itself was frozen (a debugger, SIGSTOP, swap, a suspended
    laptop): then its peers were not silent, it was deaf, and it must not judge them by
    the gap. Call ``stalled(now)`` once per loop turn."""

    def __init__(self, heartbeat_s: float, now: float):
        self.limit_s = max(2 * heartbeat_s, 1.0)
        self.last = now

    def stalled(self, now: float) -> float:
        """The seconds this process was frozen since the last call (0.0 when it was not)."""
        gap, self.last = now - self.last, now
        return gap if gap > self.limit_s else 0.0
