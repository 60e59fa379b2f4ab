"""The floor of W2's shape on this machine: the threads and processes a single call
crosses on the embedded cluster, with nothing else in them. A caller thread queues the
call and wakes a loop thread (a pipe), which writes the message (a msgpack envelope and
the pickled arguments) to a worker process over a pipe; the worker runs it and writes
the result back; the loop thread reads it and resolves a ``concurrent.futures.Future``;
the caller has it. Prints the median round trip: what deathstar's ~370 µs stands on
(multiprocessing.Pool.apply: ~150 µs). A diagnostic, not a benchmark.

    .venv/bin/python scripts/w2_floor.py [--calls 5000]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import os
import pickle
import select
import statistics
import struct
import threading
import time
from typing import Any

import msgpack

_HEAD = struct.Struct("<II")


def send(fd: int, env: dict[str, Any], payload: bytes) -> None:
    packed = msgpack.packb(env)
    os.write(fd, _HEAD.pack(len(packed), len(payload)) + packed + payload)


def receive(fd: int) -> tuple[dict[str, Any], bytes] | None:
    head = os.read(fd, _HEAD.size)
    if not head:
        return None
    env_len, payload_len = _HEAD.unpack(head)
    data = b""
    while len(data) < env_len + payload_len:
        data += os.read(fd, env_len + payload_len - len(data))
    return msgpack.unpackb(data[:env_len]), data[env_len:]


def inc(x: int) -> int:
    return x + 1


def worker(read_fd: int, write_fd: int) -> None:
    while (message := receive(read_fd)) is not None:
        env, payload = message
        args = pickle.loads(payload)
        start = time.time()
        value = inc(*args)
        stamps = struct.pack("<dd", start, time.time())
        send(write_fd, {"t": "result", "id": env["id"], "ts": stamps}, pickle.dumps(value))
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    calls = parser.parse_args().calls
    to_worker, from_worker = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(to_worker[1])
        os.close(from_worker[0])
        worker(to_worker[0], from_worker[1])
    os.close(to_worker[0])
    os.close(from_worker[1])
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    commands: collections.deque[tuple[cf.Future[Any] | None, tuple[Any, ...]]] = \
        collections.deque()
    futures: dict[int, cf.Future[Any]] = {}

    def loop() -> None:
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        poller.register(from_worker[0], select.POLLIN)
        next_id = 0
        while True:
            ready = dict(poller.poll(1000))
            if wake_r in ready:
                os.read(wake_r, 4096)
            while commands:
                future, args = commands.popleft()
                if future is None:
                    return
                next_id += 1
                futures[next_id] = future
                send(to_worker[1], {"t": "task", "id": next_id, "n": 1}, pickle.dumps(args))
            if from_worker[0] in ready:
                message = receive(from_worker[0])
                assert message is not None
                futures.pop(message[0]["id"]).set_result(pickle.loads(message[1]))

    def submit(*args: Any) -> cf.Future[Any]:
        future: cf.Future[Any] = cf.Future()
        commands.append((future, args))
        os.write(wake_w, b"!")
        return future

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    for i in range(300):
        assert submit(i).result() == i + 1
    times = []
    for i in range(calls):
        began = time.perf_counter()
        submit(i).result()
        times.append(time.perf_counter() - began)
    commands.append((None, ()))
    os.write(wake_w, b"!")
    thread.join()
    os.close(to_worker[1])
    os.waitpid(pid, 0)
    print(f"W2's shape, nothing else in it: median {statistics.median(times) * 1e6:.0f} µs "
          f"over {calls} calls")


if __name__ == "__main__":
    main()
