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
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A one-host network and a two-worker daemon on it, started in an empty folder (so
    that nothing of this checkout is importable on it but what a client ships)."""
    if REASON:
        pytest.skip(REASON)
    elsewhere = tmp_path_factory.mktemp("node-cwd")
    with virtual_hosts(1) as made:
        daemon = start_daemon(2, "--insecure", host=made[0].address, port=PORT,
                              wrap=made[0].argv(["env", f"--chdir={elsewhere}"]))
        try:
            yield daemon
        finally:
            daemon.stop()


@pytest.fixture(scope="module")
def cluster(hosts: list[Host]) -> Iterator[list[Daemon]]:
    """A one-worker daemon on each of the three hosts."""
    started = [start_on(h) for h in hosts]
    try:
        yield started
    finally:
        for d in started:
            d.stop()


@pytest.fixture(scope="session")
def bundle_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A cache folder holding this deathstar's node bundle for this machine, built once
    per session (``DEATHSTAR_CACHE_DIR`` for the provider tests and their subprocesses)."""
    from deathstar.deploy.bundle import build_bundle

    folder = str(tmp_path_factory.mktemp("bundle-cache"))
    build_bundle(cache_dir=folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEATHSTAR_CACHE_DIR", folder)
        yield folder
