"""Two source trees of deathstar taking turns on the workloads bound by the client's I/O
loop: W2 (5,000 ``Executor.submit(inc, x).result()`` on the embedded cluster, median
latency) and W1 with one input per message (3 maps of 10,000 ``inc`` with
``chunksize=1``, the median rate), each with the loop thread's CPU (user + system, from
/proc) per call or message. Each run is a fresh process with the tree first on
``PYTHONPATH``, so a slow minute of this noisy machine lands on both trees alike.

    git worktree add --detach /tmp/old HEAD~3
    .venv/bin/python scripts/loop_ab.py /tmp/old/src src [ROUNDS]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

W2_CALLS = 5000
W1_INPUTS = 10_000


def _loop_cpu_s() -> float:
    """CPU seconds of this process's I/O loop thread so far."""
    tid = next(t.native_id for t in threading.enumerate() if t.name == "deathstar-daemon")
    fields = Path(f"/proc/{os.getpid()}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure() -> None:
    """One run (in the child): prints ``w2_us w2_cpu_us w1_rate w1_cpu_us``."""
    import bench_tasks as T
    from deathstar import Cluster
    from deathstar.client.executor import Executor

    with Cluster(None, workers=2) as cluster:
        ex = Executor(cluster)
        for i in range(300):
            ex.submit(T.inc, i).result()
        latencies = []
        cpu = _loop_cpu_s()
        for i in range(W2_CALLS):
            began = time.perf_counter()
            ex.submit(T.inc, i).result()
            latencies.append(time.perf_counter() - began)
        w2_cpu = (_loop_cpu_s() - cpu) / W2_CALLS
        ex.shutdown()
        cluster.map(T.inc, range(2000), chunksize=1)
        rates, cpus = [], []
        for _ in range(3):
            cpu, began = _loop_cpu_s(), time.perf_counter()
            cluster.map(T.inc, range(W1_INPUTS), chunksize=1)
            rates.append(W1_INPUTS / (time.perf_counter() - began))
            cpus.append((_loop_cpu_s() - cpu) / W1_INPUTS)
    print(statistics.median(latencies) * 1e6, w2_cpu * 1e6, statistics.median(rates),
          statistics.median(cpus) * 1e6)


def run(tree: str) -> list[float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, str(HERE)]))
    out = subprocess.run([sys.executable, __file__, "--child"], env=env, check=True,
                         capture_output=True, text=True, timeout=600).stdout
    return [float(v) for v in out.split()]


def main(args: list[str]) -> None:
    if args[:1] == ["--child"]:
        measure()
        return
    if len(args) < 2:
        raise SystemExit(__doc__)
    trees, rounds = args[:2], int(args[2]) if len(args) > 2 else 4
    results: dict[str, list[list[float]]] = {tree: [] for tree in trees}
    print(f"{'tree':30s} {'W2 µs':>8s} {'loop µs':>8s} {'W1 1/msg':>10s} {'loop µs':>8s}")
    for _ in range(rounds):
        for tree in trees:
            row = run(tree)
            results[tree].append(row)
            print(f"{tree[-30:]:30s} {row[0]:8.0f} {row[1]:8.0f} {row[2]:10,.0f} {row[3]:8.1f}",
                  flush=True)
    for tree in trees:
        medians = [statistics.median(r[k] for r in results[tree]) for k in range(4)]
        print(f"median {tree[-23:]:23s} {medians[0]:8.0f} {medians[1]:8.0f} "
              f"{medians[2]:10,.0f} {medians[3]:8.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
