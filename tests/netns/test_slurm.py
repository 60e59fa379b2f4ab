"""``deathstar slurm up/list/down`` on a real SLURM cluster (slurmctld, a slurmd per
namespace host, munge), and a map mixing a plain node, an ``ssh:`` and a ``slurm:`` cluster."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import default_sigint, start_daemon, wait_for
from tests.netns.conftest import REASON
from tests.netns.hosts import Host, virtual_hosts
from tests.netns.slurm import Slurm, slurm_cluster, slurm_missing
from tests.netns.sshd import Lab, daemons_on, deathstar, sshd_lab, sshd_missing

pytestmark = pytest.mark.timeout(180)


class Site:
    """The SLURM cluster (4 nodes declared, slurmd on 3), one sshd host, one plain host."""

    def __init__(self, slurm: Slurm, lab: Lab, plain: Host, folder: Path):
        self.slurm, self.lab, self.plain, self.folder = slurm, lab, plain, folder

    @property
    def clusters(self) -> Path:
        return Path(os.environ["XDG_CONFIG_HOME"]) / "deathstar" / "clusters"


@pytest.fixture(scope="module")
def site(bundle_cache: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if REASON:
        pytest.skip(REASON)
    if slurm_missing():
        pytest.skip(slurm_missing() or "")
    folder = tmp_path_factory.mktemp("slurm-site")
    (folder / "slurm").mkdir()
    with virtual_hosts(6) as hosts, pytest.MonkeyPatch.context() as mp:
        root = hosts[0].address.rsplit(".", 1)[0] + ".1"
        with slurm_cluster(hosts[:4], folder / "slurm", root, daemons=3) as slurm:
            mp.setenv("SLURM_CONF", str(slurm.conf))
            mp.setenv("XDG_CONFIG_HOME", str(folder / "config"))
            mp.setenv("DEATHSTAR_KEYS", str(folder / "keys"))
            assert deathstar("keygen", str(folder / "keys")).returncode == 0
            lab = None
            if not sshd_missing():
                (folder / "ssh").mkdir()
                lab = sshd_lab([hosts[4]], folder / "ssh")
                mp.setenv("DEATHSTAR_SSH_ARGS", lab.ssh_args)
            yield Site(slurm, lab, hosts[5], folder)  # type: ignore[arg-type]
            wait_for(lambda: not slurm.queue(), 20, "an empty queue")


def test_up_map_list_down_on_three_nodes(site: Site) -> None:
    started = time.monotonic()
    up = deathstar("slurm", "up", "--nodes", "3", "--name", "hpc", "--workers-per-node", "2",
                   "--wait-timeout", "60s")
    assert up.returncode == 0, up.stderr
    running = site.slurm.running
    assert sorted(ln.rsplit(":", 1)[0] for ln in up.stdout.split()) == \
        sorted(h.hostname for h in running)

    import deathstar as ds
    from tests import jobs

    with ds.Cluster("slurm:hpc") as cluster:
        first = next(iter(cluster.imap_unordered(jobs.square, [9])))
        to_first_result = time.monotonic() - started
        result = cluster.map(jobs.sleep_square, range(60), seconds=0.05)
    assert first == 81
    assert list(result) == [x * x for x in range(60)]
    assert {r.node for r in result.report} == {h.hostname for h in running}
    print(f"\nslurm up --nodes 3 to first result: {to_first_result:.1f} s")
    # every daemon runs on its own node, inside the job's step
    for host in running:
        assert any("deathstar daemon" in c for c in daemons_on(host)), host.name

    listed = deathstar("slurm", "list", "--json")
    rows = json.loads(listed.stdout)
    assert [r["state"] for r in rows] == ["RUNNING"] * 3, rows
    assert all(r["daemon"] == "up" and r["workers"] == 2 for r in rows), rows
    job = rows[0]["job"]
    assert site.slurm.queue() == [job]

    down = deathstar("slurm", "down", "--name", "hpc")
    assert down.returncode == 0 and f"cancelled job {job}" in down.stderr, down.stderr
    wait_for(lambda: not site.slurm.queue(), 20, "the job to leave squeue")
    for host in running:
        wait_for(lambda: not daemons_on(host), 20, f"no deathstar process on {host.name}")
    assert not (site.clusters / "hpc").exists()
    again = deathstar("slurm", "down", "--name", "hpc")
    assert again.returncode == 0 and "no slurm cluster named hpc" in again.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_pending_job_is_reported_and_ctrl_c_cancels_it(site: Site, sig: int) -> None:
    # four nodes are declared, three run a slurmd: a four-node job cannot start; SIGTERM
    # (kill, timeout) cancels it as Ctrl-C does
    proc = subprocess.Popen([sys.executable, "-m", "deathstar", "slurm", "up", "--nodes", "4",
                             "--name", "big"], stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            preexec_fn=default_sigint)
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while not any("job PENDING (" in ln for ln in seen):
            left = deadline - time.monotonic()
            assert left > 0 and select.select([proc.stderr], [], [], left)[0], seen
            line = proc.stderr.readline()
            assert line, f"slurm up ended: {seen}"
            seen.append(line)
        assert any("job PENDING (" in ln and "0/4 node(s) up" in ln for ln in seen), seen
        assert len(site.slurm.queue()) == 1
        proc.send_signal(sig)
        rest = proc.stderr.read()
        assert proc.wait(30) == 130, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "cancelled the job" in rest and "Traceback" not in rest, rest
    wait_for(lambda: not site.slurm.queue(), 20, "the cancelled job to leave squeue")
    assert not (site.clusters / "big").exists()


def test_mixed_map_over_a_plain_node_an_ssh_and_a_slurm_cluster(site: Site) -> None:
    if site.lab is None:
        pytest.skip(sshd_missing() or "")
    keys = os.environ["DEATHSTAR_KEYS"]
    plain = start_daemon(1, host=site.plain.address, port=6000, keys=keys,
                         wrap=site.plain.argv([]))
    try:
        assert deathstar("ssh", "up", site.lab.hosts[0].address, "--name", "mix",
                         "--workers", "1").returncode == 0
        taken = deathstar("slurm", "up", "--nodes", "2", "--name", "mix")
        assert taken.returncode == 2 and "taken by the ssh cluster ssh:mix" in taken.stderr
        assert deathstar("slurm", "up", "--nodes", "2", "--name", "mix2",
                         "--workers-per-node", "1", "--wait-timeout", "60s").returncode == 0
        import deathstar as ds
        from tests import jobs

        slurm_nodes = {r["node"] for r in json.loads(deathstar("slurm", "list",
                                                               "--json").stdout)}
        assert len(slurm_nodes) == 2, slurm_nodes
        spec = f"{site.plain.address}:6000,ssh:mix,slurm:mix2"
        result = ds.map(jobs.sleep_square, range(80), cluster=spec, seconds=0.05)
        assert list(result) == [x * x for x in range(80)]
        # every node of the three providers got work
        assert {r.node for r in result.report} == \
            {f"{site.plain.address}:6000", site.lab.hosts[0].address} | slurm_nodes
    finally:
        deathstar("ssh", "down", "--name", "mix")
        deathstar("slurm", "down", "--name", "mix2")
        plain.stop()


def test_nodes_can_run_the_bundle_instead_of_the_clients_environment(site: Site) -> None:
    up = deathstar("slurm", "up", "--nodes", "1", "--name", "bundled", "--bundle",
                   "--workers-per-node", "1", "--wait-timeout", "90s")
    try:
        assert up.returncode == 0, up.stderr
        env = site.clusters / "bundled" / "env" / "venv" / "bin" / "python"
        commands = [c for h in site.slurm.running for c in daemons_on(h)
                    if "deathstar daemon" in c]
        assert len(commands) == 1 and commands[0].startswith(f"{env} "), commands
        import deathstar as ds
        from tests import jobs

        assert list(ds.map(jobs.square, range(5), cluster="slurm:bundled")) == \
            [0, 1, 4, 9, 16]
    finally:
        assert deathstar("slurm", "down", "--name", "bundled").returncode == 0
    wait_for(lambda: not site.slurm.queue(), 20, "the job to leave squeue")


def test_slurm_up_without_sbatch_is_one_clear_line(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"))
    proc = subprocess.run([sys.executable, "-m", "deathstar", "slurm", "up", "--nodes", "2"],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                          timeout=60)
    assert proc.returncode == 4
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no 'sbatch' here" in lines[0], proc.stderr
