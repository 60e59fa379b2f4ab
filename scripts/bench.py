"""deathstar beside multiprocessing, concurrent.futures, Dask, Ray and loky (issue 5).

    .venv/bin/python scripts/bench.py [--quick] [--only W1,W3] [--workers N]
                                      [--peers pool,ppe,loky,dask,ray] [--json out/bench.json]

deathstar runs as a real daemon process with N workers (the embedded local cluster,
``Cluster(None, workers=N)``) and the client in this process. Every peer gets the same
worker count and the same functions (scripts/bench_tasks.py); every repetition gets fresh
data; each figure is the median of the repetitions after one warm-up; setup time (start
to first result) is reported apart. Dask, Ray and loky are used when importable.

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
import math
import multiprocessing as mp
import os
import pickle
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(1, str(ROOT))  # tests.swarm: the lightweight workers of W7
# every child (daemon, workers, Dask/Ray workers, CLI) imports bench_tasks by name
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(SCRIPTS), str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home: loopback only
os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")

import numpy as np  # noqa: E402

import bench_tasks as T  # noqa: E402
from bench_report import ALL_PEERS, Results, render, rows_for  # noqa: E402
from bench_systems import SYSTEMS, DeathstarSystem, System, importable  # noqa: E402

MB = 1e6
ALL_WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W6", "W7"]
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
    w6_n: int
    w6_elems: int
    w7_n: int
    floor_rtt_n: int
    step_limit_s: float
    run_limit_s: float


FULL = Sizes(reps=3, w1_n=20_000, w2_n=300, w3_n=400, w3_draws=200_000, w4_n=32,
             w4_elems=2_000_000, w5_n=120, w5_mean_s=0.020, w6_n=200, w6_elems=6_250_000,
             w7_n=1_000_000, floor_rtt_n=2000, step_limit_s=180.0, run_limit_s=3600.0)
QUICK = Sizes(reps=1, w1_n=2_000, w2_n=50, w3_n=40, w3_draws=200_000, w4_n=8,
              w4_elems=2_000_000, w5_n=30, w5_mean_s=0.020, w6_n=20, w6_elems=6_250_000,
              w7_n=50_000, floor_rtt_n=300, step_limit_s=60.0, run_limit_s=900.0)


# ---------------------------------------------------------------------- fresh data


def w1_data(n: int, rep: int) -> list[int]:
    return np.random.default_rng(1000 + rep).integers(0, 1 << 30, n).tolist()


def w3_seeds(n: int, rep: int) -> list[int]:
    return list(range(rep * 1_000_000, rep * 1_000_000 + n))


def w4_arrays(n: int, elems: int, rep: int) -> list[np.ndarray]:
    rng = np.random.default_rng(4000 + rep)
    return [rng.random(elems) for _ in range(n)]


def w5_durations(n: int, mean_s: float, rep: int) -> list[float]:
    sigma = 1.0  # heavy tail; lognormal mean = exp(mu + sigma^2 / 2)
    mu = math.log(mean_s) - sigma ** 2 / 2
    return np.random.default_rng(5000 + rep).lognormal(mu, sigma, n).tolist()


def w6_data(elems: int, rep: int) -> np.ndarray:
    return np.random.default_rng(6000 + rep).random(elems)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- workloads


def run_reps(sizes: Sizes, one_rep: Callable[[int], dict[str, float]],
             record: Callable[[str, float], None]) -> None:
    """One warm-up (rep 0, discarded), then ``sizes.reps`` measured reps (1, 2, ...)."""
    with time_limit(sizes.step_limit_s):
        one_rep(0)
    for rep in range(1, sizes.reps + 1):
        with time_limit(sizes.step_limit_s):
            for key, value in one_rep(rep).items():
                record(key, value)


def w1(system: System, sizes: Sizes, record) -> None:
    for label, chunksize in system.w1_variants.items():
        def one(rep: int) -> dict[str, float]:
            data = w1_data(sizes.w1_n, rep)
            t0 = time.perf_counter()
            out = system.map(T.inc, data, chunksize)
            wall = time.perf_counter() - t0
            assert out[-1] == data[-1] + 1 and len(out) == len(data)
            return {f"W1.{label}.tasks_s": len(data) / wall}
        run_reps(sizes, one, record)


def w2(system: System, sizes: Sizes, record) -> None:
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
    run_reps(sizes, one, record)


def w3(system: System, sizes: Sizes, record) -> None:
    """Efficiency = serial time / (wall x workers). The serial time is measured in this
    process on the same seeds right before each parallel rep (workers idle); see
    ``share_w3_serial`` for the reference the table uses."""
    fn = functools.partial(T.estimate_pi, draws=sizes.w3_draws)
    def one(rep: int) -> dict[str, float]:
        seeds = w3_seeds(sizes.w3_n, rep)
        t0 = time.perf_counter()
        for s in seeds:
            T.estimate_pi(s, sizes.w3_draws)
        serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        if isinstance(system, DeathstarSystem):  # its way: common keyword arguments
            out = system.map_common(T.estimate_pi, seeds, {"draws": sizes.w3_draws})
        else:
            out = system.map(fn, seeds)
        wall = time.perf_counter() - t0
        assert len(out) == len(seeds) and 3.0 < out[0] < 3.3
        return {"W3.wall_s": wall, "W3.serial_s": serial,
                "W3.efficiency": serial / (wall * system.workers)}
    run_reps(sizes, one, record)


def w4(system: System, sizes: Sizes, record) -> None:
    def one(rep: int) -> dict[str, float]:
        arrays = w4_arrays(sizes.w4_n, sizes.w4_elems, rep)
        t0 = time.perf_counter()
        out = system.map(T.array_sum, arrays)
        wall = time.perf_counter() - t0
        assert abs(out[0] - arrays[0].sum()) < 1e-3
        return {"W4.MB_s": sum(a.nbytes for a in arrays) / MB / wall}
    run_reps(sizes, one, record)


def w5(system: System, sizes: Sizes, record) -> None:
    def one(rep: int) -> dict[str, float]:
        durations = w5_durations(sizes.w5_n, sizes.w5_mean_s, rep)
        ideal = max(sum(durations) / system.workers, max(durations))
        t0 = time.perf_counter()
        out = system.map(T.sleep_for, durations)
        wall = time.perf_counter() - t0
        assert len(out) == len(durations)
        return {"W5.makespan_ideal": wall / ideal}
    run_reps(sizes, one, record)


def w6(system: System, sizes: Sizes, record) -> None:
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
    run_reps(sizes, one, record)


WORKLOADS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5, "W6": w6}


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
    setup_reps = sizes.reps if cls.setup_reps_cheap else 1
    started = False
    try:
        for i in range(setup_reps):
            with time_limit(sizes.step_limit_s):
                res.add(name, "setup_s", system.start_and_first_result())
                started = True
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
                WORKLOADS[w](system, sizes, lambda k, v: res.add(name, k, v))
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


def _safe_stop(system: System) -> None:
    try:
        with time_limit(60):
            system.stop()
    except BaseException as exc:  # noqa: BLE001 - a stuck stop must not stop the run
        log(f"{system.name}: stop failed: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------- floors


def _server(target: Callable) -> tuple[Any, int]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=target, args=(q, 600.0), daemon=True)
    proc.start()
    return proc, q.get(timeout=60)


def _stop_server(proc: Any, sock: Any) -> None:
    try:
        sock.send_multipart([b"STOP"])
        sock.poll(5000)
    finally:
        sock.close(0)
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def run_chain_floor(ctx: Any, sizes: Sizes, workers: int, res: Results) -> None:
    """The brokered floor: client -> a bare pyzmq broker -> ``workers`` bare workers and
    back (bench_tasks.chain_broker), the shape deathstar has with nothing else in it.
    One task per message: W1 one/msg through the same in-flight window deathstar keeps
    (2 x workers + 6), and W2 round trips."""
    import zmq
    log("floor: brokered pyzmq chain")
    ctx_mp = mp.get_context("spawn")
    q = ctx_mp.Queue()
    folder = tempfile.mkdtemp(prefix="bench-chain-")
    proc = ctx_mp.Process(target=T.chain_broker, args=(q, folder, workers, 600.0), daemon=True)
    proc.start()
    helpers = [ctx_mp.Process(target=T.chain_worker, args=(f"ipc://{folder}/back",),
                              daemon=True) for _ in range(workers)]
    for helper in helpers:
        helper.start()
    endpoint = q.get(timeout=60)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    window = 2 * workers + 6

    def recv() -> int:
        if not sock.poll(10_000):
            raise BenchTimeout("brokered chain silent")
        return pickle.loads(sock.recv_multipart()[-1])

    try:
        def w1(rep: int) -> dict[str, float]:
            data = w1_data(sizes.w1_n, rep)
            t0 = time.perf_counter()
            sent = got = 0
            while got < len(data):
                while sent < len(data) and sent - got < window:
                    sock.send_multipart([b"task", pickle.dumps(data[sent])])
                    sent += 1
                recv()
                got += 1
            return {"W1.one.tasks_s": len(data) / (time.perf_counter() - t0)}

        def w2(rep: int) -> dict[str, float]:
            lat = []
            for i in range(sizes.w2_n):
                t0 = time.perf_counter()
                sock.send_multipart([b"task", pickle.dumps(i)])
                assert recv() == i + 1
                lat.append(time.perf_counter() - t0)
            lat_us = np.array(lat) * 1e6
            return {"W2.median_us": float(np.median(lat_us)),
                    "W2.p99_us": float(np.percentile(lat_us, 99))}
        run_reps(sizes, w1, lambda k, v: res.add("chain", k, v))
        run_reps(sizes, w2, lambda k, v: res.add("chain", k, v))
    finally:
        _stop_server(proc, sock)
        for helper in helpers:
            helper.kill()
            helper.join()
        shutil.rmtree(folder, ignore_errors=True)


def run_floors(sizes: Sizes, only: list[str], workers: int, res: Results) -> None:
    """Raw pyzmq across processes on loopback: a DEALER/ROUTER round trip (for W2) and a
    16 MB array sent zero-copy to a process that maps it without copying (for W4)."""
    import zmq
    ctx = zmq.Context()
    try:
        if "W2" in only:
            log("floor: raw pyzmq round trip")
            proc, port = _server(T.echo_server)
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{port}")
            try:
                def one(rep: int) -> dict[str, float]:
                    lat = []
                    for i in range(sizes.floor_rtt_n):
                        payload = str(i).encode()
                        t0 = time.perf_counter()
                        sock.send(payload)
                        if not sock.poll(10_000):
                            raise BenchTimeout("echo server silent")
                        assert sock.recv() == payload
                        lat.append(time.perf_counter() - t0)
                    lat_us = np.array(lat) * 1e6
                    return {"W2.median_us": float(np.median(lat_us)),
                            "W2.p99_us": float(np.percentile(lat_us, 99))}
                run_reps(sizes, one, lambda k, v: res.add("floor", k, v))
            finally:
                _stop_server(proc, sock)
        if "W4" in only:
            log("floor: raw 16 MB zero-copy transfer")
            proc, port = _server(T.sink_server)
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{port}")
            try:
                def one(rep: int) -> dict[str, float]:
                    arrays = w4_arrays(sizes.w4_n, sizes.w4_elems, rep)
                    t0 = time.perf_counter()
                    for a in arrays:
                        sock.send(a, copy=False)
                    for a in arrays:
                        if not sock.poll(30_000):
                            raise BenchTimeout("sink server silent")
                        assert int(sock.recv()) == a.size
                    wall = time.perf_counter() - t0
                    return {"W4.MB_s": sum(a.nbytes for a in arrays) / MB / wall}
                run_reps(sizes, one, lambda k, v: res.add("floor", k, v))
            finally:
                _stop_server(proc, sock)
        if "W1" in only or "W2" in only:
            run_chain_floor(ctx, sizes, workers, res)
    except Exception as exc:
        log(f"floor failed: {type(exc).__name__}: {exc}")
        res.error("floor", "W2" if "W2" in only else "W4", f"{type(exc).__name__}: {exc}")
    finally:
        ctx.term()


# ---------------------------------------------------------------------- W7: the CLI


POOL_SCRIPT = r"""
import json, sys, multiprocessing as mp
from bench_tasks import inc
def inputs(path):
    with open(path) as fh:
        for line in fh:
            yield json.loads(line)
if __name__ == "__main__":
    src, dst, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with mp.Pool(workers) as pool, open(dst, "w") as out:
        for r in pool.imap(inc, inputs(src), chunksize=1000):
            out.write(json.dumps(r) + "\n")
"""


def measure_child(cmd: list[str], cwd: Path, limit_s: float) -> tuple[float, float, int]:
    """Run ``cmd``; return (wall s, peak RSS MB of that process alone, exit code). RSS is
    polled every 10 ms with psutil (the process's own, not its children's)."""
    import psutil
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak = 0
    deadline = time.monotonic() + limit_s
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            pass
        if time.monotonic() > deadline:
            for child in ps.children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
            raise BenchTimeout(f"{cmd[0]} over {limit_s:g} s")
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {stderr.strip()[-300:]}")
    return wall, peak / MB, proc.returncode


def run_w7_workers(sizes: Sizes, res: Results) -> None:
    """W7, the daemon side: its CPU per task (one task per message) with 2 and with 300
    connected workers (lightweight ones, tests/swarm.py), to show it does not grow."""
    import psutil

    from deathstar.client import Cluster
    from tests.swarm import Swarm

    log("deathstar: W7 daemon CPU per task with 2 and 300 workers")
    cmd = [str(Path(sys.executable).parent / "deathstar"), "daemon", "--host", "127.0.0.1",
           "--port", "0", "--workers", "0", "--ready-json", "--keys", "none", "--insecure",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        port = int(json.loads(proc.stdout.readline())["exec"])
        daemon = psutil.Process(proc.pid)
        n = max(2000, sizes.w1_n // 2)
        for count in (2, 300):
            with Swarm(f"tcp://127.0.0.1:{port + 2}", count, T.inc) as swarm, \
                    Cluster([f"127.0.0.1:{port}"]) as cluster:
                deadline = time.monotonic() + 60
                while cluster.status()[0].get("workers") != count:
                    if time.monotonic() > deadline:
                        raise BenchTimeout(f"{count} swarm workers did not register")
                    time.sleep(0.05)
                cluster.map(T.inc, range(200), chunksize=1)  # warm-up

                def one(rep: int) -> dict[str, float]:
                    before = sum(daemon.cpu_times()[:2])
                    out = cluster.map(T.inc, w1_data(n, rep), chunksize=1)
                    assert len(out) == n
                    return {f"W7.daemon_us_{count}": (sum(daemon.cpu_times()[:2]) - before)
                            / n * 1e6}
                run_reps(sizes, one, lambda k, v: res.add("deathstar", k, v))
                assert sum(1 for t in swarm.tasks if t) > count // 2
    except Exception as exc:
        log(f"deathstar: W7 workers failed: {type(exc).__name__}: {exc}")
        res.error("deathstar", "W7.daemon_us_300", f"{type(exc).__name__}: {exc}")
    finally:
        proc.terminate()
        proc.wait(10)


def run_w7(workers: int, sizes: Sizes, peers: list[str], res: Results) -> None:
    cli = Path(sys.executable).parent / "deathstar"
    variants = {"deathstar": lambda src, dst: [
        str(cli), "map", "bench_tasks:inc", "--args", str(src), "--out", str(dst),
        "--workers", str(workers), "--quiet"]}
    if "pool" in peers:
        variants["pool"] = lambda src, dst: [sys.executable, "-c", POOL_SCRIPT, str(src),
                                             str(dst), str(workers)]
    with tempfile.TemporaryDirectory(prefix="deathstar-bench-") as tmp:
        tmpdir = Path(tmp)
        for name, make_cmd in variants.items():
            log(f"{name}: W7 ({sizes.w7_n:,} inputs through "
                f"{'the CLI' if name == 'deathstar' else 'a Pool.imap script'})")
            try:
                for rep in range(0, sizes.reps + 1):
                    n = sizes.w7_n if rep else min(sizes.w7_n, 20_000)  # small warm-up
                    src = tmpdir / f"in{rep}.jsonl"
                    dst = tmpdir / f"out{rep}.jsonl"
                    rng = np.random.default_rng(7000 + rep)
                    with open(src, "w") as fh:
                        fh.write("\n".join(map(str, rng.integers(0, 1 << 30, n).tolist())))
                        fh.write("\n")
                    wall, rss, _ = measure_child(make_cmd(src, dst), SCRIPTS,
                                                 sizes.step_limit_s)
                    with open(dst, "rb") as fh:
                        lines = sum(1 for _ in fh)
                    if lines != n:
                        raise RuntimeError(f"{lines} output lines for {n} inputs")
                    if rep:
                        res.add(name, "W7.tasks_s", n / wall)
                        res.add(name, "W7.peak_rss_MB", rss)
                    src.unlink()
                    dst.unlink()
                log(f"{name}: W7 done")
            except Exception as exc:
                log(f"{name}: W7 failed: {type(exc).__name__}: {exc}")
                res.error(name, "W7", f"{type(exc).__name__}: {str(exc)[:120]}")


# ---------------------------------------------------------------------- main


def _load1() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, one rep (smoke run)")
    ap.add_argument("--only", default=",".join(ALL_WORKLOADS),
                    help="comma-separated workloads, e.g. W1,W3 (default: all)")
    ap.add_argument("--workers", type=int, default=2, help="workers per system (default 2)")
    ap.add_argument("--peers", default=",".join(ALL_PEERS),
                    help="comma-separated peers (default: all importable)")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    sizes = QUICK if args.quick else FULL
    only = [w.strip().upper() for w in args.only.split(",") if w.strip()]
    bad = [w for w in only if w not in ALL_WORKLOADS]
    if bad:
        ap.error(f"unknown workload(s) {bad}; choose from {ALL_WORKLOADS}")
    wanted = [p.strip().lower() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in ALL_PEERS]
    if unknown:
        ap.error(f"unknown peer(s) {unknown}; choose from {ALL_PEERS}")
    peers = [p for p in wanted if importable(p)]
    res = Results()
    for p in wanted:
        if p not in peers:
            res.notes.append(f"{p} is not importable: left out")
    hard_deadline(sizes.run_limit_s)
    warnings.filterwarnings("ignore")
    logging.getLogger("distributed").setLevel(logging.ERROR)

    load_at_start = _load1()
    if load_at_start > 0.5:
        res.notes.append(f"the machine was busy when the run started (load {load_at_start:.2f}): "
                         "figures are noisier, compute-bound ones lower")
    started = time.perf_counter()
    log(f"bench: workloads {only}, peers {peers}, {args.workers} workers, "
        f"{'quick' if args.quick else 'full'}")
    if "W1" in only or "W2" in only or "W4" in only:
        run_floors(sizes, only, args.workers, res)
    for name in ["deathstar", *peers]:
        run_system(name, args.workers, sizes, only, res)
    if "W7" in only:
        run_w7(args.workers, sizes, peers, res)
        run_w7_workers(sizes, res)
    if "W3" in only:
        share_w3_serial(res, args.workers)
    if "W6" in only and res.get("deathstar", "W6.sent_MB") is None:
        res.notes.append("W6 bytes: no byte counter found on the deathstar client")
    if "W1" in only:
        res.notes.append("W1 batched: ProcessPoolExecutor and loky get Pool's default chunksize "
                         "(their own default is 1); Dask and Ray run one task per future/call")
    if "W6" in only:
        res.notes.append("W6: Dask scatters (broadcast) and Ray ray.put()s the common array "
                         "once; Pool/PPE/loky pickle it into every chunk (functools.partial). "
                         "deathstar's bytes are the blob bytes its daemon reports on the status port; "
                         "peers' bytes are not measured")
    if "W7" in only:
        res.notes.append("W7: deathstar = `deathstar map` CLI end to end (embedded cluster "
                         "start included); Pool = a script reading the JSONL lazily through "
                         "Pool.imap(chunksize=1000); RSS = the client process alone")

    import deathstar
    columns = [c for c in ["pool", "ppe", "loky", "dask", "ray", "floor", "chain"]
               if c == "floor" and ("W2" in only or "W4" in only)
               or c == "chain" and ("W1" in only or "W2" in only) or c in peers]
    meta = {"workers": args.workers, "reps": sizes.reps, "quick": args.quick,
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "deathstar": deathstar.__version__,
            "only": only, "peers": peers, "sizes": sizes.__dict__,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "elapsed_s": round(time.perf_counter() - started, 1),
            "load1_at_start": load_at_start, "load1_at_end": _load1()}
    table_rows = render(res, rows_for(only), columns, args.workers, meta)
    log(f"bench: done in {time.perf_counter() - started:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": table_rows,
                                         "samples": res.samples, "errors": res.errors,
                                         "notes": res.notes}, indent=2, default=str))
        log(f"bench: wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
