"""Functions the tests map. Importable by name on the client; shipped as source to the
workers (this folder is not installed), which is itself under test."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
import socket
import time
from typing import Any


def square(x: int) -> int:
    return x * x


def add(x: int, y: int = 0, *, z: int = 0) -> int:
    return x + y + z


def jitter_square(x: int) -> int:
    """Square, after a short pause that varies by input, so results finish out of order."""
    time.sleep((x * 7919 % 13) / 2000)
    return x * x


def fail_on_multiples_of(x: int, k: int = 5) -> int:
    if x % k == 0:
        raise ValueError(f"input {x} is a multiple of {k}")
    return x


def busy_fail_on(x: int, k: int = 5, loops: int = 1000) -> int:
    """About ten microseconds of pure Python work, then ``fail_on_multiples_of``."""
    for _ in range(loops):
        pass
    return fail_on_multiples_of(x, k)


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def whoami(_: Any = None) -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def return_unpicklable(_: Any = None) -> Any:
    import threading

    return threading.Lock()


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("this object refuses to be pickled")


def touch(path: str) -> str:
    with open(path, "w") as fh:
        fh.write("ran")
    return path


def segfault_on(x: int, bad: int = -1) -> int:
    """Kill this worker with SIGSEGV when ``x == bad``; else return ``x``."""
    if x == bad:
        import ctypes

        ctypes.string_at(0)
    return x


def hold_the_gil(x: int, chars: int = 30) -> int:
    """Catastrophic regex backtracking: C code that holds the GIL for a long time
    (about a minute at 30 chars); no Python thread of this process can run meanwhile."""
    import re

    re.match(r"(a+)+$", "a" * chars + "b")
    return x


def sleep_square(x: int, seconds: float = 0.01) -> int:
    time.sleep(seconds)
    return x * x


def slow_on(x: int, slow: int = -1, seconds: float = 30.0) -> int:
    """Sleep ``seconds`` when ``x == slow``; else return ``x`` at once."""
    if x == slow:
        time.sleep(seconds)
    return x


def rss_grow(x: int, megabytes: int = 0) -> int:
    """Keep ``megabytes`` more allocated in this worker (a leak), return ``x``."""
    _LEAK.append(bytearray(megabytes << 20))
    return x


_LEAK: list[bytearray] = []


def shout(x: int) -> int:
    """Print a line naming the input (to stdout and stderr), return it."""
    import sys

    print(f"input {x} on stdout")
    print(f"input {x} on stderr", file=sys.stderr)
    return x


def draw(_: Any = None) -> tuple[float, float]:
    """One number from Python's generator and one from numpy's."""
    import random

    import numpy

    return random.random(), float(numpy.random.random())


def bump_and_sum(a: Any, crash_marker: str = "") -> float:
    """Add 1 to the array in place (it must arrive writable) and return its sum. With
    ``crash_marker``: the first call that finds no such file creates it and kills its
    worker (SIGKILL), so the input is sent again."""
    if crash_marker and not os.path.exists(crash_marker):
        open(crash_marker, "w").close()
        os.kill(os.getpid(), 9)
    a += 1
    return float(a.sum())


_KEPT: list[Any] = []  # inputs ``keep_input`` holds on to, in this worker


def keep_input(a: Any) -> float:
    """Hold on to the input array (its shared-memory map must then never be written
    again) and return its sum."""
    _KEPT.append(a)
    return float(a.sum())


def kept_sums(_: Any = None) -> list[float]:
    """The sums of the arrays ``keep_input`` kept in this worker, now."""
    return [float(a.sum()) for a in _KEPT]


def arange_doubled(n: int) -> Any:
    """A fresh array of ``n`` float64s (big ones come back through shared memory when the
    client is on this machine)."""
    import numpy as np

    return np.arange(n, dtype=np.float64) * 2


def gated(value: Any, gate: str) -> Any:
    """Leave a mark that this call started, wait until the file ``gate`` exists (at most
    a minute; ``""`` means no gate), return ``value``. Shipped as source to the workers."""
    if not gate:
        return value
    Path(f"{gate}.started.{os.getpid()}.{time.monotonic_ns()}").touch()
    deadline = time.monotonic() + 60
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gate {gate} never opened")
        time.sleep(0.005)
    return value


@dataclass
class Gate:
    """A file that ``gated`` calls wait for: ``open`` lets them all finish."""

    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    def open(self) -> None:
        self.path.touch()

    def started(self) -> int:
        """Calls that have reached the gate."""
        return len(list(self.path.parent.glob(self.path.name + ".started.*")))
