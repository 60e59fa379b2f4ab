"""The user-data ``deathstar ec2 up`` sends, executed for real on a disposable machine.

The machine is a network-namespace host whose only neighbour is a moto server on the
test's bridge (no route to any package index), with a root of its own: an overlay of ``/``
in a private mount namespace, so that useradd, ``/opt``, ``/etc`` writes vanish with it.
pip's local package folders and configuration are hidden there, so "offline" is real. What
it lacks is stood in for: ``systemctl`` (tests/netns/systemctl_standin.py). Nothing of
deathstar is: the CLI renders and uploads, the script downloads through the presigned URL,
install.sh verifies and installs, the daemon serves the client's map.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

import boto3  # noqa: E402

import deathstar  # noqa: E402
from deathstar import keys  # noqa: E402
from deathstar.deploy import ec2  # noqa: E402
from tests.aws import ec2_cli, moto_environment, moto_server_on  # noqa: E402
from tests.conftest import wait_for  # noqa: E402
from tests.netns.hosts import Host, netns_available, virtual_hosts  # noqa: E402

EXE = str(Path(sys.executable).with_name("deathstar"))
STANDIN = Path(__file__).with_name("systemctl_standin.py")
#: What pip on this machine is configured with, hidden on the node (see the notes).
PIP_PLACES = ["/opt/wheels", "/opt/pypi", "/opt/pypi-more", "/root", "/etc/xdg/pip"]
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _node_python_missing() -> str | None:
    """Why the node (this machine's root outside /root) cannot run the client's Python
    minor with venv, or None. The user-data would install it from the image's repository,
    which the offline node cannot reach."""
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    python = shutil.which(f"python{minor}", path=NODE_PATH)
    if python is None:
        return f"no python{minor} on {NODE_PATH} (the node runs the client's minor)"
    probe = subprocess.run([python, "-c", "import ensurepip, venv"], capture_output=True,
                           stdin=subprocess.DEVNULL)
    if probe.returncode != 0:
        return f"{python} cannot make venvs (install python{minor}-venv)"
    return None


_SKIP = netns_available() or (None if shutil.which("curl") else "the node's boot needs curl") \
    or _node_python_missing()
pytestmark = [pytest.mark.timeout(300), pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))]


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    with virtual_hosts(1) as made:
        yield made[0]


@pytest.fixture(scope="module")
def bridge(host: Host) -> str:
    """The root namespace's address on the host's LAN (the bridge holds .1)."""
    net = ipaddress.ip_interface(f"{host.address}/24").network
    return str(net.network_address + 1)


@pytest.fixture(scope="module")
def moto(bridge: str) -> Iterator[str]:
    with moto_server_on(bridge) as url:
        yield url


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundle-cache")  # one bundle build for the module


@pytest.fixture
def aws_env(moto: str, cache: Path, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return moto_environment(moto, cache, tmp_path, monkeypatch)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return ec2_cli(env, *args, timeout=180)


def user_data_of(name: str) -> tuple[str, str]:
    """(instance id, user-data) of the cluster's one instance, as AWS hands it out."""
    c = boto3.client("ec2", region_name="us-east-1")
    (inst,) = [i for r in c.describe_instances(Filters=[
        {"Name": "tag:deathstar:cluster", "Values": [name]},
        {"Name": "instance-state-name", "Values": ["running"]}])["Reservations"]
        for i in r["Instances"]]
    raw = c.describe_instance_attribute(InstanceId=inst["InstanceId"],
                                        Attribute="userData")["UserData"]["Value"]
    return inst["InstanceId"], base64.b64decode(raw).decode()


def boot(host: Host, user_data: str, scratch: Path) -> subprocess.CompletedProcess[str]:
    """Run ``user_data`` as root on ``host`` in a root of its own (writes land in
    ``scratch/upper``), with pip's local folders and configuration hidden and a clean
    environment, the way cloud-init runs a ``#!`` user-data."""
    upper, work, root = scratch / "upper", scratch / "work", scratch / "root"
    for d in (upper / "usr/local/sbin", work, root):
        d.mkdir(parents=True)
    shutil.copy(STANDIN, upper / "usr/local/sbin/systemctl")
    (upper / "usr/local/sbin/systemctl").chmod(0o755)
    (upper / "user-data").write_text(user_data)
    (upper / "user-data").chmod(0o700)
    hide = " ".join(PIP_PLACES)
    script = f"""set -e
mount -t overlay overlay -o lowerdir=/,upperdir={upper},workdir={work} {root}
mount -t proc proc {root}/proc
mount --rbind /dev {root}/dev
mount --rbind /sys {root}/sys
mount -t tmpfs tmpfs {root}/tmp
for d in {hide}; do if [ -d {root}$d ]; then mount -t tmpfs tmpfs {root}$d; fi; done
rm -f {root}/etc/pip.conf
exec chroot {root} /usr/bin/env -i PATH={NODE_PATH} LANG=C.UTF-8 /user-data"""
    return host.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                    capture_output=True, text=True, timeout=240)


def boot_log(scratch: Path) -> str:
    path = scratch / "upper/var/log/deathstar-boot.log"
    return path.read_text() if path.exists() else "(no boot log)"


def daemon_pids(host: Host) -> list[int]:
    found = []
    for pid in host.pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"deathstar" in cmdline and b"daemon" in cmdline:
            found.append(pid)
    return found


def stop_everything_on(host: Host) -> None:
    """Kill what the boot left running on the host (its mount namespace goes with it)."""
    def gone() -> bool:
        pids = host.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return not pids
    wait_for(gone, 20, "the node's processes to end")


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def node_report(name: str) -> dict[str, Any]:
    aws = ec2.Aws("us-east-1")
    return {i: (r.state, r.detail) for i, r in ec2.node_reports(aws, name).items()}


def test_the_user_data_boots_a_node_that_serves_the_clients_map(
        host: Host, bridge: str, aws_env: dict[str, str], tmp_path: Path) -> None:
    up = cli(aws_env, "up", "--name", "boot", "--allow-cidr", f"{bridge}/32", "--no-wait")
    assert up.returncode == 0, up.stderr
    instance, user_data = user_data_of("boot")
    assert user_data.startswith("#!/bin/sh\n") and len(user_data.encode()) < 16 * 1024
    assert "secret-key" not in user_data and "PRIVATE" not in user_data

    started = time.monotonic()
    scratch = tmp_path / "node"
    try:
        proc = boot(host, user_data, scratch)
        booted = time.monotonic() - started
        assert proc.returncode == 0, (proc.stderr, boot_log(scratch))
        upper = scratch / "upper"

        # the node made its own keypair: the secret is there (0600, the daemon user's),
        # and what it reported through its presigned URL is its public half
        report = node_report("boot")
        assert report[instance][0] == "ready", report
        secret_file = upper / "etc/deathstar/keys/node.key_secret"
        public, secret = __import__("zmq.auth").auth.load_certificate(str(secret_file))
        assert secret and public.decode() == report[instance][1]
        uid = next(int(line.split(":")[2]) for line in
                   (upper / "etc/passwd").read_text().splitlines()
                   if line.startswith("deathstar:"))
        assert 0 < uid < 1000  # a system user
        st = secret_file.stat()
        assert st.st_uid == uid and st.st_mode & 0o077 == 0

        # installed offline from the bundle, this very version
        venv = upper / "opt/deathstar/venv"
        assert list(venv.glob(f"lib/python3.*/site-packages/deathstar_cluster-"
                              f"{deathstar.__version__}.dist-info"))

        # the daemon runs as that user, with no_new_privs, from the venv
        (pid,) = wait_for(lambda: daemon_pids(host), 30, "the node's daemon")
        assert status_field(pid, "Uid").split()[0] == str(uid)
        assert status_field(pid, "NoNewPrivs") == "1"

        # the client maps on it with its own key and the node's reported key
        keydir = Path(aws_env["XDG_CONFIG_HOME"]) / "deathstar" / "keys"
        assert keys.load_client_keys(keydir)
        nodes = keydir / "nodes"
        nodes.mkdir(mode=0o700, exist_ok=True)
        (nodes / f"{host.address}_6000.key").write_text(
            f'metadata\ncurve\n    public-key = "{report[instance][1]}"\n')
        result = deathstar.map(lambda x: (x * x, os.getuid(), socket.gethostname()),
                               range(6), cluster=f"{host.address}:6000", keys=keydir,
                               connect_timeout=30)
        first = time.monotonic() - started
        assert [r[0] for r in result] == [x * x for x in range(6)]
        assert {(r[1], r[2]) for r in result} == {(uid, host.hostname)}
        print(f"\nboot: user-data done in {booted:.1f} s, map results at {first:.1f} s")
    finally:
        stop_everything_on(host)
        assert cli(aws_env, "down", "--name", "boot").returncode == 0


def test_a_tampered_bundle_is_refused_on_the_node_and_up_reports_it(
        host: Host, bridge: str, aws_env: dict[str, str], tmp_path: Path) -> None:
    up = cli(aws_env, "up", "--name", "tampered", "--allow-cidr", f"{bridge}/32",
             "--no-wait")
    assert up.returncode == 0, up.stderr
    instance, user_data = user_data_of("tampered")
    s3 = boto3.client("s3", region_name="us-east-1")
    # the object the node's URL points at (moto's state is shared by the whole process)
    url = re.search(r"^bundle_url='[^/]+//[^/]+/([^/]+)/(bundles/[0-9a-f]+\.tar)\?",
                    user_data, re.MULTILINE)
    assert url, user_data
    bucket, key = url.group(1), url.group(2)
    original = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=original[:-1] + b"X")  # one byte changed

    scratch = tmp_path / "node"
    try:
        proc = boot(host, user_data, scratch)
        assert proc.returncode != 0
        log = boot_log(scratch)
        assert "sha256" in log and "not installing" in log, log
        assert daemon_pids(host) == []
        assert not (scratch / "upper/opt/deathstar/venv").exists()
        state, reason = node_report("tampered")[instance]
        assert state == "failed" and "sha256" in reason

        # up's wait (here: up of the existing cluster) reports that node and why
        again = cli(aws_env, "up", "--name", "tampered", "--allow-cidr", f"{bridge}/32",
                    "--wait-timeout", "60s")
        assert again.returncode == ec2.EXIT_NODE_FAILED, again.stderr
        assert instance in again.stderr and "sha256" in again.stderr
    finally:
        stop_everything_on(host)
        assert cli(aws_env, "down", "--name", "tampered").returncode == 0
    left = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert key not in left and not [k for k in left if k.startswith("clusters/tampered/")]
