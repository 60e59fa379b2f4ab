"""The systems scripts/bench.py compares: deathstar twice (the embedded local cluster, and
a TCP daemon on loopback; the client in the benchmark process either way) and its peers,
each behind one small interface."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import logging
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import bench_tasks as T
from bench_common import Sizes


def pool_default_chunksize(n: int, workers: int) -> int:
    """What multiprocessing.Pool.map picks when chunksize is not given."""
    size, extra = divmod(n, workers * 4)
    return max(1, size + (1 if extra else 0))


class System:
    """One way of running functions on N worker processes."""

    name = ""
    setup_reps_cheap = True
    #: W1 variants: row label -> chunksize (None: the system's default)
    w1_variants: dict[str, Any] = {}

    def __init__(self, workers: int, sizes: Sizes):
        self.workers = workers
        self.sizes = sizes

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def map(self, fn: Callable, items: list, chunksize: Any = None) -> list: ...
    def map_common(self, fn: Callable, items: list, common: dict) -> list: ...
    def call(self, fn: Callable, arg: Any) -> Any: ...
    def bytes_sent(self) -> int | None:
        return None

    def quiesce(self) -> None:
        """Let go of what is not the cluster itself (before the idle measure)."""

    def start_and_first_result(self) -> float:
        t0 = time.perf_counter()
        self.start()
        result = self.call(T.inc, 1)
        elapsed = time.perf_counter() - t0
        assert result == 2, result
        return elapsed


class DeathstarSystem(System):
    """The embedded local cluster, ``Cluster(None, workers=N)``: a daemon and its workers
    on this machine, the client in this process. Single calls (W2, setup) go through
    ``Executor.submit(f, x).result()`` on that cluster."""

    name = "deathstar"
    w1_variants = {"batched": None, "one": 1}

    executor: Any = None  # made by the first single call

    def start(self) -> None:
        self.cluster = self.connect()

    def connect(self) -> Any:
        import deathstar
        return deathstar.Cluster(None, workers=self.workers)

    def bytes_sent(self) -> int | None:
        """Function-and-common-argument bytes the node received, as its daemon counts
        them (status port): what 'sent once per node' is about."""
        rows = self.cluster.status(timeout=5.0)
        return sum(int(r.get("blob_bytes_received", 0)) for r in rows)

    def quiesce(self) -> None:
        """Shut the Executor down (its thread is the executor's cost, not the idle
        cluster's); the next single call makes a new one."""
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None

    def stop(self) -> None:
        try:
            if self.executor is not None:
                self.executor.shutdown(wait=False, cancel_futures=True)
                self.executor = None
        finally:
            self.cluster.close()

    def map(self, fn, items, chunksize=None):
        return self.cluster.map(fn, items, chunksize=chunksize)

    def map_common(self, fn, items, common):
        return self.cluster.map(fn, items, **common)

    def call(self, fn, arg):
        if self.executor is None:
            import deathstar
            self.executor = deathstar.Executor(self.cluster)
        return self.executor.submit(fn, arg).result(self.sizes.step_limit_s)


class DeathstarTcpSystem(DeathstarSystem):
    """A TCP node on loopback: a real ``deathstar daemon --host 127.0.0.1 --port 0
    --workers N --keys none --insecure --ready-json`` child process, and the client in
    this process connected to it with ``keys="none"``. Setup counts the daemon's start."""

    name = "deathstar-tcp"

    def connect(self) -> Any:
        import deathstar
        cli = Path(sys.executable).parent / "deathstar"
        cmd = [str(cli), "daemon", "--host", "127.0.0.1", "--port", "0", "--workers",
               str(self.workers), "--keys", "none", "--insecure", "--ready-json",
               "--log-level", "warning"]
        self.daemon = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            assert self.daemon.stdout is not None
            line = self.daemon.stdout.readline()  # the bench's time_limit bounds the wait
            if not line:
                raise RuntimeError(f"the daemon exited ({self.daemon.wait(10)}) before "
                                   "it was ready")
            port = int(json.loads(line)["exec"])
            return deathstar.Cluster([f"127.0.0.1:{port}"], keys="none")
        except BaseException:
            self._stop_daemon()
            raise

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self._stop_daemon()

    def _stop_daemon(self) -> None:
        self.daemon.terminate()
        try:
            self.daemon.wait(20)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()
        if self.daemon.stdout is not None:
            self.daemon.stdout.close()


class PoolSystem(System):
    name = "pool"
    w1_variants = {"batched": None, "one": 1}

    def start(self) -> None:
        self.pool = mp.Pool(self.workers)

    def stop(self) -> None:
        self.pool.terminate()
        self.pool.join()

    def map(self, fn, items, chunksize=None):
        return self.pool.map_async(fn, items, chunksize).get(self.sizes.step_limit_s)

    def map_common(self, fn, items, common):
        return self.map(functools.partial(fn, **common), items)

    def call(self, fn, arg):
        return self.pool.apply_async(fn, (arg,)).get(self.sizes.step_limit_s)


class ExecutorSystem(System):
    """concurrent.futures.ProcessPoolExecutor; its map has no automatic chunksize (it
    defaults to 1), so its batched row uses Pool's default chunksize."""

    name = "ppe"
    w1_variants = {"batched": "pool", "one": 1}

    def make(self) -> cf.Executor:
        return cf.ProcessPoolExecutor(max_workers=self.workers)

    def start(self) -> None:
        self.ex = self.make()

    def stop(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)

    def map(self, fn, items, chunksize=None):
        if chunksize in (None, "pool"):
            chunksize = pool_default_chunksize(len(items), self.workers)
        return list(self.ex.map(fn, items, chunksize=chunksize,
                                timeout=self.sizes.step_limit_s))

    def map_common(self, fn, items, common):
        return self.map(functools.partial(fn, **common), items)

    def call(self, fn, arg):
        return self.ex.submit(fn, arg).result(self.sizes.step_limit_s)


class LokySystem(ExecutorSystem):
    """loky's ProcessPoolExecutor: the loky package, else the copy joblib ships."""

    name = "loky"

    def make(self) -> cf.Executor:
        try:
            import loky
        except ImportError:
            from joblib.externals import loky
        return loky.ProcessPoolExecutor(max_workers=self.workers)

    def stop(self) -> None:
        self.ex.shutdown(wait=True, kill_workers=True)


class DaskSystem(System):
    """distributed.LocalCluster: N single-threaded worker processes, on loopback. Common
    data is scattered (broadcast) once, the idiomatic way; tasks are one per future."""

    name = "dask"
    setup_reps_cheap = False
    w1_variants = {"batched": None}

    def start(self) -> None:
        from distributed import Client, LocalCluster
        self.lc = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address=None,
                               silence_logs=logging.ERROR)
        self.client = Client(self.lc)

    def stop(self) -> None:
        self.client.close()
        self.lc.close()

    def _gather(self, futures):
        from distributed import wait
        wait(futures, timeout=self.sizes.step_limit_s)
        return self.client.gather(futures)

    def map(self, fn, items, chunksize=None):
        return self._gather(self.client.map(fn, items, pure=False))

    def map_common(self, fn, items, common):
        scattered = {k: self.client.scatter(v, broadcast=True) for k, v in common.items()}
        return self._gather(self.client.map(fn, items, pure=False, **scattered))

    def call(self, fn, arg):
        return self.client.submit(fn, arg, pure=False).result(self.sizes.step_limit_s)


class RaySystem(System):
    """ray.init on loopback with num_cpus=N; large arguments go through its object store
    (ray.put for the common argument)."""

    name = "ray"
    setup_reps_cheap = False
    w1_variants = {"batched": None}

    def start(self) -> None:
        import ray
        self.ray = ray
        ray.init(num_cpus=self.workers, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False,
                 logging_level=logging.ERROR, configure_logging=True)
        self.remotes: dict[Callable, Any] = {}

    def stop(self) -> None:
        self.ray.shutdown()

    def remote(self, fn):
        if fn not in self.remotes:
            self.remotes[fn] = self.ray.remote(fn)
        return self.remotes[fn]

    def map(self, fn, items, chunksize=None):
        args, kwargs = (), {}
        if isinstance(fn, functools.partial):  # ray.remote takes functions only
            fn, args, kwargs = fn.func, fn.args, fn.keywords
        rf = self.remote(fn)
        return self.ray.get([rf.remote(*args, x, **kwargs) for x in items],
                            timeout=self.sizes.step_limit_s)

    def map_common(self, fn, items, common):
        rf = self.remote(fn)
        refs = {k: self.ray.put(v) for k, v in common.items()}
        return self.ray.get([rf.remote(x, **refs) for x in items],
                            timeout=self.sizes.step_limit_s)

    def call(self, fn, arg):
        return self.ray.get(self.remote(fn).remote(arg), timeout=self.sizes.step_limit_s)


SYSTEMS: dict[str, type[System]] = {"deathstar": DeathstarSystem,
                                    "deathstar-tcp": DeathstarTcpSystem, "pool": PoolSystem,
                                    "ppe": ExecutorSystem, "loky": LokySystem,
                                    "dask": DaskSystem, "ray": RaySystem}


def importable(name: str) -> bool:
    modules = {"dask": ["distributed"], "ray": ["ray"],
               "loky": ["loky", "joblib"]}.get(name)  # joblib ships loky inside
    if modules is None:
        return True
    # find_spec, not import: importing Dask/Ray here would grow sys.modules before
    # deathstar runs, and deathstar's per-map cost grows with sys.modules
    import importlib.util
    for module in modules:
        try:
            if importlib.util.find_spec(module) is not None:
                return True
        except (ImportError, ValueError):
            pass
    return False
