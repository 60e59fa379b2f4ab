"""A map's results as ``Cluster.map`` gathers them: ``MapResult`` (the values in input
order, the report, the errors) and ``Collector``, which fills one from what a job
delivers. A message whose inputs all ran arrives as a ``Batch``, placed with one slice
assignment; its records are made only when ``report`` is first read."""

from __future__ import annotations

from typing import Any, Iterable

from deathstar.client.outcomes import Batch, Outcome
from deathstar.report import TaskRecord


class MapResult(list[Any]):
    """The results of a map, in input order (a list), with the execution ``report`` (one
    ``TaskRecord`` per input, in input order, made on first access) and the ``errors``
    (failed inputs' exceptions, in input order)."""

    errors: list[BaseException]

    def __init__(self, values: Iterable[Any], report: list[TaskRecord] | Collector,
                 errors: list[BaseException]):
        super().__init__(values)
        self._report = report
        self.errors = errors

    @property
    def report(self) -> list[TaskRecord]:
        if isinstance(self._report, Collector):
            self._report = self._report.records()
        return self._report

    def __getstate__(self) -> dict[str, Any]:
        return {"_report": self.report, "errors": self.errors}


class Collector:
    """Gathers a map's outcomes (lists of ``Outcome``, or ``Batch``es) by input index;
    ``result`` makes the ``MapResult``."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.records_at: list[TaskRecord | None] = []  # per index, when not in a batch
        self.batches: list[Batch] = []
        self.failed: list[int] = []
        self.size = 0  # inputs, once the result is made

    def add(self, delivered: list[Outcome] | Batch) -> None:
        if isinstance(delivered, Batch):
            self.add_batch(delivered)
            return
        for index, ok, value, record in delivered:
            self.grow(index + 1)
            if index >= len(self.records_at):
                self.records_at.extend([None] * (len(self.values) - len(self.records_at)))
            self.values[index] = value
            self.records_at[index] = record
            if not ok:
                self.failed.append(index)

    def add_batch(self, batch: Batch) -> None:
        indices = batch.indices
        if isinstance(indices, range) and indices.step == 1:
            self.grow(indices.stop)
            self.values[indices.start:indices.stop] = batch.values
        else:
            self.grow(max(indices) + 1)
            for index, value in zip(indices, batch.values):
                self.values[index] = value
        self.batches.append(batch)

    def grow(self, size: int) -> None:
        if size > len(self.values):
            self.values.extend([None] * (size - len(self.values)))

    def records(self) -> list[TaskRecord]:
        """One record per input that has one, in input order."""
        at = self.records_at + [None] * (self.size - len(self.records_at))
        for batch in self.batches:
            for record in batch.records():
                at[record.index] = record
        return [r for r in at if r is not None]

    def result(self) -> MapResult:
        errors = [self.values[i] for i in sorted(self.failed)]
        result = MapResult(self.values, self, errors)
        self.size, self.values = len(self.values), []  # the result holds them now
        return result
