"""Payloads bigger than one message: an argument or a result over the per-frame cap
(``config.MAX_MESSAGE_BYTES``, 512 MiB by default) travels in pieces under it. Before, a
600 MB result to a TCP node made the daemon drop the worker's connection, and the worker
was declared hung three times over."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Callable

import numpy as np
import pytest

from deathstar.client import Cluster
from tests.conftest import ROOT, Daemon

MB = 1_000_000


def describe(a: np.ndarray) -> tuple[int, float, float]:
    return a.nbytes, float(a[0]), float(a[-1])


def make(nbytes: int, fill: float) -> np.ndarray:
    """An array of ``nbytes`` (filled a slice at a time: the worker's heartbeat thread
    runs in between, as it would around any user code that lets go of the GIL)."""
    a = np.empty(nbytes // 8, dtype=np.float64)
    for i in range(0, a.size, 1 << 20):
        a[i:i + (1 << 20)] = fill
    a[-1] = -fill
    return a


def make_bytes(nbytes: int) -> bytes:
    return b"\x07" * nbytes  # a bytes object is pickled inside the stream itself


@pytest.mark.timeout(120)
def test_frames_over_the_cap_travel_in_pieces(daemons: Callable[..., Daemon]) -> None:
    """With a 4 MiB cap on every socket (daemon, workers and client alike): a 20 MB array
    argument, a 20 MB array result and a 12 MB bytes result (one pickle stream)."""
    env = {**os.environ, "DEATHSTAR_MAX_MESSAGE_BYTES": str(4 << 20),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    node = daemons(1, env=env)
    script = textwrap.dedent("""
        import sys
        import numpy as np
        from deathstar.client import Cluster
        from tests.integration import test_large_payloads as t
        with Cluster([sys.argv[1]]) as c:
            print(c.map(t.describe, [t.make(20_000_000, 3.0)]).pop())
            print(t.describe(c.map(t.make, [20_000_000], fill=5.0).pop()))
            print(len(c.map(t.make_bytes, [12_000_000]).pop()))
            print(c.status()[0]["worker_restarts"])
    """)
    proc = subprocess.run([sys.executable, "-c", script, node.address], env=env,
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:4] == ["(20000000, 3.0, -3.0)", "(20000000, 5.0, -5.0)",
                                           "12000000", "0"]


@pytest.mark.timeout(240)
def test_600_mb_argument_and_result_to_a_tcp_node(daemons: Callable[..., Daemon]) -> None:
    # the default heartbeat, as a real node has (the tests' fast one judges a worker whose
    # 600 MB copy is slowed by a loaded machine): this test is about size, not liveness
    node = daemons(1, "--heartbeat", "1.0")
    with Cluster([node.address]) as c:
        big = make(600 * MB, 2.0)
        assert c.map(describe, [big]) == [(600 * MB, 2.0, -2.0)]
        del big
        back = c.map(make, [600 * MB], fill=9.0).pop()
        assert describe(back) == (600 * MB, 9.0, -9.0)
        del back
        records = c.map(describe, [make(8, 1.0)]).report
    assert records[0].attempts == 1
    assert node.status()["worker_restarts"] == 0
