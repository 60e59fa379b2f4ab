"""Where a single call's time goes (W2 of scripts/bench.py), stage by stage, on the
embedded cluster: ``Executor().submit(inc, x).result()`` N times, with a wall-clock stamp
taken as each stage begins or ends (the engine, the daemon and the executor in this
process, patched; the worker's own start and end stamps from the report). Prints the
median time between consecutive stages and the median call. A diagnostic, not a
benchmark: the patches cost a few microseconds each.

    .venv/bin/python scripts/w2_stages.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from typing import Any, Callable

import bench_tasks as T
from deathstar.client import engine as engine_mod
from deathstar.client import executor as executor_mod
from deathstar.client import futures as futures_mod
from deathstar.client import job as job_mod
from deathstar.client.executor import Executor
from deathstar.daemon import clients as clients_mod
from deathstar.daemon import workers as workers_mod

STAMPS: dict[str, list[float]] = collections.defaultdict(list)

#: (stage, class, method, stamped after the call rather than before), in call order.
PATCHES: list[tuple[str, Any, str, bool]] = [
    # (stamped as it returns a call: the read that finds the queue empty raises)
    ("the I/O loop takes the call", executor_mod.Executor, "_take", True),
    ("the engine has sent the message", engine_mod.Engine, "send_task", True),
    ("the daemon routes it", clients_mod.ClientSessions, "on_task", False),
    ("the daemon assigns it to a worker", workers_mod.WorkerSessions, "assign", False),
    ("the daemon relays the result", clients_mod.ClientSessions, "relay", False),
    ("the engine takes the result", engine_mod.Engine, "on_result", False),
    ("the future is resolved", futures_mod.CallFuture, "settle_unless_hooked", True),
]


def stamped(name: str, method: Callable[..., Any], after: bool) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not after:
            STAMPS[name].append(time.time())
        result = method(*args, **kwargs)
        if after:
            STAMPS[name].append(time.time())
        return result
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    n = parser.parse_args().calls
    for name, cls, method, after in PATCHES:
        setattr(cls, method, stamped(name, getattr(cls, method), after))
    worker_times: list[tuple[float, float]] = []
    complete = job_mod.Job.complete

    def complete_stamped(self: Any, task: Any, node: str, worker: str, oks: Any,
                         starts: Any, ends: Any, *args: Any, **kwargs: Any) -> Any:
        worker_times.append((starts[0], ends[-1]))
        return complete(self, task, node, worker, oks, starts, ends, *args, **kwargs)

    job_mod.Job.complete = complete_stamped  # type: ignore[method-assign]
    with Executor() as ex:
        for i in range(200):  # warm: workers up, the function loaded
            ex.submit(T.inc, i).result()
        STAMPS.clear()
        worker_times.clear()
        submitted, returned = [], []
        for i in range(n):
            submitted.append(time.time())
            ex.submit(T.inc, i).result()
            returned.append(time.time())
    stages = [("submit", submitted)]
    stages += [(name, STAMPS[name][-n:]) for name, *_ in PATCHES[:4]]
    stages += [("the worker starts the call", [w[0] for w in worker_times[-n:]]),
               ("the worker has ended it", [w[1] for w in worker_times[-n:]])]
    stages += [(name, STAMPS[name][-n:]) for name, *_ in PATCHES[4:]]
    stages += [("your thread has the result", returned)]
    print(f"W2 stages, median of {n} calls (µs since the stage before):")
    for (_, before), (name, now) in zip(stages, stages[1:]):
        if len(before) != n or len(now) != n:
            raise SystemExit(f"stage {name!r}: {len(now)} stamps for {n} calls")
        print(f"  {name:42s} {statistics.median(b - a for a, b in zip(before, now)) * 1e6:7.1f}")
    print(f"  {'whole call':42s} "
          f"{statistics.median(b - a for a, b in zip(submitted, returned)) * 1e6:7.1f}")


if __name__ == "__main__":
    main()
