"""deathstar beside multiprocessing, concurrent.futures, Dask, Ray and loky, judged on
issue 16's targets.

    .venv/bin/python scripts/bench.py [--quick] [--only W1,W3,idle,grid] [--workers N]
                                      [--deathstar embedded,tcp]
                                      [--peers pool,ppe,loky,dask,ray] [--json out/bench.json]

deathstar runs in two columns, the client in this process either way: the embedded local
cluster (``Cluster(None, workers=N)``: a daemon and N workers on this machine) and a TCP
node on loopback (a ``deathstar daemon --host 127.0.0.1 --port 0 --workers N --insecure``
child process, the client connected with ``keys="none"``). Every peer gets the same
worker count and the same functions (scripts/bench_tasks.py; W3's from the stateful
module scripts/bench_stateful.py); every repetition gets fresh data; each figure is the
median of the repetitions after one warm-up (a W1 repetition is itself the median of
up to 15 maps of its data: one map of 20,000 tiny inputs lasts milliseconds); setup time
(start to first result) is reported apart. The workloads judged against Pool (W1-W4) run
with Pool and the deathstar columns open together, taking turns repetition by
repetition, so that the machine's slow minutes fall on all of them alike; the rest run
system by system. W5 runs one lognormal drawn with 5 seeds and
is judged on the worst; idle is the CPU of this process and all its children (daemon,
workers) while a connected cluster sits idle after a first map; GridSearchCV (bench_grid.py) runs
scikit-learn through joblib with no cluster given, beside loky. Dask, Ray and loky (or
joblib's copy of loky) are used when importable.

Floor columns show what the machine allows: a raw pyzmq round trip and 16 MB zero-copy
transfer between two processes, and a brokered chain (client -> bare pyzmq broker ->
bare workers, one task per message), the shape deathstar has with nothing else in it.

Only loopback traffic; every step has a time limit and the whole run a hard deadline.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(1, str(ROOT))  # tests.swarm: the lightweight workers of W7
# every child (daemon, workers, Dask/Ray workers, CLI) imports bench_tasks by name
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(SCRIPTS), str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
# "no cluster given" must mean the embedded cluster here and in every child (GridSearchCV)
os.environ.pop("DEATHSTAR_CLUSTER", None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home: loopback only
os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")

from bench_common import (FULL, QUICK, BenchTimeout, Sizes, hard_deadline, log,  # noqa: E402
                          run_rep, run_reps, time_limit)
from bench_floors import run_floors  # noqa: E402
from bench_grid import run_grid  # noqa: E402
from bench_report import ALL_PEERS, Results, render, rows_for  # noqa: E402
from bench_systems import SYSTEMS, System, importable  # noqa: E402
from bench_targets import worst_of_seeds  # noqa: E402
from bench_workloads import IDLE_SETTLE_S, WORKLOADS  # noqa: E402
from bench_w7 import run_w7, run_w7_workers  # noqa: E402

ALL_WORKLOADS = ["SETUP", "W1", "W2", "W3", "W4", "W5", "W6", "W7", "IDLE", "GRID"]
#: The workloads run on each system (setup comes with starting it).
SYSTEM_WORKLOADS = {"SETUP", "W1", "W2", "W3", "W4", "W5", "W6", "IDLE"}
#: The deathstar columns: --deathstar name -> system.
DEATHSTAR_COLUMNS = {"embedded": "deathstar", "tcp": "deathstar-tcp"}
#: The workloads judged against Pool, whose repetitions Pool and the deathstar columns run
#: taking turns (``run_paired``): a slow minute of this noisy machine then falls on all of
#: them alike instead of on whichever system's repetitions it came in.
PAIRED = ["W1", "W2", "W3", "W4"]
#: The peer the paired workloads are judged against (the others run system by system:
#: deathstar registers the modules it ships with cloudpickle for the whole process, which
#: would change what loky sends; Pool pickles with the standard pickler).
PAIRED_PEER = "pool"




def derive_w5(res: Results, seeds: int) -> None:
    """Each system's W5 figure: the worst of its seeds' medians."""
    for name in list(res.samples):
        worst = worst_of_seeds(res, name, seeds)
        if worst is not None:
            res.add(name, "W5.worst", worst)


def share_w3_serial(res: Results, workers: int) -> None:
    """Judge every system's W3 walls against one serial time, the median of all the
    serial runs: the serial loop itself varies by several per cent from rep to rep on
    this machine, which would otherwise count for or against whichever system's reps it
    fell in."""
    serial = [v for system in res.samples.values() for v in system.get("W3.serial_s", [])]
    if not serial:
        return
    reference = statistics.median(serial)
    for system in res.samples.values():
        if "W3.wall_s" in system:
            system["W3.efficiency"] = [reference / (w * workers) for w in system["W3.wall_s"]]
    res.notes.append(f"W3: efficiency = {reference:.3f} s (the median of all "
                     f"{len(serial)} serial runs, one reference for every system) / "
                     "(wall × workers)")


def run_system(name: str, workers: int, sizes: Sizes, only: list[str], res: Results) -> None:
    cls = SYSTEMS[name]
    log(f"{name}: setup")
    system = cls(workers, sizes)
    setup_reps = sizes.reps if cls.setup_reps_cheap and "SETUP" in only else 1
    started = False
    try:
        for i in range(setup_reps):
            with time_limit(sizes.step_limit_s):
                started = True  # a start that fails half way is stopped too
                res.add(name, "setup_s", system.start_and_first_result())
                if i < setup_reps - 1:
                    system.stop()
                    started = False
    except Exception as exc:
        log(f"{name}: setup failed: {type(exc).__name__}: {exc}")
        res.error(name, "setup_s", f"{type(exc).__name__}: {exc}")
        for w in only:
            res.error(name, w, "setup failed")
        if started:
            _safe_stop(system)
        return
    try:
        for w in only:
            if w not in WORKLOADS:
                continue
            log(f"{name}: {w}")
            t0 = time.perf_counter()
            try:
                run_reps(sizes, WORKLOADS[w](system, sizes), lambda k, v: res.add(name, k, v))
            except BenchTimeout as exc:
                log(f"{name}: {w} timed out ({exc}); restarting {name}")
                res.error(name, w, "timeout")
                _safe_stop(system)
                system = cls(workers, sizes)
                with time_limit(sizes.step_limit_s):
                    system.start()
            except Exception as exc:
                log(f"{name}: {w} failed: {type(exc).__name__}: {exc}")
                traceback.print_exc(limit=3)
                res.error(name, w, f"{type(exc).__name__}: {str(exc)[:80]}")
            else:
                log(f"{name}: {w} done in {time.perf_counter() - t0:.1f} s")
    finally:
        _safe_stop(system)


def run_paired(names: list[str], workers: int, sizes: Sizes, only: list[str],
               res: Results) -> None:
    """The ``PAIRED`` workloads with every system in ``names`` open at once: each runs its
    warm-up, then repetition k of every system in turn, the turn's first system moving one
    place each repetition. A system that fails or times out is reported and leaves the
    rotation; the others go on."""
    systems: dict[str, System] = {}  # those that started
    started: list[System] = []  # and those that began to (each is stopped)
    try:
        for name in names:
            log(f"{name}: start (paired {', '.join(only)})")
            system = SYSTEMS[name](workers, sizes)
            started.append(system)
            try:
                with time_limit(sizes.step_limit_s):
                    system.start()
            except Exception as exc:
                log(f"{name}: start failed: {type(exc).__name__}: {exc}")
                for w in only:
                    res.error(name, w, "start failed")
                continue
            systems[name] = system
        for w in only:
            reps = {name: WORKLOADS[w](system, sizes) for name, system in systems.items()}
            t0 = time.perf_counter()
            for rep in range(sizes.reps + 1):
                if not reps:
                    break
                names_now, k = list(reps), rep % len(reps)
                turn = names_now[k:] + names_now[:k]
                log(f"paired {w} rep {rep}: {', '.join(turn)}")
                for name in turn:
                    try:
                        run_rep(sizes, reps[name], rep,
                                functools.partial(res.add, name))
                    except Exception as exc:  # BenchTimeout too: it leaves the rotation
                        log(f"{name}: {w} failed: {type(exc).__name__}: {exc}")
                        res.error(name, w, f"{type(exc).__name__}: {str(exc)[:80]}")
                        del reps[name]
            log(f"paired {w} done in {time.perf_counter() - t0:.1f} s")
    finally:
        for system in started:
            _safe_stop(system)


def _safe_stop(system: System) -> None:
    try:
        with time_limit(60):
            system.stop()
    except BaseException as exc:  # noqa: BLE001 - a stuck stop must not stop the run
        log(f"{system.name}: stop failed: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------- main


def _load() -> list[float]:
    """os.getloadavg(): the 1, 5 and 15 minute load averages ([] where unknown)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, with ``only`` (workloads), ``wanted`` (peers) and ``columns``
    (deathstar's systems) as checked lists."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="every workload, small, one rep after the warm-up (a smoke run)")
    ap.add_argument("--only", default=",".join(ALL_WORKLOADS),
                    help="comma-separated workloads, e.g. W1,W3,idle (default: all of "
                         f"{','.join(ALL_WORKLOADS)})")
    ap.add_argument("--workers", type=int, default=2, help="workers per system (default 2)")
    ap.add_argument("--deathstar", default=",".join(DEATHSTAR_COLUMNS),
                    help="deathstar columns: embedded, tcp (default: both)")
    ap.add_argument("--peers", default=",".join(ALL_PEERS),
                    help="comma-separated peers (default: all importable)")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    args.only = [w.strip().upper() for w in args.only.split(",") if w.strip()]
    bad = [w for w in args.only if w not in ALL_WORKLOADS]
    if bad:
        ap.error(f"unknown workload(s) {bad}; choose from {ALL_WORKLOADS}")
    args.wanted = [p.strip().lower() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in args.wanted if p not in ALL_PEERS]
    if unknown:
        ap.error(f"unknown peer(s) {unknown}; choose from {ALL_PEERS}")
    wanted = [c.strip().lower() for c in args.deathstar.split(",") if c.strip()]
    if not wanted or any(c not in DEATHSTAR_COLUMNS for c in wanted):
        ap.error(f"--deathstar {args.deathstar}: choose from {list(DEATHSTAR_COLUMNS)}")
    args.columns = [DEATHSTAR_COLUMNS[c] for c in wanted]
    return args


def closing_notes(res: Results, only: list[str], sizes: Sizes) -> None:
    """The notes on how the peers were measured, for the workloads that ran."""
    paired = [w for w in PAIRED if w in only]
    if paired:
        res.notes.append(f"{', '.join(paired)}: Pool and the deathstar columns open at once, "
                         "taking turns repetition by repetition (each turn starting one "
                         "system later); the other peers ran system by system before them")
    if "W6" in only and res.get("deathstar", "W6.sent_MB") is None:
        res.notes.append("W6 bytes: no byte counter found on the deathstar client")
    if "W1" in only:
        res.notes.append("W1 batched: ProcessPoolExecutor and loky get Pool's default chunksize "
                         "(their own default is 1); Dask and Ray run one task per future/call")
    if "W2" in only:
        res.notes.append("W2: deathstar = Executor(cluster).submit(inc, x).result(); Pool = "
                         "apply_async(inc, (x,)).get(); PPE/loky = submit().result()")
    if "W3" in only:
        res.notes.append("W3: bench_stateful.estimate_pi (a threading.local scratch buffer and "
                         "a threading.Lock at module level), imported by name everywhere")
    if "W5" in only:
        res.notes.append(f"W5: {sizes.w5_n} lognormal sleeps (mean {sizes.w5_mean_s * 1e3:g} "
                         f"ms, sigma 1) drawn with {sizes.w5_seeds} seeds; each seed's figure "
                         "the median of its reps; the row shows the worst seed")
    if "W6" in only:
        res.notes.append("W6: Dask scatters (broadcast) and Ray ray.put()s the common array "
                         "once; Pool/PPE/loky pickle it into every chunk (functools.partial). "
                         "deathstar's bytes are the blob bytes its daemon reports on the status port; "
                         "peers' bytes are not measured")
    if "W7" in only:
        res.notes.append(f"W7: {sizes.w7_n:,} inputs; deathstar = `deathstar map` CLI end to "
                         "end (embedded cluster start included); Pool = a script reading the "
                         "JSONL lazily through Pool.imap(chunksize=1000); RSS = the client "
                         "process alone")
    if "IDLE" in only:
        res.notes.append(f"idle: CPU s of this process and all its children over "
                         f"{sizes.idle_s:g} s, {IDLE_SETTLE_S:g} s after a 100-input map, "
                         "the cluster (or pool) open; includes this process's own threads")


def run_all(args: argparse.Namespace, sizes: Sizes, peers: list[str], res: Results) -> None:
    """Every selected workload: floors, each system in turn, then the CLI (W7) and
    GridSearchCV, in child processes."""
    only = args.only
    if "W1" in only or "W2" in only or "W4" in only:
        run_floors(sizes, only, args.workers, res)
    if SYSTEM_WORKLOADS.intersection(only):
        # the peers first: deathstar registers the modules it ships (bench_tasks,
        # bench_stateful) with cloudpickle to travel by value, for the whole process,
        # which would change what loky sends after it
        paired = [w for w in PAIRED if w in only]
        rest = [w for w in only if w not in paired]
        together = [*(p for p in peers if p == PAIRED_PEER), *args.columns]
        for name in peers:
            if name != PAIRED_PEER:
                run_system(name, args.workers, sizes, only, res)
        if paired:
            run_paired(together, args.workers, sizes, paired, res)
        if SYSTEM_WORKLOADS.intersection(rest):
            for name in together:
                run_system(name, args.workers, sizes, rest, res)
    if "W7" in only:
        run_w7(args.workers, sizes, peers, res)
        run_w7_workers(sizes, res)
    if "GRID" in only:
        run_grid(sizes, res)
    if "W3" in only:
        share_w3_serial(res, args.workers)
    if "W5" in only:
        derive_w5(res, sizes.w5_seeds)
    closing_notes(res, only, sizes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    only = args.only
    peers = [p for p in args.wanted if importable(p)]
    res = Results()
    for p in args.wanted:
        if p not in peers:
            res.notes.append(f"{p} is not importable: left out")
    hard_deadline(sizes.run_limit_s)
    warnings.filterwarnings("ignore")
    logging.getLogger("distributed").setLevel(logging.ERROR)

    load_at_start = _load()
    if load_at_start and load_at_start[0] > 0.5:
        res.notes.append(f"the machine was busy when the run started (load "
                         f"{load_at_start[0]:.2f}): figures are noisier, compute-bound "
                         "ones lower")
    started = time.perf_counter()
    log(f"bench: workloads {only}, deathstar {args.columns}, peers {peers}, "
        f"{args.workers} workers, {'quick' if args.quick else 'full'}, load {load_at_start}")
    run_all(args, sizes, peers, res)

    import deathstar
    columns = [c for c in ["pool", "ppe", "loky", "dask", "ray", "floor", "chain"]
               if c == "floor" and ("W2" in only or "W4" in only)
               or c == "chain" and ("W1" in only or "W2" in only) or c in peers]
    meta = {"workers": args.workers, "reps": sizes.reps, "quick": args.quick,
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "deathstar": deathstar.__version__,
            "only": only, "deathstar_columns": args.columns, "peers": peers,
            "sizes": sizes.__dict__, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "elapsed_s": round(time.perf_counter() - started, 1),
            "load_at_start": load_at_start, "load_at_end": _load()}
    tables = render(res, rows_for(only, sizes.w5_seeds), columns, args.columns, meta)
    log(f"bench: done in {time.perf_counter() - started:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, **tables, "samples": res.samples,
                                         "errors": res.errors, "notes": res.notes},
                                        indent=2, default=str))
        log(f"bench: wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
