"""A worker: one process that runs tasks for its node's daemon.

Loop: say ready -> receive a task -> run each input of it -> reply with the results (or
each input's exception and traceback) -> repeat. It is the only place a task payload is
unpickled. Started by the daemon (one per core) or by hand with ``deathstar worker``
(``worker.start``).
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import socket
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable

import zmq

from deathstar import config, keys, protocol, serialize, shm
from deathstar.exitcodes import ExitCode
from deathstar.pipelink import PipeClosed, WorkerPipe
from deathstar.slot import SLOT_BYTES, slot_value
from deathstar.protocol import Message
from deathstar.worker.calls import Function, Terminate, dump_results, error_info, run_calls
from deathstar.worker.imports import ModuleFolders

log = logging.getLogger("deathstar.worker")

#: Seconds between the pulse thread's looks at the socket while a task waits behind the
#: one running (how soon a RECALL is answered).
RECALL_CHECK_S = 0.02

#: Function blobs a worker keeps unpickled (most recently used first out).
FUNCTION_CACHE_ENTRIES = 16



def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; else the peak, from rusage)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Worker:
    """One worker process's state and loop. ``run`` blocks until told to stop.

    The main thread owns the socket and runs tasks. While user code runs, a pulse thread
    sends the heartbeats instead: the daemon then sees a hung process (one whose thread
    cannot get the GIL) go silent, but not a merely busy one. The two threads share the
    socket under ``socket_lock``, which the main thread gives up only while a task runs.
    """

    def __init__(self, connect: str, *, parent_pid: int | None = None,
                 heartbeat_s: float = config.HEARTBEAT_INTERVAL_S,
                 max_tasks: int | None = None, max_memory: int | None = None,
                 curve: tuple[bytes, bytes, bytes] | None = None, slot: str | None = None,
                 modules: str | None = None):
        self.connect = connect
        self.slot = _map_slot(slot)  # the daemon reads the task we last started here
        self.curve = curve  # (our public, our secret, the daemon's public key)
        self.max_tasks = max_tasks
        self.max_memory = max_memory
        self.inputs_done = 0
        self.parent_pid = parent_pid
        self.heartbeat_s = heartbeat_s
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.functions: OrderedDict[str, Function] = OrderedDict()
        self.modules = ModuleFolders(modules)
        self.initialized: set[str] = set()  # executors whose initializer ran here
        self.waiting: deque[Message] = deque()  # tasks whose function is being fetched
        self.fetching: set[str] = set()
        self.last_sent = 0.0
        self.sock: Any
        if connect.startswith("pipe:"):  # started by its daemon: see pipelink
            self.sock = WorkerPipe.from_spec(connect)
        else:
            self.sock = zmq.Context.instance().socket(zmq.DEALER)
            self.sock.setsockopt(zmq.LINGER, 1000)
            self.sock.setsockopt(zmq.MAXMSGSIZE, config.MAX_MESSAGE_BYTES)
            self.sock.copy_threshold = config.ZERO_COPY_MIN_BYTES
        self.running = True
        self.socket_lock = threading.Lock()
        # the last task's rshm and the folder it names (None: not a usable folder)
        self.results_to: tuple[Any, shm.SharedFolder | None] = (None, None)
        self.pulse_stop = threading.Event()
        # Messages the pulse thread (or the main thread, before user code) read off the
        # socket for the main loop: a task waiting here can still be given back (RECALL).
        self.inbox: deque[Message] = deque()
        self.nudge = threading.Event()  # wakes the pulse thread: user code starts
        self.busy = False  # the main thread runs user code (the pulse thread may read)
        self.resting = False  # the pulse thread sleeps a heartbeat (wake it for user code)
        self.started = 0  # times user code started (the pulse thread watches it)
        # ``with self.beating``: the pulse thread may use the socket meanwhile (the main
        # thread runs user code, or other long work that does not touch the socket)
        self.beating = _Beating(self)
        self.handlers: dict[str, Callable[[Message], None]] = {
            protocol.TASK: self.on_task,
            protocol.BLOB: self.on_blob,
            protocol.MISSING: self.on_missing,
            protocol.STOP: self.on_stop,
            protocol.HEARTBEAT: lambda msg: None,
            protocol.RECALL: self.on_recall,
        }

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        """Connect, handshake, then serve tasks until stopped. Returns an exit code."""
        self.socket_lock.acquire()
        previous = {sig: signal.signal(sig, self._terminate)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        pulse = threading.Thread(target=self._pulse, name="deathstar-pulse", daemon=True)
        if isinstance(self.sock, zmq.Socket):
            if self.curve is not None:
                keys.connect_with(self.sock, *self.curve)
            self.sock.connect(self.connect)
        try:
            self.say_ready()
            pulse.start()
            while self.running:
                if self.parent_gone():
                    return ExitCode.WORKER_PARENT_GONE
                code = None
                if self.inbox:
                    code = self.dispatch(self.inbox.popleft())
                elif self.sock.poll(int(self.heartbeat_s * 1000)):
                    code = self.handle(self.sock.recv_multipart(copy=False))
                if code is not None:
                    return code
                if self.worn_out():
                    self.send(protocol.pack(protocol.BYE))
                    return ExitCode.WORKER_RECYCLED
                self.heartbeat()
            return ExitCode.OK
        except PipeClosed:
            return ExitCode.WORKER_PARENT_GONE  # the daemon that started us has gone
        except Terminate:
            try:  # goodbye if it can go now; never block on a daemon that isn't there
                self.sock.send_multipart(protocol.pack(protocol.BYE), zmq.NOBLOCK)
            except (zmq.ZMQError, PipeClosed):
                pass
            return ExitCode.OK
        finally:
            self.pulse_stop.set()
            self.nudge.set()
            self.modules.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.sock.close(linger=1000)

    def worn_out(self) -> bool:
        """Reached ``max_tasks`` inputs or ``max_memory`` bytes resident, between tasks
        (the messages it holds then go back unstarted: the daemon reports them so when
        this worker says goodbye)."""
        if self.ran_enough():
            log.info("ran %d inputs (limit %d): leaving to be replaced", self.inputs_done,
                     self.max_tasks)
            return True
        if self.waiting:
            return False  # (its memory is judged once the parked tasks have run)
        if self.max_memory is not None and resident_bytes() >= self.max_memory:
            log.info("resident memory %d bytes (limit %d): leaving to be replaced",
                     resident_bytes(), self.max_memory)
            return True
        return False

    def ran_enough(self) -> bool:
        """It has run ``max_tasks`` inputs."""
        return self.max_tasks is not None and self.inputs_done >= self.max_tasks

    def say_ready(self) -> None:
        self.send(protocol.ready(self.heartbeat_s, self.name, os.getpid()))

    def _terminate(self, signum: int, frame: Any) -> None:
        if not self.running:
            return  # already on the way out (a second signal while saying goodbye)
        self.running = False
        raise Terminate()

    def _pulse(self) -> None:
        """Heartbeats while user code holds the main thread (see the class docstring);
        meanwhile it also reads the socket every RECALL_CHECK_S, so that a task prefetched
        behind the running one can be given back to the daemon for an idle worker.

        While user code runs now and then it looks every RECALL_CHECK_S. After a heartbeat
        without any it rests until user code wakes it (``beating``); it then looks
        RECALL_CHECK_S later, not at once. So a stream of tiny tasks pays no thread switch
        per task, and an idle worker wakes only for its main loop's heartbeat."""
        started, quiet_since = -1, time.monotonic()
        while not self.pulse_stop.is_set():
            now = time.monotonic()
            if self.busy or self.started != started:
                started, quiet_since = self.started, now
            if now - quiet_since < self.heartbeat_s:
                self.pulse_stop.wait(RECALL_CHECK_S)  # user code ran lately: look often
            else:
                # A heartbeat without user code: rest till it comes (or the worker stops:
                # both set ``nudge``). Meanwhile the main loop beats and watches the parent.
                self.resting = True
                if not self.busy:
                    self.nudge.wait()
                self.resting = False
                self.nudge.clear()
                if self.busy:  # woken by user code: look RECALL_CHECK_S into it
                    self.pulse_stop.wait(RECALL_CHECK_S)
            if self.parent_gone():
                os._exit(ExitCode.WORKER_PARENT_GONE)
            if self.socket_lock.acquire(blocking=False):
                try:
                    if not self.pulse_stop.is_set():
                        self.heartbeat()
                        if self.busy:
                            self.take_in()
                except PipeClosed:
                    return  # the daemon has gone: the main loop leaves
                finally:
                    self.socket_lock.release()

    def take_in(self) -> None:
        """Read what waits on the socket into the inbox (socket lock held): a RECALL is
        answered at once, the rest waits for the main loop."""
        while self.sock.poll(0):
            try:
                msg = protocol.decode(self.sock.recv_multipart(copy=False))
            except PipeClosed:
                return  # the main loop leaves
            except protocol.ProtocolError as exc:
                log.warning("dropped a message from the daemon: %s", exc)
                continue
            if msg.type == protocol.RECALL:
                self.on_recall(msg)
            else:
                self.inbox.append(msg)

    def on_recall(self, msg: Message) -> None:
        """Give back the named tasks that wait in the inbox, unstarted (lost
        ``unstarted``); one already started or done is not in it, and is not named."""
        wanted = set(msg.env["ids"])
        given = [m for m in self.inbox if m.type == protocol.TASK and m.env["id"] in wanted]
        for task in given:
            self.inbox.remove(task)
            self.send(protocol.lost([task.env["id"]], "given back unstarted", self.name,
                                    code=protocol.LOST_UNSTARTED))

    def handle(self, frames: list[Any]) -> int | None:
        """Dispatch one message from the daemon; bad messages are logged and dropped."""
        try:
            msg = protocol.decode(frames)
        except protocol.ProtocolError as exc:
            log.warning("dropped a message from the daemon: %s", exc)
            return None
        return self.dispatch(msg)

    def dispatch(self, msg: Message) -> int | None:
        """Act on one decoded message; an exit code when the worker must leave."""
        if msg.type == protocol.REFUSED and msg.env.get(protocol.F_CODE) == protocol.REFUSED_HELLO:
            log.info("the daemon does not know this worker (it restarted?): saying ready")
            self.say_ready()
            return None
        if msg.type == protocol.REFUSED:
            log.error("daemon refused this worker: %s", msg.env["reason"])
            return ExitCode.WORKER_REFUSED
        if msg.type == protocol.WELCOME:
            try:
                for warning in protocol.handshake(msg.env["versions"], "daemon"):
                    log.warning("%s", warning)
            except protocol.VersionMismatch as exc:
                log.error("leaving: %s", exc)
                return ExitCode.WORKER_REFUSED
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
            self.send(protocol.heartbeat())

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
            with self.beating:  # unpickling imports the user's modules: user code
                function = self.load_function(msg.payload)
        except Terminate:
            raise
        except BaseException as exc:  # noqa: B036 - unpickling runs the user's imports
            self.fail_function(fn_hash, exc)
            return
        self.functions[fn_hash] = function
        while len(self.functions) > FUNCTION_CACHE_ENTRIES:
            self.functions.popitem(last=False)
        self.run_waiting()

    def load_function(self, payload: list[Any]) -> Function:
        """A function blob: its modules written and imported here, then the function
        unpickled (by reference to them)."""
        bundle, deferred = serialize.loads_function(payload)
        self.modules.activate(bundle)
        try:
            fn, common, init = deferred.load()
        finally:
            self.modules.remember()
        return Function(fn, common, bundle, init)

    def on_missing(self, msg: Message) -> None:
        fn_hash = msg.env["h"]
        self.fetching.discard(fn_hash)
        self.fail_waiting(fn_hash, "the daemon no longer has this function")

    def run_waiting(self) -> None:
        """Run parked tasks whose function has arrived, in the order they came, until it
        has run ``max_tasks`` inputs (the rest stay parked: the worker leaves)."""
        still: deque[Message] = deque()
        while self.waiting:
            msg = self.waiting.popleft()
            if msg.env["fn"] in self.functions and not self.ran_enough():
                self.run_task(msg)
            else:
                still.append(msg)
        self.waiting = still

    def fail_function(self, fn_hash: str, exc: BaseException) -> None:
        """The function cannot be loaded here (its module imports a package this node
        lacks...): every input of its parked tasks fails with that exception, as if the
        function had raised it. Sending the blob again would fail the same way forever."""
        info = error_info(exc)
        info["traceback"] = self.modules.translate(info["traceback"])
        info["message"] = f"the function could not be loaded on {self.name}: {info['message']}"
        keep: deque[Message] = deque()
        for msg in self.waiting:
            if msg.env["fn"] != fn_hash:
                keep.append(msg)
                continue
            n = msg.env["n"]
            now = time.time()
            payload, _ = dump_results([dict(info)] * n, bytearray(n),
                                      [""] * n if msg.env.get(protocol.F_CAP) else None)
            self.send(protocol.pack(protocol.RESULT, payload, id=msg.env["id"],
                                    worker=self.name,
                                    **protocol.outcome_fields([False] * n, [now] * (2 * n))))
        self.waiting = keep

    def fail_waiting(self, fn_hash: str, reason: str) -> None:
        """Report parked tasks of a function we cannot get as lost: the client resends."""
        keep: deque[Message] = deque()
        for msg in self.waiting:
            if msg.env["fn"] == fn_hash:
                self.send(protocol.lost([msg.env["id"]], reason, self.name,
                                        code=protocol.LOST_BLOB))
            else:
                keep.append(msg)
        self.waiting = keep

    # ------------------------------------------------------------------ running

    def run_task(self, msg: Message) -> None:
        """Run every input of a task message and send one result message back."""
        function = self.functions[msg.env["fn"]]
        self.functions.move_to_end(msg.env["fn"])
        self.modules.activate(function.bundle)
        if self.slot is not None:
            self.slot[:] = slot_value(msg.env["id"]).to_bytes(SLOT_BYTES, "little")
        kept: list[shm.Kept] = []  # the input files it maps, given back after
        with self.beating:  # user code: the calls, then pickling their results
            values, oks, stamps, outputs = run_calls(function, msg, self.initialized, kept)
            if 0 in oks:
                self.translate_tracebacks(values, oks)
            payload, raw = dump_results(values, oks, outputs)
            del values  # (the inputs they hold may let their files go)
            extra: dict[str, Any] = {protocol.F_RAW: True} if raw else {}
            shared = self.results_folder(msg.env.get(protocol.F_RSHM))
            if shared is not None:
                payload, extra[protocol.F_SHM], _ = shared.share(payload)
            if kept:
                extra[protocol.F_FREE] = shm.give_back(kept)
        self.modules.remember()
        self.inputs_done += len(oks)
        self.send(protocol.pack(protocol.RESULT, payload, id=msg.env["id"], worker=self.name,
                                **protocol.outcome_fields(oks, stamps), **extra))

    def translate_tracebacks(self, values: list[Any], oks: bytearray) -> None:
        """The client's own file names in the failed inputs' tracebacks."""
        for value, ok in zip(values, oks):
            if not ok:
                value["traceback"] = self.modules.translate(value["traceback"])

    def results_folder(self, rshm: Any) -> shm.SharedFolder | None:
        """Where large results go when the client is on this machine: its /dev/shm folder
        named by the task's ``rshm``, checked once per client."""
        if rshm is None:
            return None
        if self.results_to[0] != rshm:
            folder = shm.shared_folder(rshm)
            self.results_to = (rshm, None if folder is None
                               else shm.SharedFolder(into=folder))
        return self.results_to[1]


class _Beating:
    """``Worker.beating``: while it is entered, the main thread gives the socket up to
    the pulse thread (a class, not a generator context manager: it is entered per
    task)."""

    __slots__ = ("worker",)

    def __init__(self, worker: Worker):
        self.worker = worker

    def __enter__(self) -> None:
        worker = self.worker
        worker.busy = True  # a task prefetched behind this work can be given back meanwhile
        worker.started += 1
        if worker.resting:
            worker.nudge.set()
        worker.socket_lock.release()

    def __exit__(self, *exc: object) -> None:
        self.worker.socket_lock.acquire()
        self.worker.busy = False


def _map_slot(path: str | None) -> mmap.mmap | None:
    if path is None:
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, SLOT_BYTES)
    finally:
        os.close(fd)
