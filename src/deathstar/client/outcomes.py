"""What a job delivers to its consumer, and how consumers put it back in input order:
an ``Outcome`` per input, or a ``Batch`` (the outcomes of one message whose inputs all
succeeded, as columns)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

from deathstar.protocol import Spread
from deathstar.report import OK, TaskRecord

#: One delivered input: (index, succeeded, value or exception, record).
Outcome = tuple[int, bool, Any, TaskRecord]


def ordered(outcomes: Iterable[Outcome], order: Sequence[int] | None = None
            ) -> Iterator[Outcome]:
    """Put a completion-order stream of outcomes back into input order, holding an outcome
    only until its predecessors have arrived. The indices are 0, 1, 2, ... or, when given,
    ``order`` (which may grow while this runs, as inputs are read)."""
    pending: dict[int, Outcome] = {}
    position = 0
    for outcome in outcomes:
        pending[outcome[0]] = outcome
        del outcome  # once yielded, an outcome is the consumer's alone
        while True:
            expected = position if order is None else (
                order[position] if position < len(order) else None)
            if expected is None or expected not in pending:
                break
            yield pending.pop(expected)
            position += 1


def in_order(deliveries: Iterable[list[Outcome] | Batch]) -> Iterator[list[Outcome] | Batch]:
    """Put what a job over inputs 0, 1, 2, ... delivers (completion order) back in input
    order, piece by piece: a ``Batch`` of consecutive inputs goes whole, a list of
    outcomes one outcome at a time; each is held only until its predecessors are in.
    Raises RuntimeError if the deliveries end with a gap (an input never delivered)."""
    pending: dict[int, list[Outcome] | Batch] = {}
    position = 0
    for delivered in deliveries:
        if isinstance(delivered, Batch) and consecutive(delivered.indices):
            pending[delivered.indices[0]] = delivered
        else:
            for outcome in as_outcomes(delivered):
                pending[outcome[0]] = [outcome]
        while position in pending:
            piece = pending.pop(position)
            position += len(piece)
            yield piece
    if pending:
        raise RuntimeError(f"inputs from {position} on were never delivered")


def consecutive(indices: range | list[int]) -> bool:
    """Whether a message's indices (which increase: inputs are numbered in order) have
    no gap."""
    if isinstance(indices, range):
        return indices.step == 1 and len(indices) > 0
    return len(indices) > 0 and indices[-1] - indices[0] == len(indices) - 1


def drain(batch: list[Outcome]) -> Iterator[Outcome]:
    """Yield a batch's outcomes in order, dropping each from the batch as it goes, so that
    nothing yielded stays referenced here."""
    batch.reverse()
    while batch:
        yield batch.pop()


def as_outcomes(delivered: list[Outcome] | Batch) -> list[Outcome]:
    """What a job delivered, as a list of outcomes."""
    return delivered.outcomes() if isinstance(delivered, Batch) else delivered


@dataclass(eq=False, slots=True)
class Batch:
    """The outcomes of one message whose inputs all succeeded, as columns: what a job
    delivers to a consumer that asked for them (``Job.columnar``) instead of an
    ``Outcome`` per input. ``records`` makes the per-input records when asked."""

    indices: range | list[int]
    values: list[Any]
    node: str
    worker: str
    starts: Sequence[float]
    ends: Sequence[float]
    attempts: int

    def __len__(self) -> int:
        return len(self.values)

    def busy_s(self) -> float:
        """Seconds its inputs ran, in all."""
        if isinstance(self.starts, Spread):  # they shared the message's time
            return max(0.0, self.ends[-1] - self.starts[0])
        return max(0.0, sum(self.ends) - sum(self.starts))

    def records(self) -> list[TaskRecord]:
        node, worker, attempts = self.node, self.worker, self.attempts
        return [TaskRecord(i, node, worker, start, end, attempts, OK)
                for i, start, end in zip(self.indices, self.starts, self.ends)]

    def outcomes(self) -> list[Outcome]:
        return [(record.index, True, value, record)
                for record, value in zip(self.records(), self.values)]
