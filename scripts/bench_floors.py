"""The floors of scripts/bench.py: what the machine allows with nothing of deathstar in
it. A raw pyzmq round trip and a 16 MB zero-copy transfer between two processes, and a
brokered chain (client -> bare pyzmq broker -> bare workers, one task per message)."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import shutil
import tempfile
import time
from typing import Any, Callable

import numpy as np

import bench_tasks as T
from bench_common import MB, BenchTimeout, Sizes, log, run_reps, w1_data, w4_arrays
from bench_report import Results


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
