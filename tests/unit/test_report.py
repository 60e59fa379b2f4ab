from __future__ import annotations

from pathlib import Path

import pytest

from deathstar.report import TaskRecord, node_summary, read_report, write_report


def _report() -> list[TaskRecord]:
    return [
        TaskRecord(0, "a", "h:1", 10.0, 11.0, 1, "ok"),
        TaskRecord(1, "a", "h:2", 10.0, 10.5, 1, "ok"),
        TaskRecord(2, "b", "g:1", 10.0, 12.0, 2, "error", "ValueError: x"),
        TaskRecord(3, "b", "g:1", 12.0, 12.25, 1, "ok"),
        TaskRecord(4, "a", "h:1", 11.0, 11.0, 3, "crashed", "signal 9"),
    ]


def test_node_summary_counts_jobs_failures_busy_time_and_workers() -> None:
    rows = {r.node: r for r in node_summary(_report())}
    assert (rows["a"].jobs_completed, rows["a"].failed, rows["a"].workers) == (2, 1, 2)
    assert rows["a"].busy_s == pytest.approx(1.5)
    assert (rows["b"].jobs_completed, rows["b"].failed, rows["b"].workers) == (1, 1, 1)
    assert rows["b"].busy_s == pytest.approx(2.25)
    assert [r.node for r in node_summary(_report())] == ["a", "b"]


@pytest.mark.parametrize("name", ["report.json", "report.csv"])
def test_report_round_trips(tmp_path: Path, name: str) -> None:
    write_report(_report(), tmp_path / name)
    assert read_report(tmp_path / name) == _report()
