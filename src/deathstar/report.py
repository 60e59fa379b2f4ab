"""The execution report: one record per input, and the per-node summary built from it."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

#: Outcomes a record can have.
OK = "ok"
ERROR = "error"  # the user's function raised
CRASHED = "crashed"  # the worker died on every attempt
FAILED_OUTCOMES = (ERROR, CRASHED)


@dataclass(slots=True)
class TaskRecord:
    """How one input ran: where, when (worker wall clock, seconds since the epoch), how
    many attempts it took, and how it ended."""

    index: int
    node: str
    worker: str
    start: float
    end: float
    attempts: int
    outcome: str
    error: str = ""

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


def node_summary(report: Iterable[TaskRecord]) -> list[NodeSummary]:
    """Per node: jobs completed, jobs failed, seconds spent in the user's function, and
    distinct workers used; sorted by jobs completed, most first."""
    rows: dict[str, NodeSummary] = {}
    workers: dict[str, set[str]] = {}
    for rec in report:
        row = rows.setdefault(rec.node, NodeSummary(rec.node, 0, 0, 0.0, 0))
        if rec.outcome == OK:
            row.jobs_completed += 1
        else:
            row.failed += 1
        row.busy_s += rec.seconds
        if rec.worker:
            workers.setdefault(rec.node, set()).add(rec.worker)
    for node, row in rows.items():
        row.workers = len(workers.get(node, ()))
    return sorted(rows.values(), key=lambda r: (-r.jobs_completed, r.node))


def write_report(report: Sequence[TaskRecord], path: str | Path) -> None:
    """Write the report as CSV (``.csv``) or JSON (anything else), one record per input."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow([f.name for f in fields(TaskRecord)])
            for rec in report:
                writer.writerow([getattr(rec, f.name) for f in fields(TaskRecord)])
    else:
        with path.open("w") as fh:
            json.dump([asdict(rec) for rec in report], fh, indent=1)
            fh.write("\n")


def read_report(path: str | Path) -> list[TaskRecord]:
    """Read a report written by ``write_report`` (JSON or CSV)."""
    path = Path(path)
    names = [f.name for f in fields(TaskRecord)]
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        return [
            TaskRecord(int(r["index"]), r["node"], r["worker"], float(r["start"]),
                       float(r["end"]), int(r["attempts"]), r["outcome"], r.get("error", ""))
            for r in rows
        ]
    with path.open() as fh:
        return [TaskRecord(**{k: d[k] for k in names if k in d}) for d in json.load(fh)]
