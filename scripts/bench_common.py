"""What scripts/bench.py and its parts share: the sizes of a run, its time limits, the
fresh data of each repetition, the rep loop, and the log line."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

MB = 1e6


class BenchTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise BenchTimeout in the main thread after ``seconds`` (SIGALRM)."""
    def on_alarm(signum: int, frame: Any) -> None:
        raise BenchTimeout(f"over {seconds:g} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def hard_deadline(seconds: float) -> None:
    """A watchdog: past ``seconds`` kill the processes this run started and exit."""
    def fire() -> None:
        print(f"\nbench: hard deadline of {seconds:g} s passed; stopping", file=sys.stderr,
              flush=True)
        try:
            import psutil
            for child in psutil.Process().children(recursive=True):
                try:
                    child.kill()
                except psutil.Error:
                    pass
        finally:
            os._exit(3)
    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


# ---------------------------------------------------------------------- sizes


@dataclass
class Sizes:
    reps: int
    w1_n: int
    w2_n: int
    w3_n: int
    w3_draws: int
    w4_n: int
    w4_elems: int  # float64 elements per array
    w5_n: int
    w5_mean_s: float
    w5_seeds: int  # W5 runs the same lognormal drawn with this many seeds
    w6_n: int
    w6_elems: int
    w7_n: int
    idle_s: float  # how long the idle CPU of a connected cluster is watched
    grid_samples: int  # GridSearchCV: rows of the synthetic classification set
    grid_estimators: int  # ... trees of the smaller forests (the larger have twice)
    grid_warmups: int  # GridSearchCV fits before the timed ones, per backend
    floor_rtt_n: int
    step_limit_s: float
    run_limit_s: float


FULL = Sizes(reps=3, w1_n=20_000, w2_n=300, w3_n=400, w3_draws=200_000, w4_n=32,
             w4_elems=2_000_000, w5_n=120, w5_mean_s=0.020, w5_seeds=5, w6_n=200,
             w6_elems=6_250_000, w7_n=1_000_000, idle_s=10.0, grid_samples=1000,
             grid_estimators=10, grid_warmups=1, floor_rtt_n=2000, step_limit_s=180.0,
             run_limit_s=3600.0)
QUICK = Sizes(reps=1, w1_n=2_000, w2_n=50, w3_n=40, w3_draws=200_000, w4_n=8,
              w4_elems=2_000_000, w5_n=30, w5_mean_s=0.020, w5_seeds=5, w6_n=20,
              w6_elems=6_250_000, w7_n=50_000, idle_s=1.5, grid_samples=200,
              grid_estimators=2, grid_warmups=0, floor_rtt_n=300, step_limit_s=60.0,
              run_limit_s=900.0)

# ---------------------------------------------------------------------- fresh data


def w1_data(n: int, rep: int) -> list[int]:
    return np.random.default_rng(1000 + rep).integers(0, 1 << 30, n).tolist()


def w3_seeds(n: int, rep: int) -> list[int]:
    return list(range(rep * 1_000_000, rep * 1_000_000 + n))


def w4_arrays(n: int, elems: int, rep: int) -> list[np.ndarray]:
    rng = np.random.default_rng(4000 + rep)
    return [rng.random(elems) for _ in range(n)]


def w5_durations(n: int, mean_s: float, seed: int) -> list[float]:
    """The same lognormal (mean ``mean_s``, sigma 1) drawn with seed 5000 + ``seed``."""
    sigma = 1.0  # heavy tail; lognormal mean = exp(mu + sigma^2 / 2)
    mu = math.log(mean_s) - sigma ** 2 / 2
    return np.random.default_rng(5000 + seed).lognormal(mu, sigma, n).tolist()


def w6_data(elems: int, rep: int) -> np.ndarray:
    return np.random.default_rng(6000 + rep).random(elems)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- the rep loop


def run_rep(sizes: Sizes, one_rep: Callable[[int], dict[str, float]], rep: int,
            record: Callable[[str, float], None]) -> None:
    """Repetition ``rep`` within the step's time limit (BenchTimeout past it); its figures
    recorded unless it is the warm-up (rep 0)."""
    with time_limit(sizes.step_limit_s):
        figures = one_rep(rep)
    if rep:
        for key, value in figures.items():
            record(key, value)


def run_reps(sizes: Sizes, one_rep: Callable[[int], dict[str, float]],
             record: Callable[[str, float], None]) -> None:
    """One warm-up (rep 0, discarded), then ``sizes.reps`` measured reps (1, 2, ...)."""
    for rep in range(sizes.reps + 1):
        run_rep(sizes, one_rep, rep, record)
