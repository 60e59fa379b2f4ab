"""Functions the tests map. Importable by name on the client; shipped by value to workers
(this folder is not installed), which is itself under test."""

from __future__ import annotations

import os
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
