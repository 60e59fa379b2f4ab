"""The per-input fast path of a map over a list, tuple or range: the sequence is sliced
into messages, a message whose inputs all ran comes back as one batch placed with a slice
assignment, and its records are made only when the report is read. Each input's result
still appears exactly once, in order, with its record; failures inside a batch keep
their neighbours' results; a function run before starts with full batches."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from deathstar import Cluster, config, serialize
from deathstar.client.executor import Executor
from deathstar.client.job import FINISHED, Job
from tests import jobs

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    with Cluster(workers=2) as c:
        yield c


@pytest.mark.parametrize("kind", [list, tuple, range])
def test_a_sequence_comes_back_whole_in_order_with_one_record_per_input(
        cluster: Cluster, kind: type) -> None:
    n = 7001
    items = range(n) if kind is range else kind(range(n))
    res = cluster.map(jobs.square, items)
    assert list(res) == [x * x for x in range(n)]
    report = res.report
    assert [r.index for r in report] == list(range(n))
    assert all(r.outcome == "ok" and r.node and r.worker and r.end >= r.start
               for r in report)
    again = pickle.loads(pickle.dumps(res))
    assert list(again) == list(res) and again.report == report and again.errors == []


def test_a_failure_inside_a_batch_keeps_every_other_result(cluster: Cluster) -> None:
    res = cluster.map(jobs.fail_on_multiples_of, list(range(1, 3001)), k=7,
                      on_error="return")
    bad = [i for i in range(3000) if (i + 1) % 7 == 0]
    assert [i for i, v in enumerate(res) if isinstance(v, ValueError)] == bad
    assert all(res[i] == i + 1 for i in range(3000) if i not in set(bad))
    assert [e.index for e in res.errors] == bad  # type: ignore[attr-defined]
    outcomes = {r.index: r.outcome for r in res.report}
    assert sorted(outcomes) == list(range(3000))
    assert {i for i, o in outcomes.items() if o == "error"} == set(bad)


def test_a_known_function_starts_with_full_batches_and_the_end_is_not_shredded(
        cluster: Cluster) -> None:
    """The first map of a tiny function probes one input per message; the next one
    already knows its time per input, and no message near the end is made smaller than
    a few milliseconds of work (before: 37 messages for 20,000 inputs, mostly of 1)."""
    items = list(range(20_000))
    cluster.map(jobs.square, items)
    sent = cluster.engine.next_send_id
    assert cluster.map(jobs.square, items) == [x * x for x in items]
    messages = cluster.engine.next_send_id - sent
    assert messages <= 16, messages


def test_the_end_of_a_map_keeps_messages_worth_sending() -> None:
    """``batch_size`` near the end: not below BATCH_MIN_S of work per message, and all
    that is left when that is less."""
    job = Job(1, "h", [], iter(()), 1000, None, 3)
    assert job.batch_size(2) == 1  # nothing measured yet: probe with one input
    job.per_item_s = 1e-6
    job.read = 990
    assert job.batch_size(2) == 10  # 10 left of 1 us each: one message, not 4
    job.per_item_s = 0.5
    assert job.batch_size(2) == 1  # long inputs still spread one by one


def test_a_map_is_cut_into_whole_rounds_of_equal_messages() -> None:
    """``batch_size``: one message per worker a round, all of a size, so that no message
    is left over for one worker while the other idles; a map of little work is one
    round (before: 20,000 tiny inputs went as 4 x 4,096 + 3,616, three to one worker)."""
    job = Job(1, "h", [], iter(()), 20_000, None, 3)
    job.per_item_s = 1e-7
    assert job.batch_size(2) == 10_000
    job.total = 200_000
    assert job.batch_size(2) == 14_286  # 7 rounds: at most BATCH_MAX_ITEMS_KNOWN each
    job.total = None  # what is read ahead is held: no more than BATCH_MAX_ITEMS
    assert job.batch_size(2) == 4096
    job.total = 0  # nothing to send (a resumed map that has every result)
    assert job.batch_size(2) >= 1
    job.per_item_s = 1e-4  # 500 fill BATCH_TARGET_S
    job.total = 2_100
    assert job.batch_size(2) == 350  # 3 rounds of 350, not 4 x 500 and 100


def test_large_inputs_go_one_per_message_and_the_daemon_runs_between_them(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches are sized by run time and by bytes (BATCH_MAX_BYTES): 3 MB inputs of a
    function known to be quick go one per message, not all in one; and after each large
    message the embedded daemon takes its turn (hands out work, reads results) before the
    engine writes the next."""
    arrays = [np.full(400_000, float(i)) for i in range(8)]  # 3.2 MB each
    cluster.map(jobs.square, list(range(2000)))  # not this function: no estimate yet
    cluster.map(np.sum, arrays)
    (daemon,) = cluster.engine.hosts.values()
    events: list[str] = []
    read_batch, step = Job.read_batch, daemon.step

    def reading(job: Job, capacity: int) -> object:
        task = read_batch(job, capacity)
        if task is not None:
            events.append(f"read {len(task.indices)}")
        return task

    def stepping(*args: object) -> bool:
        events.append("daemon")
        return step(*args)

    monkeypatch.setattr(Job, "read_batch", reading)
    monkeypatch.setattr(daemon, "step", stepping)
    assert cluster.map(np.sum, arrays) == [a.sum() for a in arrays]
    reads = [e for e in events if e.startswith("read")]
    assert reads == ["read 1"] * 8, events
    later_reads = [i for i, e in enumerate(events) if e.startswith("read")][1:]
    assert all(events[i - 1] == "daemon" for i in later_reads), events


def test_inputs_known_to_be_tiny_run_in_one_loop_and_still_fail_one_by_one(
        cluster: Cluster) -> None:
    """The second map of a function of some microseconds runs each message's inputs in
    one C-level loop: an input that raises stops it there, gets its own error, and the
    loop goes on with the next; their records share the message's time evenly."""
    items = list(range(1, 8001))
    # the first map teaches the client the function's time per input: in messages of
    # 1,000, so that one input preempted for milliseconds (a busy CI machine) cannot make
    # the estimate its next map starts from look slow (one-input messages did, once)
    cluster.map(jobs.busy_fail_on, items, k=1000, on_error="return", chunksize=1000)
    res = cluster.map(jobs.busy_fail_on, items, k=1000, on_error="return")
    bad = {i for i in range(8000) if (i + 1) % 1000 == 0}
    assert {i for i, v in enumerate(res) if isinstance(v, ValueError)} == bad
    assert all(res[i] == i + 1 for i in range(8000) if i not in bad)
    report = res.report
    assert [r.index for r in report] == list(range(8000))
    assert {r.index for r in report if r.outcome == "error"} == bad
    # ~10 us each, all in the map's first message: timed one by one their durations would
    # spread over microseconds; shared evenly they differ only by the clock's rounding
    # (a quarter of a microsecond at today's epoch)
    durations = [r.end - r.start for r in report[:1000]]
    assert max(durations) - min(durations) < 1e-6, "timed one by one"


def test_a_daemon_in_this_process_gives_out_the_first_messages_before_more_are_pickled(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded daemon shares the client's loop: each of the first messages (one per
    worker) reaches a worker before the next is read and pickled, so the workers start
    while the rest of the window is still being made (16 MB arrays: ~6 ms each)."""
    (daemon,) = cluster.engine.hosts.values()
    events: list[str] = []
    read_batch, assign = Job.read_batch, daemon.pool.assign

    def reading(job: Job, capacity: int) -> object:
        task = read_batch(job, capacity)
        if task is not None:
            events.append("read")
        return task

    def assigning(*args: object) -> None:
        events.append("assign")
        assign(*args)

    monkeypatch.setattr(Job, "read_batch", reading)
    monkeypatch.setattr(daemon.pool, "assign", assigning)
    assert cluster.map(jobs.square, range(12), chunksize=1) == [x * x for x in range(12)]
    assert events[:4] == ["read", "assign", "read", "assign"], events
    assert events.count("read") == events.count("assign") == 12


def test_a_function_mapped_before_is_not_pickled_again(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last map's function blob is kept (as the Executor keeps its calls'): a map of
    the same function without common arguments pickles nothing before its inputs; common
    arguments, or another function, are pickled as before."""
    pickled: list[object] = []
    pickle_function = serialize.pickle_function

    def counting(fn: object, *args: object) -> object:
        pickled.append(fn)
        return pickle_function(fn, *args)

    monkeypatch.setattr(serialize, "pickle_function", counting)
    assert cluster.map(jobs.square, range(5)) == [0, 1, 4, 9, 16]
    assert cluster.map(jobs.square, range(3)) == [0, 1, 4]
    assert cluster.map(jobs.add, range(3), y=1) == [1, 2, 3]
    assert cluster.map(jobs.add, range(3)) == [0, 1, 2]
    assert pickled.count(jobs.square) <= 1 and pickled.count(jobs.add) == 2


def test_outcomes_wait_at_most_the_hold_and_all_go_before_the_end() -> None:
    """A map's outcomes wait in the I/O thread up to ``hold_s`` to wake its consumer once
    for several messages: none is handed over before the first has waited that long,
    then all of them in the order they came; the end of the job hands over what waits
    first. A consumer that resolves in the I/O thread (``hold_s`` 0) gets each at once."""
    job = Job(1, "h", [], iter(()), 3, None, 3)
    job.hold_s = 0.5
    job.deliver([(0, True, "a", None)])
    job.deliver([(1, True, "b", None)])
    assert job.out.empty() and job.delivered == 2
    job.hand_held(job.held_since + 0.4)
    assert job.out.empty()
    job.hand_held(job.held_since + 0.5)
    assert job.take(timeout=0) == [(0, True, "a", None)]
    assert job.take(timeout=0) == [(1, True, "b", None)]
    job.deliver([(2, True, "c", None)])
    job.end(FINISHED)
    assert job.take(timeout=0) == [(2, True, "c", None)]
    assert job.take(timeout=0) is None and job.consumed == 3

    at_once = Job(2, "h", [], iter(()), 1, None, 3)
    at_once.deliver([(0, True, "a", None)])
    assert at_once.take(timeout=0) == [(0, True, "a", None)]


def test_a_large_delivery_goes_at_once_after_what_was_held() -> None:
    """The outcomes of a message of ``DELIVERY_AT_ONCE`` inputs or more wake the consumer
    at once (worth a wake of their own; it places them while the map runs on), after
    any held before them; smaller ones wait for the hold again."""
    job = Job(1, "h", [], iter(()), None, None, 3)
    job.hold_s = 60.0
    job.deliver([(0, True, "a", None)])
    assert job.out.empty()
    big = [(1 + i, True, i, None) for i in range(config.DELIVERY_AT_ONCE)]
    job.deliver(big)
    assert job.take(timeout=0) == [(0, True, "a", None)]  # in the order they came
    assert job.take(timeout=0) == big
    job.deliver(big[:-1])  # one short of the size: held
    assert job.out.empty() and job.delivered == 2 * len(big)


def test_a_result_reaches_the_consumer_while_the_map_still_runs(
        cluster: Cluster, tmp_path: Path) -> None:
    """Outcomes held for the consumer go within the hold, not at the end of the map: the
    first result comes while the second input is still running."""
    gate = jobs.Gate(tmp_path / "gate")
    with Executor(cluster) as ex:
        results = ex.map(jobs.gated, ["first", "second"], ["", gate.name], timeout=20)
        assert next(results) == "first"
        assert gate.started() == 1  # the second is still at its gate
        gate.open()
        assert next(results) == "second"
