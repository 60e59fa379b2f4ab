"""W3 with deathstar's embedded cluster and ``multiprocessing.Pool`` taking turns, map by
map, in one process: 400 x ``bench_stateful.estimate_pi`` (200,000 draws), 2 workers
each, the serial time measured before each pair. ``make bench`` runs each system's
repetitions together, so a slow minute of this noisy machine lands on one system; here
both see it alike. Prints each system's efficiency, serial / (wall x 2), per pair and
the median.

    .venv/bin/python scripts/w3_alternating.py [PAIRS]
"""

from __future__ import annotations

import functools
import multiprocessing
import statistics
import sys
import time

import bench_stateful as S
from deathstar import Cluster

SEEDS = list(range(400))
DRAWS = 200_000


def main() -> None:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    fn = functools.partial(S.estimate_pi, draws=DRAWS)
    ours: list[float] = []
    theirs: list[float] = []
    with Cluster(None, workers=2) as cluster, multiprocessing.Pool(2) as pool:
        cluster.map(S.estimate_pi, SEEDS[:20], draws=DRAWS)  # warm-up
        pool.map(fn, SEEDS[:20])
        for _ in range(pairs):
            t0 = time.perf_counter()
            for seed in SEEDS:
                S.estimate_pi(seed, DRAWS)
            serial = time.perf_counter() - t0
            t0 = time.perf_counter()
            cluster.map(S.estimate_pi, SEEDS, draws=DRAWS)
            ours.append(serial / (2 * (time.perf_counter() - t0)))
            t0 = time.perf_counter()
            pool.map(fn, SEEDS)
            theirs.append(serial / (2 * (time.perf_counter() - t0)))
    for name, effs in (("deathstar embedded", ours), ("multiprocessing.Pool", theirs)):
        print(f"{name:22s} median {statistics.median(effs):.3f}  "
              + " ".join(f"{e:.3f}" for e in effs))


if __name__ == "__main__":
    main()
