"""The client's view of a node: how many messages it keeps in flight there (its window),
and the lag that window covers when messages are short."""

from __future__ import annotations

import pytest

from deathstar import config
from deathstar.client.job import Job
from deathstar.client.node import Node
from deathstar.client.supply import Supplier
from deathstar.nodes import parse_node

pytestmark = pytest.mark.timeout(10)


def node(capacity: int, lag_s: float | None = None) -> Node:
    n = Node(parse_node("n1"), capacity=capacity)
    n.lag_s = lag_s
    return n


def test_long_messages_keep_one_per_worker_and_a_few_queued() -> None:
    # however large the lag: a long message must not wait behind others at a node
    assert node(4, lag_s=5.0).window(False, 1e-6) == 4 + config.PREFETCH_PER_NODE


def test_short_messages_queue_enough_to_cover_the_lag() -> None:
    # 2 workers, 1 ms of lag, messages of 0.1 ms: 20 finish while one result travels
    assert node(2, lag_s=1e-3).window(True, 1e-4) == 2 * 2 + 20
    # no lag known yet, or none worth covering: the fixed queue
    assert node(2).window(True, 1e-4) == 2 * 2 + config.PREFETCH_SHORT
    assert node(2, lag_s=1e-6).window(True, 1e-4) == 2 * 2 + config.PREFETCH_SHORT
    # messages as long as the lag: nothing more than the fixed queue
    assert node(2, lag_s=1e-3).window(True, 1e-3) == 2 * 2 + config.PREFETCH_SHORT


def test_the_queue_that_covers_the_lag_is_bounded_per_worker() -> None:
    deepest = 2 * 3 + 3 * config.PREFETCH_DEPTH_MAX
    assert node(3, lag_s=1.0).window(True, 1e-6) == deepest
    assert node(3, lag_s=1.0).window(True, 0.0) == deepest  # a message of no time at all
    # a node of many workers: no more queued than half of what its daemon takes from us
    many = node(1000, lag_s=1.0)
    assert many.window(True, 1e-6) == 2 * 1000 + config.CLIENT_QUEUE_MESSAGES // 2


def test_the_lag_follows_a_shorter_sample_at_once_and_a_longer_one_slowly() -> None:
    n = node(2)
    n.learn_lag(0.250)  # the first message waited for its worker to start
    assert n.lag_s == 0.250
    n.learn_lag(0.001)
    assert n.lag_s == 0.001
    n.learn_lag(0.005)  # one slow moment moves it a quarter of the way
    assert n.lag_s == pytest.approx(0.002)
    n.learn_lag(-0.001)  # the clocks of a run and of the client disagree by a hair
    assert n.lag_s == 0.0


def test_large_messages_do_not_queue_to_cover_the_lag() -> None:
    """A message of 1 MiB of inputs or more holds that memory while it waits, and its own
    transfer is most of its time in flight (16 MB arrays through a TCP node's shared
    memory measured 150-200 ms of "lag"): the fixed queue, whatever the lag."""
    lagging = node(2, lag_s=0.2)
    supplier = Supplier()
    small = Job(1, "h1", [b""], iter(()), 1000, None, 3, per_item_s=1e-4,
                bytes_per_item=100.0)
    supplier.jobs = {1: small}
    short, message_s = supplier.message_shape()
    assert short and message_s is not None
    assert lagging.window(short, message_s) > 2 * 2 + config.PREFETCH_SHORT
    large = Job(2, "h2", [b""], iter(()), 32, None, 3, per_item_s=1e-3,
                bytes_per_item=16e6)
    supplier.jobs = {1: small, 2: large}
    short, message_s = supplier.message_shape()
    assert short and message_s is None
    assert lagging.window(short, message_s) == 2 * 2 + config.PREFETCH_SHORT
