"""Where the CPU of a call goes, deathstar beside the stdlib pools, in one run: W2 (N
single calls, ``submit(inc, x).result()`` one at a time) and W1 with one input per
message (a map of M ``inc`` with chunksize 1), each system in turn, ROUNDS times. For
each: the wall (W2: median latency; W1: rate), and the CPU per call (W1: per input) of
the calling process (all its threads: your thread, deathstar's I/O loop with the embedded
daemon in it, or Pool's handler threads) and of its workers, user and system apart, from
/proc (counted in clock ticks, 10 ms: the default sizes keep that to a few per cent,
but for the stdlib pools' workers, whose CPU per call is small). On a machine of two
cores and one GIL per process, the calling process's CPU is what a single call waits
on; this prints it. A diagnostic, not a benchmark.

    .venv/bin/python scripts/cpu_per_call.py [--rounds 3] [--calls 3000] [--inputs 10000]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import bench_tasks as T

TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def _children() -> list[int]:
    """This process's child processes (its workers)."""
    kids: list[int] = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def _workers_cpu(pids: list[int]) -> tuple[float, float]:
    user = system = 0.0
    for pid in pids:
        try:
            u, s = _cpu(pid)
        except OSError:
            continue  # gone
        user, system = user + u, system + s
    return user, system


class Measured:
    """One system's figures in one round: wall figure and CPU per unit."""

    def __init__(self, wall: float, n: int, before: tuple[Any, ...], after: tuple[Any, ...]):
        (su0, ss0), (wu0, ws0) = before
        (su1, ss1), (wu1, ws1) = after
        self.wall = wall
        self.self_user, self.self_sys = (su1 - su0) / n * 1e6, (ss1 - ss0) / n * 1e6
        self.work_user, self.work_sys = (wu1 - wu0) / n * 1e6, (ws1 - ws0) / n * 1e6


def _snapshot(workers: list[int]) -> tuple[Any, ...]:
    return _cpu(os.getpid()), _workers_cpu(workers)


def w2(call: Callable[[int], Any], calls: int) -> Measured:
    for i in range(200):
        call(i)
    workers = _children()
    before = _snapshot(workers)
    latencies = []
    for i in range(calls):
        began = time.perf_counter()
        assert call(i) == i + 1
        latencies.append(time.perf_counter() - began)
    return Measured(statistics.median(latencies) * 1e6, calls, before, _snapshot(workers))


def w1(map_one: Callable[[list[int]], list[int]], inputs: int) -> Measured:
    data = list(range(inputs))
    map_one(data[:1000])
    workers = _children()
    before = _snapshot(workers)
    began = time.perf_counter()
    out = map_one(data)
    wall = time.perf_counter() - began
    assert out[-1] == inputs
    return Measured(inputs / wall, inputs, before, _snapshot(workers))


def run_deathstar(calls: int, inputs: int) -> tuple[Measured, Measured]:
    from deathstar import Cluster
    from deathstar.client.executor import Executor

    with Cluster(None, workers=2) as cluster, Executor(cluster) as ex:
        a = w2(lambda x: ex.submit(T.inc, x).result(), calls)
        b = w1(lambda xs: cluster.map(T.inc, xs, chunksize=1), inputs)
    return a, b


def run_pool(calls: int, inputs: int) -> tuple[Measured, Measured]:
    with mp.get_context("fork").Pool(2) as pool:
        a = w2(lambda x: pool.apply_async(T.inc, (x,)).get(), calls)
        b = w1(lambda xs: pool.map(T.inc, xs, chunksize=1), inputs)
    return a, b


def run_ppe(calls: int, inputs: int) -> tuple[Measured, Measured]:
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as ex:
        a = w2(lambda x: ex.submit(T.inc, x).result(), calls)
        b = w1(lambda xs: list(ex.map(T.inc, xs, chunksize=1)), inputs)
    return a, b


SYSTEMS = {"deathstar embedded": run_deathstar, "Pool": run_pool,
           "ProcessPoolExecutor": run_ppe}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--inputs", type=int, default=10_000)
    args = parser.parse_args()
    got: dict[str, list[tuple[Measured, Measured]]] = {name: [] for name in SYSTEMS}
    for _ in range(args.rounds):
        for name, run in SYSTEMS.items():
            got[name].append(run(args.calls, args.inputs))
    med = statistics.median
    print(f"median of {args.rounds} rounds; CPU in µs per call (W2) or per input (W1), "
          "user + system")
    header = ("system", "W2 µs", "caller CPU", "workers CPU", "W1 /s", "caller CPU",
              "workers CPU")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, rounds in got.items():
        a = [r[0] for r in rounds]
        b = [r[1] for r in rounds]
        print(f"| {name} | {med(m.wall for m in a):.0f} "
              f"| {med(m.self_user for m in a):.0f} + {med(m.self_sys for m in a):.0f} "
              f"| {med(m.work_user for m in a):.0f} + {med(m.work_sys for m in a):.0f} "
              f"| {med(m.wall for m in b):,.0f} "
              f"| {med(m.self_user for m in b):.0f} + {med(m.self_sys for m in b):.0f} "
              f"| {med(m.work_user for m in b):.0f} + {med(m.work_sys for m in b):.0f} |")


if __name__ == "__main__":
    main()
