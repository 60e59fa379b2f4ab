"""``deathstar ec2`` against moto's AWS server (a real HTTP endpoint on loopback), through
the real CLI in a subprocess. No instance boots under moto, so nothing is ever sent to
the addresses it hands out (``--no-wait``, ``--no-probe``); the daemon's start command
from the user-data is run here instead."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

import boto3  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

from deathstar import keys
from deathstar.deploy import ec2  # noqa: E402
from deathstar.client import query_status  # noqa: E402
from deathstar.nodes import parse_cluster  # noqa: E402
from tests.conftest import wait_for  # noqa: E402

pytestmark = pytest.mark.timeout(180)

EXE = str(Path(sys.executable).with_name("deathstar"))
CIDR = "203.0.113.7/32"  # documentation range: never routed anywhere


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port())
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(moto: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment pointing boto3 at moto, with a config folder of its own, and the
    caller-address lookup pointed at a closed loopback port (nothing leaves this host)."""
    env = {"AWS_ENDPOINT_URL": moto, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
           "DEATHSTAR_CHECKIP_URL": "http://127.0.0.1:9/"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("DEATHSTAR_KEYS", raising=False)
    return {**{k: v for k, v in os.environ.items() if k != "DEATHSTAR_KEYS"}, **env}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, "ec2", *args], env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def client() -> Any:
    return boto3.client("ec2", region_name="us-east-1")


def instances_of(name: str, states: tuple[str, ...] = ("pending", "running", "stopping",
                                                        "stopped")) -> list[dict[str, Any]]:
    out = client().describe_instances(Filters=[
        {"Name": "tag:deathstar:cluster", "Values": [name]},
        {"Name": "instance-state-name", "Values": list(states)}])
    return [i for r in out["Reservations"] for i in r["Instances"]]


def groups_of(name: str) -> list[dict[str, Any]]:
    return client().describe_security_groups(Filters=[
        {"Name": "tag:deathstar:cluster", "Values": [name]}])["SecurityGroups"]


def test_up_list_resolve_down_and_up_again(aws_env: dict[str, str]) -> None:
    up = cli(aws_env, "up", "--count", "2", "--type", "c5.xlarge", "--name", "pi-run",
             "--allow-cidr", CIDR, "--no-wait")
    assert up.returncode == 0, up.stderr
    launched = instances_of("pi-run")
    assert len(launched) == 2
    addresses = sorted(f"{i['PublicIpAddress']}:6000" for i in launched)
    assert sorted(up.stdout.split()) == addresses

    # tags on everything, at creation
    for inst in launched:
        tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
        assert tags["deathstar:cluster"] == "pi-run" and tags["deathstar:version"]
        attr = client().describe_instance_attribute(
            InstanceId=inst["InstanceId"], Attribute="instanceInitiatedShutdownBehavior")
        assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    volumes = client().describe_volumes(Filters=[
        {"Name": "tag:deathstar:cluster", "Values": ["pi-run"]}])["Volumes"]
    assert len(volumes) >= 2

    # the security group: our ports from the allowed address only, the cluster to itself,
    # no SSH, nothing open to the world
    (group,) = groups_of("pi-run")
    rules = group["IpPermissions"]
    cidrs = [r["CidrIp"] for rule in rules for r in rule.get("IpRanges", [])]
    assert "0.0.0.0/0" not in cidrs and set(cidrs) == {CIDR}
    ports = {(rule.get("FromPort"), rule.get("ToPort")) for rule in rules
             if rule.get("IpRanges")}
    assert ports == {(6000, 6002)}
    assert any(p["GroupId"] == group["GroupId"] for rule in rules
               for p in rule.get("UserIdGroupPairs", []))

    # the user-data carries the user's client key and the cluster's node key
    user_data = base64.b64decode(client().describe_instance_attribute(
        InstanceId=launched[0]["InstanceId"], Attribute="userData")["UserData"]["Value"])
    client_public = keys.load_client_keys(keys.default_dir()).public
    node_public = (ec2.cluster_dir("pi-run") / "node.key").read_text()
    assert client_public.decode() in user_data.decode()
    assert node_public.split('"')[1] in user_data.decode()

    # list (by tag, from anywhere) and resolution of ec2:NAME, alone and mixed
    listed = cli(aws_env, "list", "--json", "--no-probe")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {r["id"] for r in rows} == {i["InstanceId"] for i in launched}
    assert all(r["cluster"] == "pi-run" and r["state"] == "running" for r in rows)
    nodes = cli(aws_env, "nodes", "pi-run")
    assert sorted(nodes.stdout.split()) == addresses
    mixed = parse_cluster("127.0.0.1:7000,ec2:pi-run")
    assert mixed is not None and len(mixed) == 3
    assert all(n.server_key == node_public.split('"')[1].encode() for n in mixed[1:])

    # a retried up launches nothing more
    again = cli(aws_env, "up", "--count", "2", "--name", "pi-run", "--allow-cidr", CIDR,
                "--no-wait")
    assert again.returncode == 0 and len(instances_of("pi-run")) == 2

    down = cli(aws_env, "down", "--name", "pi-run")
    assert down.returncode == 0, down.stderr
    assert instances_of("pi-run") == [] and groups_of("pi-run") == []
    assert len(instances_of("pi-run", ("terminated",))) == 2
    assert cli(aws_env, "down", "--name", "pi-run").returncode == 0  # idempotent
    assert json.loads(cli(aws_env, "list", "--json", "--no-probe").stdout) == []

    # and up again
    assert cli(aws_env, "up", "--name", "pi-run", "--allow-cidr", CIDR,
               "--no-wait").returncode == 0
    assert len(instances_of("pi-run")) == 1
    assert cli(aws_env, "down", "--name", "pi-run").returncode == 0


def test_down_finds_stopped_instances(aws_env: dict[str, str]) -> None:
    assert cli(aws_env, "up", "--count", "2", "--name", "stopper", "--allow-cidr", CIDR,
               "--no-wait").returncode == 0
    first = instances_of("stopper")[0]["InstanceId"]
    client().stop_instances(InstanceIds=[first])
    wait_for(lambda: instances_of("stopper", ("stopped",)), 30, "a stopped instance")
    assert cli(aws_env, "down", "--name", "stopper").returncode == 0
    assert instances_of("stopper") == [] and groups_of("stopper") == []


def test_ssh_and_spot_only_when_asked(aws_env: dict[str, str]) -> None:
    up = cli(aws_env, "up", "--name", "sshspot", "--allow-cidr", CIDR, "--ssh", "--spot",
             "--no-wait")
    assert up.returncode == 0, up.stderr
    (group,) = groups_of("sshspot")
    ssh = [r for r in group["IpPermissions"] if r.get("FromPort") == 22]
    assert ssh and [r["CidrIp"] for r in ssh[0]["IpRanges"]] == [CIDR]
    (inst,) = instances_of("sshspot")
    assert inst.get("InstanceLifecycle") == "spot"
    assert cli(aws_env, "down", "--name", "sshspot").returncode == 0


def test_without_a_known_address_up_refuses(aws_env: dict[str, str]) -> None:
    res = cli(aws_env, "up", "--name", "noaddr", "--no-wait")
    assert res.returncode == ec2.EXIT_NO_ADDRESS and "--allow-cidr" in res.stderr
    assert instances_of("noaddr") == [] and groups_of("noaddr") == []


@pytest.mark.parametrize("args, env_change, code, words", [
    (["--region", "mars-1"], {}, ec2.EXIT_REGION, "unknown AWS region"),
    (["--type", "zz9.huge"], {}, ec2.EXIT_TYPE_NOT_OFFERED, "not offered"),
    ([], {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
          "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"},
     ec2.EXIT_NO_CREDENTIALS, "no AWS credentials"),
])
def test_clear_errors(aws_env: dict[str, str], args: list[str],
                      env_change: dict[str, str | None], code: int, words: str) -> None:
    env = dict(aws_env)
    for k, v in env_change.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    res = cli(env, "up", "--name", "err", "--allow-cidr", CIDR, "--no-wait", *args)
    assert res.returncode == code, res.stderr
    assert words in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert instances_of("err") == [] and groups_of("err") == []


def test_no_default_vpc(aws_env: dict[str, str]) -> None:
    region = "eu-north-1"
    c = boto3.client("ec2", region_name=region)
    (vpc,) = c.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    for subnet in c.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}]
                                     )["Subnets"]:
        c.delete_subnet(SubnetId=subnet["SubnetId"])
    for igw in c.describe_internet_gateways()["InternetGateways"]:
        for att in igw.get("Attachments", []):
            if att["VpcId"] == vpc["VpcId"]:
                c.detach_internet_gateway(InternetGatewayId=igw["InternetGatewayId"],
                                          VpcId=vpc["VpcId"])
    c.delete_vpc(VpcId=vpc["VpcId"])
    res = cli(aws_env, "up", "--name", "novpc", "--allow-cidr", CIDR, "--no-wait",
              "--region", region)
    assert res.returncode == ec2.EXIT_NO_DEFAULT_VPC and "no default VPC" in res.stderr


@pytest.mark.parametrize("error_code", ["InsufficientInstanceCapacity", "VcpuLimitExceeded"])
def test_capacity_and_quota_errors_leave_nothing(aws_env: dict[str, str],
                                                 error_code: str) -> None:
    """moto cannot run out of capacity: botocore's event hook makes RunInstances fail
    the way AWS does, and our code's own path handles it."""
    aws = ec2.Aws("us-east-1")

    def refuse(**_: Any) -> None:
        raise ClientError({"Error": {"Code": error_code, "Message": "try later"}},
                          "RunInstances")

    aws.ec2.meta.events.register("before-call.ec2.RunInstances", refuse)
    opts = ec2.UpOptions(name="quota", count=3, allow_cidr=CIDR)
    with pytest.raises(ec2.Ec2Error) as info:
        ec2.up(opts, aws=aws)
    assert info.value.code == ec2.EXIT_QUOTA and error_code in str(info.value)
    assert instances_of("quota") == [] and groups_of("quota") == []


FIXED_PUBLIC = b"rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
FIXED_SECRET = b"JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh6"
FIXED_CLIENT = b"Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"
GOLDEN = Path(__file__).parent.parent / "golden" / "user_data.yaml"


def test_user_data_matches_the_golden_file_and_fits() -> None:
    opts = ec2.UpOptions(name="golden", install="deathstar==0.1.0")
    text = ec2.render_user_data(opts, FIXED_PUBLIC, FIXED_SECRET, FIXED_CLIENT, "3.11")
    if os.environ.get("DEATHSTAR_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    assert len(text.encode()) < ec2.USER_DATA_LIMIT
    assert f"ExecStart={' '.join(ec2.daemon_command(opts))}" in text


def test_the_user_data_daemon_command_runs_and_answers(tmp_path: Path) -> None:
    """The service's command, run here with a key folder laid out as the user-data lays
    it out on a node, serves the client whose key the user-data authorized."""
    keydir = tmp_path / "client"
    keys.keygen(keydir)
    node_dir = tmp_path / "node"
    (node_dir / "authorized").mkdir(parents=True)
    node_dir.chmod(0o700)
    (node_dir / "authorized").chmod(0o700)
    ck = keys.load_client_keys(keydir)
    sk = keys.load_server_keys(keydir)  # reuse the node pair keygen made
    (node_dir / "node.key").write_text(ec2._certificate(sk.public, None))
    secret = node_dir / "node.key_secret"
    secret.write_text(ec2._certificate(sk.public, sk.secret))
    secret.chmod(0o600)
    (node_dir / "authorized" / "client.key").write_text(ec2._certificate(ck.public, None))
    port = _free_port_triple()
    opts = ec2.UpOptions(name="local", port=port)
    cmd = ec2.daemon_command(opts, keys_dir=str(node_dir), host="127.0.0.1",
                             python=sys.executable)
    proc = subprocess.Popen([*cmd, "--workers", "1"], stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: query_status([f"127.0.0.1:{port}"], timeout=1.0,
                                      keys=keydir)[0].get("workers") == 1, 30,
                 "the daemon started from the user-data's command")
        assert query_status([f"127.0.0.1:{port}"], timeout=1.0, keys="none")[0]["error"]
    finally:
        proc.terminate()
        proc.wait(20)


def _free_port_triple() -> int:
    from tests.conftest import free_ports

    return free_ports(3)
