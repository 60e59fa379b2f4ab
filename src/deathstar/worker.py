"""A worker: one process that runs tasks for its node's daemon.

Loop: say ready -> receive a task -> run each input of it -> reply with the results (or
each input's exception and traceback) -> repeat. It is the only place a task payload is
unpickled. Started by the daemon (one per core) or by hand with ``deathstar worker``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections import OrderedDict, deque
from typing import Any, Callable

import cloudpickle
import zmq

from deathstar import config, protocol, serialize
from deathstar.protocol import Message

log = logging.getLogger("deathstar.worker")

#: Function blobs a worker keeps unpickled (most recently used first out).
FUNCTION_CACHE_ENTRIES = 16

#: Exit codes.
EXIT_OK = 0
EXIT_REFUSED = 3  # the daemon refused us (version mismatch)
EXIT_PARENT_GONE = 4


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the parent check in the loop remains
        pass


def _error_info(exc: BaseException) -> dict[str, Any]:
    """What travels back for an exception: plain fields, plus the exception pickled when
    it can be (so the client can re-raise the original type)."""
    info: dict[str, Any] = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }
    try:
        info["pickled"] = cloudpickle.dumps(exc, protocol=5)
    except Exception:
        info["pickled"] = None
    return info


class Worker:
    """One worker process's state and loop. ``run`` blocks until told to stop."""

    def __init__(self, connect: str, *, parent_pid: int | None = None,
                 heartbeat_s: float = config.HEARTBEAT_INTERVAL_S):
        self.connect = connect
        self.parent_pid = parent_pid
        self.heartbeat_s = heartbeat_s
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.functions: OrderedDict[str, tuple[Callable[..., Any], dict[str, Any]]] = OrderedDict()
        self.waiting: deque[Message] = deque()  # tasks whose function is being fetched
        self.fetching: set[str] = set()
        self.last_sent = 0.0
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, config.MAX_MESSAGE_BYTES)
        self.running = True
        self.handlers: dict[str, Callable[[Message], None]] = {
            protocol.TASK: self.on_task,
            protocol.BLOB: self.on_blob,
            protocol.MISSING: self.on_missing,
            protocol.STOP: self.on_stop,
            protocol.HEARTBEAT: lambda msg: None,
        }

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        """Connect, handshake, then serve tasks until stopped. Returns an exit code."""
        self.sock.connect(self.connect)
        self.send(protocol.pack(
            protocol.READY, versions=protocol.local_versions(), hb=self.heartbeat_s,
            worker=self.name, pid=os.getpid(),
        ))
        try:
            while self.running:
                if self.parent_gone():
                    return EXIT_PARENT_GONE
                if self.sock.poll(int(self.heartbeat_s * 1000)):
                    code = self.handle(self.sock.recv_multipart(copy=False))
                    if code is not None:
                        return code
                self.heartbeat()
            return EXIT_OK
        finally:
            self.sock.close(linger=1000)

    def handle(self, frames: list[Any]) -> int | None:
        """Dispatch one message from the daemon; bad messages are logged and dropped."""
        try:
            msg = protocol.decode(frames)
        except protocol.ProtocolError as exc:
            log.warning("dropped a message from the daemon: %s", exc)
            return None
        if msg.type == protocol.REFUSED:
            log.error("daemon refused this worker: %s", msg.env["reason"])
            return EXIT_REFUSED
        if msg.type == protocol.WELCOME:
            for warning in protocol.compare_versions(
                    protocol.local_versions(), msg.env["versions"], "daemon"):
                log.warning("%s", warning)
            return None
        handler = self.handlers.get(msg.type)
        if handler is None:
            log.warning("dropped an unexpected %s message", msg.type)
        else:
            handler(msg)
        return None

    def parent_gone(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def heartbeat(self) -> None:
        if time.monotonic() - self.last_sent >= self.heartbeat_s:
            self.send(protocol.pack(protocol.HEARTBEAT))

    def send(self, frames: list[Any]) -> None:
        self.sock.send_multipart(frames, copy=False)
        self.last_sent = time.monotonic()

    # ------------------------------------------------------------------ handlers

    def on_stop(self, msg: Message) -> None:
        self.running = False

    def on_task(self, msg: Message) -> None:
        fn_hash = msg.env["fn"]
        if fn_hash in self.functions:
            self.run_task(msg)
            return
        self.waiting.append(msg)
        if fn_hash not in self.fetching:
            self.fetching.add(fn_hash)
            self.send(protocol.pack(protocol.FETCH, h=fn_hash))

    def on_blob(self, msg: Message) -> None:
        fn_hash = msg.env["h"]
        self.fetching.discard(fn_hash)
        try:
            fn, common = serialize.loads(msg.payload)
        except Exception as exc:
            self.fail_waiting(fn_hash, f"the function could not be unpickled here: {exc!r}")
            return
        self.functions[fn_hash] = (fn, common)
        while len(self.functions) > FUNCTION_CACHE_ENTRIES:
            self.functions.popitem(last=False)
        self.run_waiting()

    def on_missing(self, msg: Message) -> None:
        fn_hash = msg.env["h"]
        self.fetching.discard(fn_hash)
        self.fail_waiting(fn_hash, "the daemon no longer has this function")

    def run_waiting(self) -> None:
        """Run parked tasks whose function has arrived, in the order they came."""
        still: deque[Message] = deque()
        while self.waiting:
            msg = self.waiting.popleft()
            if msg.env["fn"] in self.functions:
                self.run_task(msg)
            else:
                still.append(msg)
        self.waiting = still

    def fail_waiting(self, fn_hash: str, reason: str) -> None:
        """Report parked tasks of a function we cannot get as lost: the client resends."""
        keep: deque[Message] = deque()
        for msg in self.waiting:
            if msg.env["fn"] == fn_hash:
                self.send(protocol.pack(protocol.LOST, ids=[msg.env["id"]], reason=reason,
                                        worker=self.name))
            else:
                keep.append(msg)
        self.waiting = keep

    # ------------------------------------------------------------------ running

    def run_task(self, msg: Message) -> None:
        """Run every input of a task message and send one result message back."""
        fn, common = self.functions[msg.env["fn"]]
        self.functions.move_to_end(msg.env["fn"])
        values: list[Any] = []
        oks: list[bool] = []
        stamps: list[list[float]] = []
        try:
            items = serialize.loads(msg.payload)
        except Exception as exc:
            info = _error_info(exc)
            info["message"] = f"the task's arguments could not be unpickled here: {exc}"
            now = time.time()
            n = msg.env["n"]
            values, oks, stamps = [info] * n, [False] * n, [[now, now]] * n
        else:
            for args, kwargs in items:
                start = time.time()
                try:
                    if kwargs:
                        values.append(fn(*args, **{**common, **kwargs}))
                    else:
                        values.append(fn(*args, **common))
                    oks.append(True)
                except (Exception, SystemExit) as exc:
                    values.append(_error_info(exc))
                    oks.append(False)
                stamps.append([start, time.time()])
        payload = self._dump_results(values, oks)
        self.send(protocol.pack(protocol.RESULT, payload, id=msg.env["id"], worker=self.name,
                                ok=oks, ts=stamps))

    @staticmethod
    def _dump_results(values: list[Any], oks: list[bool]) -> list[Any]:
        """Pickle the results; one that cannot be pickled becomes that input's error."""
        try:
            return serialize.dumps(values)
        except Exception:
            pass
        for i, value in enumerate(values):
            try:
                serialize.dumps(value)
            except Exception as exc:
                info = _error_info(exc)
                info["message"] = (f"the result ({type(value).__name__}) could not be "
                                   f"pickled: {exc}")
                values[i], oks[i] = info, False
        return serialize.dumps(values)


def main(connect: str, parent_pid: int | None = None) -> int:
    """Entry point of a worker process (``deathstar worker`` and the daemon's children)."""
    logging.basicConfig(level=logging.DEBUG if config.DEBUG else logging.INFO,
                        format=f"%(asctime)s worker {os.getpid()} %(levelname)s %(message)s")
    if parent_pid is not None:
        set_parent_death_signal()
        # The user's prints must never mix into the daemon's (or embedded client's) stdout.
        os.dup2(2, 1)
    return Worker(connect, parent_pid=parent_pid).run()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m deathstar.worker")
    parser.add_argument("--connect", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    ns = parser.parse_args()
    sys.exit(main(ns.connect, ns.parent_pid))
