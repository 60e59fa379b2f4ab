"""``deathstar ssh up/list/down`` against real sshd servers on namespace hosts that share one
home folder; the client (the real CLI, and the library) in the root namespace."""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import wait_for
from tests.netns.conftest import REASON
from tests.netns.hosts import virtual_hosts
from tests.netns.sshd import Lab, daemons_on, deathstar, sshd_lab, sshd_missing

pytestmark = pytest.mark.timeout(180)

MINOR = f"{sys.version_info.major}.{sys.version_info.minor}"


def _path_without_python(folder: Path) -> str:
    """A PATH with everything of /usr/bin but this Python minor (and python3 another
    CPython minor when this machine has one): a host whose Python is not the client's."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    for entry in os.scandir("/usr/bin"):
        if not entry.name.startswith("python"):
            os.symlink(entry.path, bin_dir / entry.name)
    others = [p for p in glob.glob("/root/.pyenv/versions/3.*/bin/python3.*[0-9]")
              if not p.endswith(f"python{MINOR}") and "/3.1" in p]
    if others:
        os.symlink(sorted(others)[-1], bin_dir / "python3")
    return str(bin_dir)


@pytest.fixture(scope="module")
def lab(bundle_cache: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Five sshd hosts: three good ones, one that refuses our key, one without this
    Python; the client's config, keys and cluster state in a temporary folder."""
    if REASON:
        pytest.skip(REASON)
    if sshd_missing():
        pytest.skip(sshd_missing() or "")
    folder = tmp_path_factory.mktemp("ssh-lab")
    with virtual_hosts(5) as hosts, pytest.MonkeyPatch.context() as mp:
        made = sshd_lab(hosts, folder, refuse=(hosts[3],),
                        other_path={hosts[4].name: _path_without_python(folder)})
        mp.setenv("DEATHSTAR_SSH_ARGS", made.ssh_args)
        mp.setenv("XDG_CONFIG_HOME", str(folder / "config"))
        mp.setenv("DEATHSTAR_KEYS", str(folder / "keys"))
        assert deathstar("keygen", str(folder / "keys")).returncode == 0
        yield made


def test_up_map_list_down_on_three_hosts_sharing_a_home(lab: Lab) -> None:
    good = lab.hosts[:3]
    started = time.monotonic()
    up = deathstar("ssh", "up", *(h.address for h in good), "--name", "lab",
                   "--workers", "2")
    assert up.returncode == 0, up.stderr
    assert sorted(up.stdout.split()) == sorted(f"{h.address}:6000" for h in good)
    # the three installed at once into one shared home: one install, no half-made one
    share = lab.home / ".local/share/deathstar"
    assert all(f"{h.address}: installing bundle" in up.stderr for h in good), up.stderr
    installs = sorted(p.name for p in share.iterdir())
    assert len(installs) == 1 and not installs[0].startswith("."), installs
    # per-host files do not collide in the shared home
    state = lab.home / ".local/state/deathstar/ssh/lab"
    assert sorted(p.name for p in state.iterdir()) == sorted(h.address for h in good)
    for host in good:  # each pid file names the daemon on its own host
        assert host.owns(int((state / host.address / "daemon.pid").read_text()))

    import deathstar as ds
    from tests import jobs

    with ds.Cluster("ssh:lab") as cluster:
        first = next(iter(cluster.imap_unordered(jobs.square, [7])))
        to_first_result = time.monotonic() - started
        result = cluster.map(jobs.sleep_square, range(60), seconds=0.05)
    assert first == 49
    assert list(result) == [x * x for x in range(60)]
    assert {r.node for r in result.report} == {h.address for h in good}
    print(up.stderr)
    print(f"\nssh up on 3 hosts (bundle cached on the client, installed on the hosts) "
          f"to first result: {to_first_result:.1f} s")

    listed = deathstar("ssh", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert sorted(r["host"] for r in rows) == sorted(h.address for h in good)
    assert all(r["daemon"] == "up" and r["workers"] == 2 and r["version"] == ds.__version__
               for r in rows), rows

    down = deathstar("ssh", "down", "--name", "lab")
    assert down.returncode == 0, down.stderr
    assert "stopped 3 host(s)" in down.stderr
    for host in good:
        wait_for(lambda: not daemons_on(host), 15, f"no deathstar process on {host.name}")
    assert not state.exists()
    assert installs == sorted(p.name for p in share.iterdir())  # kept without --purge
    with pytest.raises(Exception, match="no such cluster"):
        ds.Cluster("ssh:lab")

    again = deathstar("ssh", "down", "--name", "lab")
    assert again.returncode == 0 and "no ssh cluster named lab" in again.stderr


def test_refused_login_and_unreachable_host_are_named_and_others_go_on(lab: Lab) -> None:
    good, refusing = lab.hosts[0], lab.hosts[3]
    up = deathstar("ssh", "up", good.address, refusing.address, f"{refusing.address}:2222",
                   "--name", "part", "--workers", "1")
    try:
        assert up.returncode == 0, up.stderr
        assert up.stdout.split() == [f"{good.address}:6000"]
        assert f"{refusing.address}: cannot log in: " in up.stderr
        assert "Permission denied" in up.stderr
        assert f"{refusing.address}:2222: cannot log in: " in up.stderr
        assert "Connection refused" in up.stderr
    finally:
        assert deathstar("ssh", "down", "--name", "part").returncode == 0
    none = deathstar("ssh", "up", refusing.address, "--name", "none")
    assert none.returncode == 4, none.stderr
    assert "Permission denied" in none.stderr and "Traceback" not in none.stderr


def test_host_without_the_clients_python_is_named_with_both_versions(lab: Lab) -> None:
    host = lab.hosts[4]
    up = deathstar("ssh", "up", host.address, "--name", "nopy")
    assert up.returncode == 4, up.stderr
    client = ".".join(map(str, sys.version_info[:3]))
    line = next(ln for ln in up.stderr.splitlines() if ln.startswith(f"error: {host.address}"))
    assert f"no Python {MINOR}" in line and client in line, up.stderr
    other = lab.ssh(host, "python3 -V").stdout.split()  # ['Python', 'X.Y.Z'] when present
    if other:
        assert other[-1] in line
    assert not daemons_on(host)
    assert not (Path(os.environ["XDG_CONFIG_HOME"]) / "deathstar/clusters/nopy").exists()


def test_down_stops_only_its_own_daemon_and_purge_removes_the_install(lab: Lab) -> None:
    host = lab.hosts[0]
    from deathstar.deploy import ssh  # the library's face of `ssh up`

    started = time.monotonic()
    up = ssh.up([host.address], name="one", workers=1)
    assert [n.host for n in up["nodes"]] == [host.address] and not up["failures"]
    print(f"\nssh up on a host that has the bundle already: {time.monotonic() - started:.1f} s")
    up_bundle = json.loads((Path(os.environ["XDG_CONFIG_HOME"]) / "deathstar/clusters/one"
                            / "cluster.json").read_text())["hosts"][host.address]["bundle"]
    pid_file = lab.home / ".local/state/deathstar/ssh/one" / host.address / "daemon.pid"
    daemon_pid = int(pid_file.read_text())
    # the pid file now names a process that is not our daemon (a reused pid)
    decoy = host.popen(["sleep", "60"])
    wait_for(lambda: host.owns(decoy.pid), 10, "the decoy on the host")
    pid_file.write_text(f"{decoy.pid}\n")
    down = deathstar("ssh", "down", "--name", "one", "--purge")
    assert down.returncode == 0, down.stderr
    assert decoy.poll() is None, "down killed a process it did not start"
    assert Path(f"/proc/{daemon_pid}").exists()  # not named by the pid file: left alone
    share = lab.home / ".local/share/deathstar"
    assert [p.name for p in share.iterdir()] == [up_bundle], "purged an install in use"
    os.kill(daemon_pid, 15)
    wait_for(lambda: not daemons_on(host), 15, "the daemon to stop")
    decoy.kill()
    decoy.wait()
    # with nothing running from it, --purge removes it
    ssh.up([host.address], name="one", workers=1)
    assert deathstar("ssh", "down", "--name", "one", "--purge").returncode == 0
    assert not share.exists()
    assert not daemons_on(host)


def test_down_of_an_unknown_cluster_and_a_bad_name() -> None:
    down = deathstar("ssh", "down", "--name", "never-made")
    assert down.returncode == 0 and "no ssh cluster named never-made" in down.stderr
    bad = deathstar("ssh", "up", "h1", "--name", "../keys")
    assert bad.returncode == 2 and "cluster name" in bad.stderr


def test_host_specs_and_platform_tags() -> None:
    from deathstar.deploy import ssh

    assert ssh.parse_target("me@krypton:2222") == ssh.Target("me@krypton:2222", "krypton",
                                                             "me", 2222)
    assert ssh.parse_target("xenon", user="u") == ssh.Target("xenon", "xenon", "u", None)
    assert ssh.parse_target("[fe80::1]:22").host == "fe80::1"
    with pytest.raises(ssh.SshError, match="1 to 65535"):
        ssh.parse_target("h:70000")
    with pytest.raises(ssh.SshError, match="not a host"):
        ssh.parse_target("a:b:c")
    assert ssh.parse_target("me@krypton:2222").id != ssh.parse_target("krypton").id
    facts = {"platform": "linux-x86_64", "libc": "glibc 2.36"}
    assert ssh.host_platform(facts) == "manylinux_2_36_x86_64"
    assert ssh.host_platform({"platform": "macosx-11.0-arm64", "libc": " "}) == \
        "macosx_11_0_arm64"
