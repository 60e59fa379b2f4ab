"""The workloads of scripts/bench.py, each a factory of its repetition: ``WORKLOADS[w](system,
sizes)`` returns a function of the repetition number (0: the warm-up) that runs one
repetition on ``system`` and returns its figures. ``bench.run_reps`` runs one system's
repetitions in a row; ``bench.run_paired`` runs several systems' taking turns."""

from __future__ import annotations

import functools
import statistics
import time
from typing import Callable

import numpy as np

import bench_cpu
import bench_stateful as S
import bench_tasks as T
from bench_common import MB, Sizes, w1_data, w3_seeds, w4_arrays, w5_durations, w6_data
from bench_systems import DeathstarSystem, System

#: One repetition of a workload on one system: rep number (0: the warm-up) -> figures.
Rep = Callable[[int], dict[str, float]]

#: Seconds an idle cluster is left after its first map before its CPU is watched.
IDLE_SETTLE_S = 1.0

#: A W1 rep runs its map again while it has run less than W1_REPEAT_S, at most
#: W1_REPEAT_MAX times, and counts the median map: a batched map of 20,000 tiny inputs
#: takes a few milliseconds, and one such map is mostly the machine's noise.
W1_REPEAT_S = 0.3
W1_REPEAT_MAX = 15


def w1(system: System, sizes: Sizes) -> Rep:
    """A rep: each W1 variant (batched, one per message), each the median of its maps."""
    def one(rep: int) -> dict[str, float]:
        data = w1_data(sizes.w1_n, rep)
        figures = {}
        for label, chunksize in system.w1_variants.items():
            walls: list[float] = []
            began = time.perf_counter()
            while not walls or (len(walls) < W1_REPEAT_MAX
                                and time.perf_counter() - began < W1_REPEAT_S):
                t0 = time.perf_counter()
                out = system.map(T.inc, data, chunksize)
                walls.append(time.perf_counter() - t0)
                assert out[-1] == data[-1] + 1 and len(out) == len(data)
            figures[f"W1.{label}.tasks_s"] = len(data) / statistics.median(walls)
        return figures
    return one


def w2(system: System, sizes: Sizes) -> Rep:
    def one(rep: int) -> dict[str, float]:
        lat = []
        for x in w1_data(sizes.w2_n, rep):
            t0 = time.perf_counter()
            y = system.call(T.inc, x)
            lat.append(time.perf_counter() - t0)
            assert y == x + 1
        lat_us = np.array(lat) * 1e6
        return {"W2.median_us": float(np.median(lat_us)),
                "W2.p99_us": float(np.percentile(lat_us, 99))}
    return one


def w3(system: System, sizes: Sizes) -> Rep:
    """Efficiency = serial time / (wall x workers), the function taken from a user module
    that holds module state (bench_stateful: a threading.local cache and a Lock). The
    serial time is measured in this process on the same seeds right before each parallel
    rep (workers idle); see ``share_w3_serial`` for the reference the table uses."""
    fn = functools.partial(S.estimate_pi, draws=sizes.w3_draws)
    def one(rep: int) -> dict[str, float]:
        seeds = w3_seeds(sizes.w3_n, rep)
        t0 = time.perf_counter()
        for s in seeds:
            S.estimate_pi(s, sizes.w3_draws)
        serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        if isinstance(system, DeathstarSystem):  # its way: common keyword arguments
            out = system.map_common(S.estimate_pi, seeds, {"draws": sizes.w3_draws})
        else:
            out = system.map(fn, seeds)
        wall = time.perf_counter() - t0
        assert len(out) == len(seeds) and 3.0 < out[0] < 3.3
        return {"W3.wall_s": wall, "W3.serial_s": serial,
                "W3.efficiency": serial / (wall * system.workers)}
    return one


def w4(system: System, sizes: Sizes) -> Rep:
    def one(rep: int) -> dict[str, float]:
        arrays = w4_arrays(sizes.w4_n, sizes.w4_elems, rep)
        t0 = time.perf_counter()
        out = system.map(T.array_sum, arrays)
        wall = time.perf_counter() - t0
        assert abs(out[0] - arrays[0].sum()) < 1e-3
        return {"W4.MB_s": sum(a.nbytes for a in arrays) / MB / wall}
    return one


def w5(system: System, sizes: Sizes) -> Rep:
    """Makespan / ideal for the same lognormal drawn with seeds 1..``w5_seeds``; a rep runs
    every seed (the warm-up the first only); ``derive_w5`` takes the worst seed."""
    def one(rep: int) -> dict[str, float]:
        figures = {}
        for seed in range(1, (sizes.w5_seeds if rep else 1) + 1):
            durations = w5_durations(sizes.w5_n, sizes.w5_mean_s, seed)
            ideal = max(sum(durations) / system.workers, max(durations))
            t0 = time.perf_counter()
            out = system.map(T.sleep_for, durations)
            wall = time.perf_counter() - t0
            assert len(out) == len(durations)
            figures[f"W5.seed{seed}"] = wall / ideal
        return figures
    return one


def w6(system: System, sizes: Sizes) -> Rep:
    def one(rep: int) -> dict[str, float]:
        data = w6_data(sizes.w6_elems, rep)
        before = system.bytes_sent()
        t0 = time.perf_counter()
        out = system.map_common(T.common_lookup, list(range(sizes.w6_n)), {"data": data})
        wall = time.perf_counter() - t0
        assert out[1] == float(data[1])
        figures = {"W6.wall_s": wall}
        after = system.bytes_sent()
        if before is not None and after is not None:
            figures["W6.sent_MB"] = (after - before) / MB
            figures["W6.common_MB"] = data.nbytes / MB
        return figures
    return one


def idle(system: System, sizes: Sizes) -> Rep:
    """CPU of a connected, idle cluster, as % of one core: after a first map and
    IDLE_SETTLE_S, the CPU seconds this process and all its children (daemon and
    workers, local or TCP; a Pool's workers) spend over ``sizes.idle_s``. deathstar's
    Executor (of W2) is shut down first: the cluster alone is measured."""
    def one(rep: int) -> dict[str, float]:
        system.quiesce()
        assert system.map(T.inc, list(range(100)))[-1] == 100
        if not rep:
            return {}  # the warm-up: the first map only
        time.sleep(IDLE_SETTLE_S)
        before, t0 = bench_cpu.snapshot(self_last=True), time.perf_counter()
        time.sleep(sizes.idle_s)
        after, wall = bench_cpu.snapshot(), time.perf_counter() - t0
        return {"IDLE.cpu_pct": 100.0 * bench_cpu.seconds_between(before, after) / wall}
    return one


WORKLOADS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5, "W6": w6, "IDLE": idle}
