"""The execution report: one record per input, and the per-node summary built from it."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Iterable

#: Outcomes a record can have.
OK = "ok"
ERROR = "error"  # the user's function raised
CRASHED = "crashed"  # the worker died on every attempt
TIMEOUT = "timeout"  # the input ran past its timeout
FAILED_OUTCOMES = (ERROR, CRASHED, TIMEOUT)


@dataclass(slots=True)
class TaskRecord:
    """How one input ran: where, when (worker wall clock, seconds since the epoch), how
    many attempts it took, and how it ended. Inputs the client expected to run under
    50 µs each are not timed one by one: they share their message's time evenly."""

    index: int
    node: str
    worker: str
    start: float
    end: float
    attempts: int
    outcome: str
    error: str = ""
    output: str = ""  # what the input printed, with capture_output

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)


@dataclass(slots=True)
class NodeSummary:
    """One row of the node summary."""

    node: str
    jobs_completed: int
    failed: int
    busy_s: float
    workers: int


class Tally:
    """The node summary built up one record at a time (memory per node, not per input)."""

    def __init__(self) -> None:
        self.rows: dict[str, NodeSummary] = {}
        self.workers: dict[str, set[str]] = {}

    def add(self, rec: TaskRecord) -> None:
        row = self.rows.get(rec.node)
        if row is None:
            row = self.rows[rec.node] = NodeSummary(rec.node, 0, 0, 0.0, 0)
            self.workers[rec.node] = set()
        if rec.outcome == OK:
            row.jobs_completed += 1
        else:
            row.failed += 1
        row.busy_s += rec.seconds
        if rec.worker:
            self.workers[rec.node].add(rec.worker)

    def add_batch(self, node: str, worker: str, completed: int, busy_s: float) -> None:
        """``add`` for ``completed`` inputs of one message that all succeeded."""
        row = self.rows.get(node)
        if row is None:
            row = self.rows[node] = NodeSummary(node, 0, 0, 0.0, 0)
            self.workers[node] = set()
        row.jobs_completed += completed
        row.busy_s += busy_s
        if worker:
            self.workers[node].add(worker)

    def summary(self) -> list[NodeSummary]:
        for node, row in self.rows.items():
            row.workers = len(self.workers[node])
        return sorted(self.rows.values(), key=lambda r: (-r.jobs_completed, r.node))


def node_summary(report: Iterable[TaskRecord]) -> list[NodeSummary]:
    """Per node: jobs completed, jobs failed, seconds spent in the user's function, and
    distinct workers used; sorted by jobs completed, most first."""
    tally = Tally()
    for rec in report:
        tally.add(rec)
    return tally.summary()


_COLUMNS = [f.name for f in fields(TaskRecord)]


class ReportWriter:
    """Writes the report as records arrive: CSV for ``.csv``, else a JSON array.
    ``close`` completes the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.csv = self.path.suffix.lower() == ".csv"
        self.fh: IO[str] = self.path.open("w", newline="" if self.csv else None)
        self.count = 0
        if self.csv:
            self.writer = csv.writer(self.fh)
            self.writer.writerow(_COLUMNS)
        else:
            self.fh.write("[")

    def add(self, rec: TaskRecord) -> None:
        if self.csv:
            self.writer.writerow([getattr(rec, c) for c in _COLUMNS])
        else:
            self.fh.write(("\n " if self.count == 0 else ",\n ") + json.dumps(asdict(rec)))
        self.count += 1

    def close(self) -> None:
        if not self.csv:
            self.fh.write("\n]\n")
        self.fh.close()


def write_report(report: Iterable[TaskRecord], path: str | Path) -> None:
    """Write the report as CSV (``.csv``) or JSON (anything else), one record per input."""
    writer = ReportWriter(path)
    try:
        for rec in report:
            writer.add(rec)
    finally:
        writer.close()


def read_report(path: str | Path) -> list[TaskRecord]:
    """Read a report written by ``write_report`` (JSON or CSV)."""
    path = Path(path)
    names = [f.name for f in fields(TaskRecord)]
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        return [
            TaskRecord(int(r["index"]), r["node"], r["worker"], float(r["start"]),
                       float(r["end"]), int(r["attempts"]), r["outcome"], r.get("error", ""),
                       r.get("output", ""))
            for r in rows
        ]
    with path.open() as fh:
        return [TaskRecord(**{k: d[k] for k in names if k in d}) for d in json.load(fh)]


@dataclass(slots=True)
class NodeFigures:
    """Per-node figures of a report: tasks, failures, task-time statistics, share of the
    total busy time, and retries (extra attempts)."""

    node: str
    tasks: int
    failed: int
    mean_s: float
    p50_s: float
    p95_s: float
    busy_share: float
    retries: int


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def node_figures(report: Iterable[TaskRecord]) -> list[NodeFigures]:
    """``NodeFigures`` per node, most tasks first."""
    by_node: dict[str, list[TaskRecord]] = {}
    for rec in report:
        by_node.setdefault(rec.node, []).append(rec)
    total_busy = sum(r.seconds for recs in by_node.values() for r in recs) or 1.0
    rows = []
    for node, recs in by_node.items():
        times = sorted(r.seconds for r in recs)
        rows.append(NodeFigures(
            node, len(recs), sum(1 for r in recs if r.outcome != OK),
            sum(times) / len(times), _quantile(times, 0.5), _quantile(times, 0.95),
            sum(times) / total_busy, sum(max(0, r.attempts - 1) for r in recs)))
    return sorted(rows, key=lambda r: (-r.tasks, r.node))


def plot_report(report: list[TaskRecord], path: str | Path) -> None:
    """Draw a timeline (a lane per worker, a bar per task coloured by node, failures
    marked) above a per-node bar chart of jobs completed, into an image file. Needs
    matplotlib (the ``plot`` extra); raises ImportError naming it otherwise."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'deathstar[plot]'") from None
    nodes = sorted({r.node for r in report})
    workers = sorted({(r.node, r.worker) for r in report})
    lane = {w: i for i, w in enumerate(workers)}
    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(nodes)}
    t0 = min((r.start for r in report if r.start > 0), default=0.0)
    fig, (timeline, bars) = plt.subplots(2, 1, figsize=(11, 3 + 0.3 * len(workers) + 3),
                                         gridspec_kw={"height_ratios": [3, 1]})
    for r in report:
        y = lane[(r.node, r.worker)]
        timeline.barh(y, max(r.seconds, 1e-4), left=r.start - t0, height=0.8,
                      color=colours[r.node], edgecolor="none")
        if r.outcome != OK:
            timeline.plot(r.end - t0, y, marker="x", color="red", markersize=6)
    timeline.set_yticks(range(len(workers)), [w for _, w in workers], fontsize=7)
    timeline.set_xlabel("seconds since the first task started")
    timeline.set_title("tasks per worker (colour: node; x: failed)")
    summary = node_summary(report)
    bars.bar([s.node for s in summary], [s.jobs_completed for s in summary],
             color=[colours[s.node] for s in summary])
    bars.set_ylabel("jobs completed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
