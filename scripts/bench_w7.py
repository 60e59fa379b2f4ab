"""W7 of scripts/bench.py: ``deathstar map`` end to end through the CLI beside a
Pool.imap script (throughput and the client's peak RSS), and the daemon's CPU per task
with 2 and 300 connected workers."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench_tasks as T
from bench_common import MB, BenchTimeout, Sizes, log, run_reps, w1_data
from bench_report import Results

SCRIPTS = Path(__file__).resolve().parent

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
                    Cluster([f"127.0.0.1:{port}"], keys="none") as cluster:
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
