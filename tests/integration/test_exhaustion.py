"""An admitted client tries to exhaust a daemon (issue 14, attack 4): a flood of empty
blobs, large tasks queued past any bound, a heartbeat interval that never expires. The
daemon's memory is read with psutil and held to generous bounds (no timing thresholds)."""

from __future__ import annotations

import os
from typing import Iterator

import psutil
import pytest
import zmq

import deathstar
from deathstar import protocol
from tests import jobs
from tests.conftest import Daemon, start_daemon, wait_for

pytestmark = pytest.mark.timeout(180)

MB = 1 << 20


def _client(d: Daemon, hb: float = 1.0) -> zmq.Socket[bytes]:
    """An admitted client socket that said hello (and got welcome)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(f"tcp://127.0.0.1:{d.port}")
    sock.send_multipart(protocol.pack(protocol.HELLO, versions=protocol.local_versions(),
                                      hb=hb))
    assert sock.poll(10_000)
    assert protocol.decode(sock.recv_multipart()).type == protocol.WELCOME
    return sock


def _rss_mb(d: Daemon) -> float:
    return float(psutil.Process(d.proc.pid).memory_info().rss) / MB


def _lost_codes(sock: zmq.Socket[bytes], count: int) -> list[str]:
    codes: list[str] = []
    while len(codes) < count and sock.poll(30_000):
        msg = protocol.decode(sock.recv_multipart())
        if msg.type == protocol.LOST:
            codes += [msg.env.get(protocol.F_CODE, "")] * len(msg.env["ids"])
    return codes


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    env = {**os.environ, "DEATHSTAR_CLIENT_QUEUE_BYTES": str(128 * MB),
           "DEATHSTAR_HEARTBEAT_MAX": "1"}
    d = start_daemon(0, env=env, wait_workers=False)
    try:
        yield d
    finally:
        d.stop()


def test_empty_blobs_are_not_free(daemon: Daemon) -> None:
    sock = _client(daemon)
    base = _rss_mb(daemon)
    for i in range(50_000):
        sock.send_multipart(protocol.pack(protocol.BLOB, [], h=f"{i:064x}"))
    wait_for(lambda: daemon.status()["blobs_received"] >= 50_000, 60,
             "the daemon to take 50,000 blobs")
    status = daemon.status()
    assert status["blob_cache_entries"] <= status["limits"]["blob_cache_entries"] == 4096
    assert status["blobs_evicted"] >= 50_000 - 4096
    assert _rss_mb(daemon) - base < 64, f"grew {_rss_mb(daemon) - base:.0f} MB"
    sock.close()


def test_queued_bytes_per_client_are_bounded(daemon: Daemon) -> None:
    """No worker: every task queues. Past 128 MiB the daemon answers busy instead of
    holding 8 x 64 MiB."""
    sock = _client(daemon)
    sock.send_multipart(protocol.pack(protocol.BLOB, [b"f"], h="fn"))
    base = _rss_mb(daemon)
    chunk = b"\0" * (64 * MB)
    for send_id in range(1, 9):
        sock.send_multipart(protocol.pack(protocol.TASK, [chunk], id=send_id, fn="fn", n=1,
                                          timeout=None), copy=False)
    codes = _lost_codes(sock, 6)
    assert codes == [protocol.LOST_BUSY] * 6
    status = daemon.status()
    assert status["queued"] == 2 and status["queued_bytes"] == 128 * MB
    assert status["tasks_busy"] == 6
    assert _rss_mb(daemon) - base < 400, f"grew {_rss_mb(daemon) - base:.0f} MB"
    sock.close()


def test_a_client_that_asks_for_an_endless_heartbeat_still_expires(daemon: Daemon) -> None:
    sock = _client(daemon, hb=1e9)  # 1e300 does not pass the schema at all
    assert daemon.status()["clients"] == 1
    # silent from now on: with the interval held to 1 s it is gone after 5 s of silence
    wait_for(lambda: daemon.status()["clients"] == 0, 30, "the silent client to expire")
    sock.close()


def test_a_busy_node_is_backed_off_and_the_map_is_exact() -> None:
    """The real client against a tiny per-client queue: tasks answered busy go again
    later, none is charged an attempt, every result is there once."""
    env = {**os.environ, "DEATHSTAR_CLIENT_QUEUE_MESSAGES": "1"}
    d = start_daemon(1, env=env)
    try:
        res = deathstar.map(jobs.square, range(300), cluster=[d.address], chunksize=1,
                            max_attempts=1)
        assert list(res) == [x * x for x in range(300)]
        assert all(r.attempts == 1 for r in res.report)
        assert d.status()["tasks_busy"] > 0
    finally:
        d.stop()


