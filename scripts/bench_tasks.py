"""Task functions for scripts/bench.py, in an importable module so that every system
(deathstar, multiprocessing, concurrent.futures, Dask, Ray, loky) pickles them by reference.

Also the two "floor" servers (raw pyzmq echo and raw zero-copy sink), run in a child process.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def inc(x: int) -> int:
    """W1, W2, W7: the trivial task."""
    return x + 1


def estimate_pi(seed: int, draws: int = 100_000) -> float:
    """W3: the seed's estimatePi (same body as examples/pi.py)."""
    rng = np.random.default_rng(seed)
    points = rng.random((draws, 2))
    inside = np.count_nonzero(np.einsum("ij,ij->i", points, points) <= 1.0)
    return 4.0 * inside / draws


def array_sum(a: np.ndarray) -> float:
    """W4: a large argument in, a float out."""
    return float(a.sum())


def sleep_for(seconds: float) -> float:
    """W5: a task of known duration."""
    time.sleep(seconds)
    return seconds


def common_lookup(i: int, data: np.ndarray) -> float:
    """W6: a cheap task that needs the big common argument."""
    return float(data[i % len(data)])


# ---------------------------------------------------------------------- floor servers


def _serve(endpoint_queue: Any, reply: Any, stop_after_s: float) -> None:
    """A ROUTER on a free loopback port (reported on the queue) answering each message
    with ``reply(frames)`` until a STOP message or ``stop_after_s``."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    endpoint_queue.put(port)
    deadline = time.monotonic() + stop_after_s
    try:
        while time.monotonic() < deadline:
            if not sock.poll(1000):
                continue
            frames = sock.recv_multipart(copy=False)
            if len(frames) == 2 and frames[1].bytes == b"STOP":
                sock.send_multipart(frames, copy=False)
                break
            sock.send_multipart(reply(frames), copy=False)
    finally:
        sock.close(0)
        ctx.term()


def echo_server(endpoint_queue: Any, stop_after_s: float = 600.0) -> None:
    """ROUTER that echoes every message back."""
    _serve(endpoint_queue, lambda frames: frames, stop_after_s)


def _array_length(frames: Any) -> list[Any]:
    arr = np.frombuffer(frames[1].buffer, dtype=np.float64)  # no copy of the frame
    return [frames[0], str(arr.size).encode()]


def sink_server(endpoint_queue: Any, stop_after_s: float = 600.0) -> None:
    """ROUTER that receives an array without copying and acknowledges its length."""
    _serve(endpoint_queue, _array_length, stop_after_s)


# ------------------------------------------------- brokered floor: the shape of deathstar


def chain_broker(endpoint_queue: Any, folder: str, workers: int,
                 stop_after_s: float = 600.0) -> None:
    """The least a brokered design must do, in pyzmq with no checks: a client-facing
    ROUTER and a worker-facing ROUTER (ipc sockets in ``folder``, as the embedded deathstar
    uses), a queue, idle workers first come first served, results routed back. Puts the
    client endpoint on the queue once ``workers`` ``chain_worker``s (started by the caller
    on ``ipc://FOLDER/back``) said ready; ends on a STOP message or after ``stop_after_s``."""
    from collections import deque

    import zmq

    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    front.bind(f"ipc://{folder}/front")
    back.bind(f"ipc://{folder}/back")
    idle: deque[bytes] = deque()
    for _ in range(workers):
        idle.append(back.recv_multipart()[0])
    endpoint_queue.put(f"ipc://{folder}/front")
    queue: deque[list[Any]] = deque()
    client = b""
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    deadline = time.monotonic() + stop_after_s
    try:
        while time.monotonic() < deadline:
            ready = dict(poller.poll(1000))
            if back in ready:
                while back.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    frames = back.recv_multipart(copy=False)
                    idle.append(frames[0].bytes)
                    front.send_multipart([client, *frames[1:]], copy=False)
            if front in ready:
                while front.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    frames = front.recv_multipart(copy=False)
                    client = frames[0].bytes
                    if frames[1].bytes == b"STOP":
                        front.send_multipart(frames, copy=False)
                        return
                    queue.append(frames[1:])
            while queue and idle:
                back.send_multipart([idle.popleft(), *queue.popleft()], copy=False)
    finally:
        front.close(0)
        back.close(0)
        ctx.term()


def chain_worker(endpoint: str) -> None:
    """A chain_broker worker: unpickle the argument, run ``inc``, pickle the result."""
    import pickle

    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send(b"READY")
    while True:
        frames = sock.recv_multipart()
        sock.send_multipart([pickle.dumps(inc(pickle.loads(frames[-1])))])
