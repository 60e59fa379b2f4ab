"""W3's function for scripts/bench.py, in a user module that holds module state: a
per-thread scratch buffer (``threading.local``) and a call counter behind a
``threading.Lock``, the shape of real code that caches per worker. Neither object pickles,
so a system that ships this module by value must rebuild them where it runs; every system
imports it by name (``bench_stateful``) from the scripts folder on PYTHONPATH."""

from __future__ import annotations

import threading

import numpy as np

#: Per-thread scratch: the (draws, 2) buffer of the last call, reused when it fits.
_scratch = threading.local()
#: Guards ``_calls``.
_lock = threading.Lock()
_calls = 0


def calls() -> int:
    """How many times ``estimate_pi`` ran in this process."""
    with _lock:
        return _calls


def _points(draws: int) -> np.ndarray:
    buf = getattr(_scratch, "points", None)
    if buf is None or buf.shape[0] != draws:
        buf = _scratch.points = np.empty((draws, 2))
    return buf


def estimate_pi(seed: int, draws: int = 100_000) -> float:
    """The seed's estimatePi (same figure as bench_tasks.estimate_pi), drawing into this
    thread's cached buffer and counting the call under the module's lock."""
    global _calls
    with _lock:
        _calls += 1
    points = _points(draws)
    np.random.default_rng(seed).random(out=points)
    inside = np.count_nonzero(np.einsum("ij,ij->i", points, points) <= 1.0)
    return 4.0 * inside / draws
