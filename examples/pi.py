"""Estimate pi by throwing darts: the seed's ``estimatePi``.

Each call draws ``draws`` points uniformly in the unit square from a generator seeded
with ``seed`` and returns 4 x the fraction that falls inside the quarter circle. Averaging
many calls converges on pi; the seeds make every call reproducible wherever it runs.

    deathstar map examples.pi:estimate_pi --args examples/seeds.jsonl --kwargs '{"draws": 100000}'
"""

from __future__ import annotations

import json
import sys

import numpy as np


def estimate_pi(seed: int, draws: int = 100_000) -> float:
    """4 x the fraction of ``draws`` seeded uniform points inside the unit circle."""
    rng = np.random.default_rng(seed)
    points = rng.random((draws, 2))
    inside = np.count_nonzero(np.einsum("ij,ij->i", points, points) <= 1.0)
    return 4.0 * inside / draws


def mean_of_results(path: str) -> tuple[float, int]:
    """Mean of the results in a ``deathstar map`` JSONL output, and how many there were."""
    values = []
    with open(path) as fh:
        for line in fh:
            row = json.loads(line)
            if "result" in row:
                values.append(row["result"])
    return sum(values) / len(values), len(values)


if __name__ == "__main__":
    mean, n = mean_of_results(sys.argv[1])
    print(f"pi ≈ {mean:.5f}  (mean of {n} estimates; error {abs(mean - np.pi):.1e})")
