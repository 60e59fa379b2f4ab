"""Fixtures for tests across several hosts (network namespaces), skipped with the reason
when namespaces cannot be made here."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.conftest import Daemon, start_daemon
from tests.netns.hosts import Host, netns_available, virtual_hosts

REASON = netns_available()
PORT = 6000


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Host]]:
    if REASON:
        pytest.skip(REASON)
    with virtual_hosts(3) as made:
        yield made


def start_on(host: Host, workers: int = 1, *extra: str) -> Daemon:
    """A daemon inside ``host``, listening on its address (exec 6000)."""
    return start_daemon(workers, "--insecure", *extra, host=host.address, port=PORT,
                        wrap=host.argv([]))


@pytest.fixture(scope="module")
def cluster(hosts: list[Host]) -> Iterator[list[Daemon]]:
    """A one-worker daemon on each of the three hosts."""
    started = [start_on(h) for h in hosts]
    try:
        yield started
    finally:
        for d in started:
            d.stop()
