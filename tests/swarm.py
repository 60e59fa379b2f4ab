"""Many lightweight workers in one process: the way to connect hundreds of workers to
one daemon on a two-core machine (a real worker process costs ~30 MB and a core-second
to start). Issue 5 asks for exactly this to show the daemon's per-task cost does not
grow with the workers it serves.

Each is a DEALER socket speaking the worker side of the protocol (deathstar.protocol):
ready, heartbeats, and for every task message a result computed by ``compute`` on the
inputs, which it unpickles as a worker would. It does not run shipped functions (there
is no fetch): ``compute`` stands for the user's function. One thread serves them all.
Used by tests/integration/test_hot_path.py and scripts/bench.py.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

import zmq

from deathstar import protocol, serialize


class Swarm:
    """``count`` lightweight workers connected to ``endpoint`` (a daemon's worker port),
    answering every task with ``compute(*args)`` for each input. ``tasks[i]`` counts the
    task messages worker i ran. A context manager; ``close`` stops them."""

    def __init__(self, endpoint: str, count: int, compute: Callable[..., Any],
                 heartbeat_s: float = 1.0):
        self.compute = compute
        self.heartbeat_s = heartbeat_s
        self.ctx = zmq.Context()
        self.socks: list[zmq.Socket[bytes]] = []
        self.tasks = [0] * count
        self.stopping = threading.Event()
        for i in range(count):
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            sock.send_multipart(protocol.pack(
                protocol.READY, versions=protocol.local_versions(), hb=heartbeat_s,
                worker=f"swarm-{i}", pid=os.getpid()))
            self.socks.append(sock)
        self.thread = threading.Thread(target=self._serve, name="swarm", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        index = {sock: i for i, sock in enumerate(self.socks)}
        for sock in self.socks:
            poller.register(sock, zmq.POLLIN)
        next_beat = time.monotonic()
        while not self.stopping.is_set():
            for sock, _ in poller.poll(int(self.heartbeat_s * 250)):
                while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._handle(index[sock], sock, sock.recv_multipart(copy=False))
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.heartbeat_s / 2
                for sock in self.socks:
                    sock.send_multipart(protocol.pack(protocol.HEARTBEAT))

    def _handle(self, i: int, sock: zmq.Socket[bytes], frames: list[Any]) -> None:
        msg = protocol.decode(frames)
        if msg.type != protocol.TASK:
            return  # welcome, heartbeat
        items = serialize.loads(msg.payload)
        if msg.env.get(protocol.F_PLAIN):  # each item is the one argument
            items = [((item,), None) for item in items]
        start = time.time()
        values = [self.compute(*args, **(kwargs or {})) for args, kwargs in items]
        end = time.time()
        self.tasks[i] += 1
        sock.send_multipart(protocol.pack(
            protocol.RESULT, serialize.dumps(values), id=msg.env["id"], worker=f"swarm-{i}",
            **protocol.outcome_fields([True] * len(values), [start, end] * len(values))),
            copy=False)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(10)
        for sock in self.socks:
            sock.send_multipart(protocol.pack(protocol.BYE))
            sock.close(linger=200)  # let the goodbye out
        self.ctx.term()

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
