"""The GridSearchCV row of scripts/bench.py: scikit-learn's ``GridSearchCV`` (60
random-forest fits) through joblib, serial, on loky (joblib's default backend) and on
deathstar's joblib backend with no cluster given (``deathstar.register_joblib()``, then
``joblib.parallel_config(backend="deathstar")``: the embedded cluster deathstar starts by
itself, one worker per core).

Each backend runs in a fresh child process of this file (``python bench_grid.py --backend
loky ...``), so that neither inherits the other's warm workers or this benchmark's
imports; the child fits once to warm up, then times ``reps`` fits and prints the walls as
one JSON line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import Sizes, log

SCRIPTS = Path(__file__).resolve().parent

#: 12 parameter combinations x 5 folds = 60 random-forest fits (and one refit).
CV_FOLDS = 5
BACKENDS = ("serial", "loky", "deathstar")


def param_grid(estimators: int) -> dict[str, list[Any]]:
    return {"n_estimators": [estimators, 2 * estimators], "max_depth": [4, 8, None],
            "max_features": ["sqrt", 0.5]}


def fit_once(backend: str, samples: int, estimators: int) -> float:
    """One GridSearchCV fit under ``backend``; returns its wall time in seconds."""
    import joblib
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import GridSearchCV

    X, y = make_classification(n_samples=samples, n_features=20, n_informative=8,
                               random_state=0)
    search = GridSearchCV(RandomForestClassifier(random_state=0), param_grid(estimators),
                          cv=CV_FOLDS, n_jobs=1 if backend == "serial" else -1)
    t0 = time.perf_counter()
    if backend == "serial":
        search.fit(X, y)
    else:
        with joblib.parallel_config(backend=backend):
            search.fit(X, y)
    wall = time.perf_counter() - t0
    fits = len(search.cv_results_["params"]) * CV_FOLDS
    if fits != 60 or not 0.5 < search.best_score_ <= 1.0:
        raise RuntimeError(f"{fits} fits, best score {search.best_score_}")
    return wall


def child_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=BACKENDS, required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmups", type=int, default=1)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--estimators", type=int, default=20)
    args = ap.parse_args(argv)
    if args.backend == "deathstar":
        import deathstar
        deathstar.register_joblib()
    for _ in range(args.warmups):
        fit_once(args.backend, args.samples, args.estimators)
    walls = [fit_once(args.backend, args.samples, args.estimators) for _ in range(args.reps)]
    print(json.dumps({"backend": args.backend, "walls": walls}), flush=True)
    return 0


def run_grid(sizes: Sizes, res: Any) -> None:
    """Each backend in its own child; walls recorded as ``GRID.wall_s`` under the
    system names "serial", "loky" and "deathstar"."""
    if importlib.util.find_spec("sklearn") is None:  # the children need it; not imported
        res.notes.append("GridSearchCV: scikit-learn is not installed (pip install -e "
                         "'.[test]'): left out")
        for name in BACKENDS:
            res.error(name, "GRID", "no scikit-learn")
        return
    for backend in BACKENDS:
        serial = backend == "serial"
        reps, warmups = (1, 0) if serial else (sizes.reps, sizes.grid_warmups)
        log(f"{backend}: GridSearchCV, {reps} rep(s) after {warmups} warm-up(s)")
        cmd = [sys.executable, str(SCRIPTS / "bench_grid.py"), "--backend", backend,
               "--reps", str(reps), "--warmups", str(warmups),
               "--samples", str(sizes.grid_samples),
               "--estimators", str(sizes.grid_estimators)]
        try:
            proc = subprocess.run(cmd, cwd=SCRIPTS, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=sizes.step_limit_s * 2)
        except subprocess.TimeoutExpired:
            res.error(backend, "GRID", "timeout")
            log(f"{backend}: GridSearchCV timed out")
            continue
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            res.error(backend, "GRID", tail[0][:120])
            log(f"{backend}: GridSearchCV failed: {proc.stderr.strip()[-400:]}")
            continue
        for wall in json.loads(proc.stdout.strip().splitlines()[-1])["walls"]:
            res.add(backend, "GRID.wall_s", wall)
    res.notes.append(f"GridSearchCV: {sizes.grid_samples} samples × 20 features, 60 "
                     f"random-forest fits ({sizes.grid_estimators} or "
                     f"{2 * sizes.grid_estimators} trees), n_jobs=-1 (one worker per core); "
                     f"each backend in a fresh process, {sizes.grid_warmups} warm-up fit(s) "
                     "then the timed ones (serial: one timed fit, no warm-up)")


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))


