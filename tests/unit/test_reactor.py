"""The loop that the embedded daemon and its clients' engines share (deathstar.reactor)."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import pytest

from deathstar.reactor import Reactor

pytestmark = pytest.mark.timeout(30)


class CountingReactor(Reactor):
    """A Reactor that counts its polls (the turns of its loop)."""

    def __init__(self) -> None:
        super().__init__("test-loop")
        self.polls = 0

    def _poll(self) -> Any:
        self.polls += 1
        return super()._poll()


class Part:
    """A part whose input is handed to it in memory (``inbox``); ``outbox``: a part
    that gets what it handles next, in memory."""

    def __init__(self, loop: CountingReactor, outbox: Part | None = None):
        self.loop = loop
        self.inbox: deque[str] = deque()
        self.outbox = outbox
        self.handled: list[tuple[str, int]] = []  # (message, the poll it came after)
        self.done = threading.Event()
        self.going = True

    def begin(self) -> None: ...

    def pollables(self) -> tuple[Any, ...]:
        return ()

    def deadline(self) -> float:
        return time.monotonic() + 60

    def has_input(self) -> bool:
        return bool(self.inbox)

    def step(self, ready: dict[Any, int], now: float) -> bool:
        while self.inbox:
            msg = self.inbox.popleft()
            self.handled.append((msg, self.loop.polls))
            if self.outbox is not None:
                self.outbox.inbox.append(msg)
            else:
                self.done.set()
        return self.going

    def failed(self, exc: BaseException) -> None: ...

    def end(self) -> None: ...


def test_a_message_handed_to_a_part_that_already_stepped_is_handled_before_the_next_poll(
) -> None:
    """The daemon steps first, its client's engine second: a task the engine hands the
    daemon in memory must not wait for another turn of the loop (a poll, its deadlines
    and every part's housekeeping) to be routed."""
    loop = CountingReactor()
    first = Part(loop)  # the daemon: added first, so it steps first in each turn
    second = Part(loop, outbox=first)  # the engine: hands what it gets to the daemon
    loop.add(first)
    loop.add(second)
    try:
        for n in range(3):
            first.done.clear()
            second.inbox.append(f"task {n}")  # a user thread's command...
            loop.wake()  # ...and its wake-up
            assert first.done.wait(10)
            (sent, sent_after), = second.handled[-1:]
            (got, got_after), = first.handled[-1:]
            assert (sent, got) == (f"task {n}", f"task {n}")
            assert got_after == sent_after, "the message waited for another poll"
    finally:
        thread = loop.thread
        first.going = second.going = False
        second.inbox.append("the end")  # each part steps once more, and leaves
        loop.wake()
        assert thread is not None
        thread.join(10)
        assert not thread.is_alive()


class Due(Part):
    """A part with nothing to read that must step at a deadline (``due``) set from the
    loop's thread: it records the polls before that step."""

    def __init__(self, loop: CountingReactor, ahead_s: float):
        super().__init__(loop)
        self.ahead_s = ahead_s
        self.due = float("inf")
        self.polls_before_due: int | None = None

    def begin(self) -> None:
        self.due = time.monotonic() + self.ahead_s
        self.start_polls = self.loop.polls

    def deadline(self) -> float:
        return self.due

    def step(self, ready: dict[Any, int], now: float) -> bool:
        if now >= self.due and self.polls_before_due is None:
            self.polls_before_due = self.loop.polls - self.start_polls
            self.due = now + 60
            self.done.set()
        return self.going


@pytest.mark.parametrize("ahead_s", [0.0015, 0.0104])
def test_the_loop_sleeps_until_a_deadline_less_than_a_millisecond_off(
        ahead_s: float) -> None:
    """The poll waits in whole milliseconds: rounded down, a deadline 1.5 ms away was
    polled for with 1 ms, then with 0 ms again and again until it passed (some 25 turns
    here, spinning a core; 1,623 polls in a 0.4 s map whose outcomes were held 2 ms,
    44 once rounded up). Rounded up, one poll or two reach it."""
    loop = CountingReactor()
    part = Due(loop, ahead_s)
    loop.add(part)
    try:
        assert part.done.wait(10)
        assert part.polls_before_due is not None and part.polls_before_due <= 3, \
            part.polls_before_due
    finally:
        part.going = False
        loop.wake()
