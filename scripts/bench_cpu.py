"""CPU time of this process and its descendants, precise enough for the idle row of
scripts/bench.py: an idle cluster spends a few milliseconds a second, the size of the
10 ms clock tick that ``utime``/``stime`` (and psutil) count in.

Where Linux keeps per-thread scheduler statistics (``/proc/PID/task/TID/schedstat``: the
nanoseconds each thread has run), a process's CPU between two snapshots is the sum over
its threads, a thread born in between counted from zero. When one of its threads ended in
between, its nanoseconds are gone with it, so that process falls back to its clock ticks
(which include ended threads); so does every process where schedstat is missing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class ProcessCpu:
    ticks_s: float  # user + system, clock-tick resolution, ended threads included
    threads_ns: dict[int, int] = field(default_factory=dict)  # tid -> ns run (schedstat)


def _threads_ns(pid: int) -> dict[int, int]:
    """Each live thread's nanoseconds on a CPU, or {} where schedstat is missing."""
    found = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                    found[int(tid)] = int(fh.read().split()[0])
            except (OSError, ValueError, IndexError):  # ended meanwhile, or no schedstat
                continue
    except OSError:
        return {}
    return found


def _read(proc) -> ProcessCpu | None:
    import psutil
    try:
        return ProcessCpu(sum(proc.cpu_times()[:2]), _threads_ns(proc.pid))
    except psutil.Error:  # ended meanwhile
        return None


def snapshot(self_last: bool = False) -> dict[int, ProcessCpu]:
    """This process and every live descendant, by pid. Reading the descendants costs this
    process CPU: take the first of two snapshots with ``self_last=True`` so that neither
    snapshot's own reading falls between them."""
    import psutil
    me = psutil.Process()
    procs = [*me.children(recursive=True), me] if self_last else [me, *me.children(recursive=True)]
    taken = {}
    for proc in procs:
        cpu = _read(proc)
        if cpu is not None:
            taken[proc.pid] = cpu
    return taken


def seconds_between(before: dict[int, ProcessCpu], after: dict[int, ProcessCpu]) -> float:
    """CPU seconds the processes alive at ``after`` spent since ``before`` (a process born
    in between counts from zero; one that ended is not counted)."""
    total = 0.0
    for pid, now in after.items():
        then = before.get(pid)
        if then is None:
            total += now.ticks_s
        elif now.threads_ns and set(then.threads_ns) <= set(now.threads_ns):
            total += sum(ns - then.threads_ns.get(tid, 0)
                         for tid, ns in now.threads_ns.items()) / 1e9
        else:
            total += now.ticks_s - then.ticks_s
    return total
