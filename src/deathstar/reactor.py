"""One poll loop, in one thread, for several parts: the embedded daemon and the client
engines that use it share a thread, so a message between them wakes no other thread and
takes no lock. A remote cluster's engine, or a node's daemon, runs alone in a loop of its
own. Loop: poll every part's sockets until the earliest part's deadline -> step each
part -> drop the parts that finished.

A part's methods run only in its loop's thread. ``step`` must not block: every part in the
loop waits while one does."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from typing import Any, Protocol

import zmq

log = logging.getLogger("deathstar")

#: Rounds of ``Reactor._settle`` after a turn, at most (each steps every part that has
#: input in memory; more than one only when parts hand each other messages back and forth).
SETTLE_ROUNDS = 4

_current = threading.local()  # .reactor: the Reactor whose loop runs in this thread


class Part(Protocol):
    """What a loop runs. ``begin`` once before the first step, ``end`` once after the
    last (after ``failed`` when a method raised)."""

    def begin(self) -> None:
        """Start (connect, spawn...): the first call in the loop's thread."""

    def pollables(self) -> tuple[Any, ...]:
        """The sockets and file descriptors to poll for input, and ``(fd, events)`` pairs
        for other events (may change between steps)."""

    def deadline(self) -> float:
        """The ``time.monotonic()`` by which ``step`` must run even with no input."""

    def has_input(self) -> bool:
        """Whether input waits that no pollable shows (a message another part of this
        loop handed over in memory): the part steps without the loop sleeping."""

    def step(self, ready: dict[Any, int], now: float) -> bool:
        """Handle what is ready (``ready`` maps each readable pollable to its events) and
        what is due; False once finished."""

    def failed(self, exc: BaseException) -> None:
        """``begin`` or ``step`` raised ``exc``: the part leaves the loop after this."""

    def end(self) -> None:
        """Close (sockets, processes): the last call in the loop's thread."""


def on_loop_thread() -> bool:
    """Whether the calling thread runs a loop (it must never wait for a part to end)."""
    return getattr(_current, "reactor", None) is not None


class Reactor:
    """Runs parts in a thread named ``name``: the thread starts with the first part added
    and ends when the last part has ended (a later ``add`` starts it again)."""

    def __init__(self, name: str):
        self.name = name
        self.parts: list[Part] = []
        self.lock = threading.Lock()
        self.incoming: list[Part] = []
        self.thread: threading.Thread | None = None
        self.wake_r = self.wake_w = -1  # a pipe while the thread runs: ``add`` wakes it
        self.polled: list[Any] = []
        # each part's pollables as last seen, and the descriptors among them
        self.known: dict[Part, tuple[tuple[Any, ...], frozenset[Any]]] = {}
        self.poller = zmq.Poller()

    def add(self, part: Part) -> None:
        """Run ``part`` in this loop (any thread); returns at once."""
        with self.lock:
            self.incoming.append(part)
            if self.thread is None:
                self._open_pipe()
                self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self.thread.start()
                return
            self._wake_locked()

    def wake(self) -> None:
        """Make the loop go round (any thread): a part that has input no pollable shows
        (``has_input``: a command queued by another thread) then steps. Nothing when
        the loop is not running."""
        with self.lock:
            if self.thread is not None:
                self._wake_locked()

    def _wake_locked(self) -> None:
        try:
            os.write(self.wake_w, b"!")
        except BlockingIOError:
            pass  # a wake-up waits already

    def _open_pipe(self) -> None:
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    def hand_over(self) -> None:
        """From a part's step, after it woke a thread that waits on it (a future it
        resolved): let that thread run now, when the rest of this turn is long (the loop
        runs more than one part: a client engine and the embedded daemon it uses). The
        woken thread needs the GIL, which this thread would otherwise keep until it blocks
        in its next poll; a zero sleep releases it, and the waiting thread takes it. That
        took about 50 µs off a single call's round trip (W2) on the embedded cluster; in a
        loop of one part, whose turn is short, the extra switch costs what it saves."""
        if len(self.parts) > 1:
            time.sleep(0)

    def owns_thread(self) -> bool:
        """Whether the calling thread is this loop's."""
        return getattr(_current, "reactor", None) is self

    def serve(self, part: Part) -> None:
        """Run ``part`` alone in the calling thread until it ends; what it raises
        propagates (after ``failed`` and ``end``). In the main thread a signal wakes the
        loop (``signal.set_wakeup_fd``): what its handler did to the part (a daemon's
        stop on SIGTERM) is seen at once, not when the part's next deadline comes, which
        for an idle daemon is a heartbeat interval away."""
        with self.lock:
            self._open_pipe()
            self.thread = threading.current_thread()
            self.incoming.append(part)
        main = threading.current_thread() is threading.main_thread()
        previous = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False) if main \
            else -1
        try:
            self._loop(reraise=True)
        finally:
            if main:
                signal.set_wakeup_fd(previous)
            _current.reactor = None
            with self.lock:
                if self.thread is not None:  # it raised: no part is left to run
                    self.parts.clear()
                    self.incoming.clear()
                    self._take_incoming_locked()

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            self._loop(reraise=False)
        finally:
            _current.reactor = None

    def _loop(self, reraise: bool) -> None:
        _current.reactor = self
        while self._take_incoming(reraise):
            ready, turns = self._poll()
            now = time.monotonic()
            for part, fds, due in turns:
                # a part steps when it has input or is due (and only then: each step
                # costs the whole loop its housekeeping)
                if (now >= due or not fds.isdisjoint(ready) or part.has_input()) \
                        and part in self.parts:
                    self._call(part, part.step, reraise, ready, now)
            self._settle(reraise)

    def _settle(self, reraise: bool) -> None:
        """Step the parts that a step of another part handed input in memory (a client
        engine's task to its hosted daemon, after that daemon's turn), before the loop
        polls again: a message within the loop then costs no turn of its own."""
        for _ in range(SETTLE_ROUNDS):
            waiting = [part for part in self.parts if part.has_input()]
            if not waiting:
                return
            for part in waiting:
                if part in self.parts:
                    self._call(part, part.step, reraise, {}, time.monotonic())

    def _take_incoming(self, reraise: bool) -> bool:
        """Begin the parts added meanwhile; False (the thread ends) when none is left."""
        with self.lock:
            incoming = self._take_incoming_locked()
            if incoming is None:
                return False
        for part in incoming:
            self.parts.append(part)
            self._call(part, part.begin, reraise)
        return True

    def _take_incoming_locked(self) -> list[Part] | None:
        """The parts added meanwhile, or None when none is left to run: the thread ends
        (its wake-up pipe is closed; the next ``add`` starts another)."""
        incoming, self.incoming = self.incoming, []
        if incoming or self.parts:
            return incoming
        self.thread = None
        os.close(self.wake_r)
        os.close(self.wake_w)
        self.wake_r = self.wake_w = -1
        self.polled = []
        self.poller = zmq.Poller()
        return None

    def _call(self, part: Part, method: Any, reraise: bool, *args: Any) -> None:
        """``method`` of ``part``: the part ends when it returns False or raises."""
        try:
            going = method(*args)
        except BaseException as exc:  # noqa: B036 - one part's failure ends it, not the loop
            part.failed(exc)
            self._end(part)
            if reraise:
                raise
            return
        if going is False:
            self._end(part)

    def _end(self, part: Part) -> None:
        self.parts.remove(part)
        self.known.pop(part, None)
        try:
            part.end()
        except Exception:  # noqa: BLE001 - the other parts go on
            log.exception("a part of the %s loop failed to close", self.name)

    def _poll(self) -> tuple[dict[Any, int], list[tuple[Part, frozenset[Any], float]]]:
        """Wait for input or the earliest deadline: what is ready, and each part's turn
        (the part, the sockets and descriptors it polls, its deadline)."""
        turns, pollables = [], [self.wake_r]
        known = self.known
        for part in self.parts:
            mine = part.pollables()
            pollables += mine
            fds = known.get(part)
            if fds is None or fds[0] != mine:
                fds = known[part] = (mine, frozenset(p[0] if isinstance(p, tuple) else p
                                                     for p in mine))
            turns.append((part, fds[1], part.deadline()))
        if pollables != self.polled:
            self.poller = zmq.Poller()
            for p in pollables:
                if isinstance(p, tuple):  # (fd, events): to write, say
                    self.poller.register(*p)
                else:
                    self.poller.register(p, zmq.POLLIN)
            self.polled = pollables
        now = time.monotonic()
        due = math.inf
        for part, _, part_due in turns:  # (a loop, not min/any: this runs every turn)
            if part.has_input():
                due = now
                break
            if part_due < due:
                due = part_due
        if due == math.inf:
            due = now + 1.0
        # whole milliseconds, rounded up: rounded down, a deadline less than 1 ms away
        # would be polled for with 0 again and again, spinning a core until it passed
        ready = dict(self.poller.poll(max(0, math.ceil((due - now) * 1000))))
        if self.wake_r in ready:
            try:  # one read: a byte left over (4,096 wake-ups queued) is one more turn
                os.read(self.wake_r, 4096)
            except BlockingIOError:
                pass
        return ready, turns
