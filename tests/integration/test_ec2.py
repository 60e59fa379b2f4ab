"""``deathstar ec2`` against moto's AWS server (a real HTTP endpoint on loopback), through
the real CLI in a subprocess. No instance boots under moto, so nothing is ever sent to
the addresses it hands out (``--no-wait``, ``--no-probe``); where a node's part matters,
the test plays it through the node's own presigned URL (tests/netns/test_ec2_boot.py runs
the whole user-data for real)."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

import boto3  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

import zmq  # noqa: E402
import zmq.auth  # noqa: E402

from deathstar import keys
from deathstar.deploy import ec2  # noqa: E402
from deathstar.deploy.ec2_boot import BootPlan, daemon_command, public_certificate  # noqa
from deathstar.client import query_status  # noqa: E402
from deathstar.nodes import parse_cluster  # noqa: E402
from tests.aws import ec2_cli, free_port, moto_environment, moto_server_on  # noqa: E402
from tests.conftest import sdist_only_package, wait_for  # noqa: E402

pytestmark = pytest.mark.timeout(180)

EXE = str(Path(sys.executable).with_name("deathstar"))
CIDR = "203.0.113.7/32"  # documentation range: never routed anywhere


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    with moto_server_on("127.0.0.1") as url:
        yield url


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundle-cache")  # the node bundle, built once


@pytest.fixture
def aws_env(moto: str, cache: Path, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment pointing boto3 at moto, with a config folder of its own, and the
    caller-address lookup pointed at a closed loopback port (nothing leaves this host)."""
    return moto_environment(moto, cache, tmp_path, monkeypatch)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return ec2_cli(env, *args, timeout=120)


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


def s3() -> Any:
    return boto3.client("s3", region_name="us-east-1")


BUCKET = "deathstar-123456789012-us-east-1"  # moto's account id


def objects() -> list[str]:
    if BUCKET not in [b["Name"] for b in s3().list_buckets()["Buckets"]]:
        return []
    return sorted(o["Key"] for o in s3().list_objects_v2(Bucket=BUCKET).get("Contents", []))


def user_data(instance_id: str) -> str:
    raw = client().describe_instance_attribute(InstanceId=instance_id,
                                               Attribute="userData")["UserData"]["Value"]
    return base64.b64decode(raw).decode()


def play_node(instance_id: str, report: str) -> None:
    """Do what the node's boot does at its end: PUT its report to its presigned URL."""
    url = re.search(r"^report_url='([^']+)'$", user_data(instance_id), re.MULTILINE)
    assert url, "no report URL in the user-data"
    request = urllib.request.Request(url.group(1), data=report.encode(), method="PUT",
                                     headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=10) as response:  # moto on loopback
        assert response.status == 200


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

    # IMDSv2 only, one hop; each node its own user-data: the client's public key, its own
    # report URL, the bundle's URL and hashes, and no secret at all
    client_public = keys.load_client_keys(keys.default_dir()).public
    texts = {i["InstanceId"]: user_data(i["InstanceId"]) for i in launched}
    for inst in launched:
        meta = inst["MetadataOptions"]
        assert meta["HttpTokens"] == "required" and meta["HttpPutResponseHopLimit"] == 1
        text = texts[inst["InstanceId"]]
        assert text.startswith("#!/bin/sh") and client_public.decode() in text
        assert "secret-key" not in text and "pip install deathstar" not in text
        assert re.findall(r'-key = "(.{40})"', text) == [client_public.decode()]
    assert len({re.search(r"report_url='([^?]+)", t).group(1)  # type: ignore[union-attr]
                for t in texts.values()}) == 2
    assert not (ec2.cluster_dir("pi-run") / "node.key_secret").exists()

    # the bundle is in deathstar's bucket: private, encrypted, expiring, tagged
    (bundle_key,) = [k for k in objects() if k.startswith("bundles/")]
    assert f"archive_sha256={_sha256_of_object(bundle_key)}" in texts[launched[0]["InstanceId"]]
    block = s3().get_public_access_block(Bucket=BUCKET)["PublicAccessBlockConfiguration"]
    assert all(block.values()) and len(block) == 4
    (rule,) = s3().get_bucket_encryption(Bucket=BUCKET)[
        "ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    lifecycle = s3().get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]
    assert any(r["Filter"]["Prefix"] == "bundles/" and r["Expiration"]["Days"] <= 30
               for r in lifecycle)
    tags = {t["Key"]: t["Value"] for t in s3().get_bucket_tagging(Bucket=BUCKET)["TagSet"]}
    assert tags["deathstar:managed"] == "true"
    with tarfile.open(fileobj=s3().get_object(Bucket=BUCKET, Key=bundle_key)["Body"],
                      mode="r|") as tar:
        assert "install.sh" in tar.getnames()

    # nodes report their own keys; ec2:NAME resolves to each node with its own key
    node_keys = {}
    for inst in launched:
        node_keys[inst["PublicIpAddress"]] = zmq.curve_keypair()[0].decode()
        play_node(inst["InstanceId"], f"ready {node_keys[inst['PublicIpAddress']]}\n")
    listed = cli(aws_env, "list", "--json", "--no-probe")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {r["id"] for r in rows} == {i["InstanceId"] for i in launched}
    assert all(r["cluster"] == "pi-run" and r["state"] == "running" for r in rows)
    nodes = cli(aws_env, "nodes", "pi-run")
    assert sorted(nodes.stdout.split()) == addresses
    mixed = parse_cluster("127.0.0.1:7000,ec2:pi-run")
    assert mixed is not None and len(mixed) == 3
    assert {n.host: n.server_key.decode() for n in mixed[1:]  # type: ignore[union-attr]
            } == node_keys

    # a retried up launches nothing more
    again = cli(aws_env, "up", "--count", "2", "--name", "pi-run", "--allow-cidr", CIDR,
                "--no-wait")
    assert again.returncode == 0 and len(instances_of("pi-run")) == 2

    down = cli(aws_env, "down", "--name", "pi-run")
    assert down.returncode == 0, down.stderr
    assert instances_of("pi-run") == [] and groups_of("pi-run") == []
    # its bundle and its records: only this cluster used them
    assert bundle_key not in objects() and not any("/pi-run/" in k for k in objects())
    assert len(instances_of("pi-run", ("terminated",))) == 2
    assert cli(aws_env, "down", "--name", "pi-run").returncode == 0  # idempotent
    assert json.loads(cli(aws_env, "list", "--json", "--no-probe").stdout) == []

    # and up again
    assert cli(aws_env, "up", "--name", "pi-run", "--allow-cidr", CIDR,
               "--no-wait").returncode == 0
    assert len(instances_of("pi-run")) == 1
    assert cli(aws_env, "down", "--name", "pi-run").returncode == 0


def _sha256_of_object(key: str) -> str:
    import hashlib

    return hashlib.sha256(s3().get_object(Bucket=BUCKET, Key=key)["Body"].read()).hexdigest()


def test_a_bundle_two_clusters_use_stays_until_the_last_goes(aws_env: dict[str, str]) -> None:
    for name in ("share-a", "share-b"):
        assert cli(aws_env, "up", "--name", name, "--allow-cidr", CIDR,
                   "--no-wait").returncode == 0
    bundle_key = s3().get_object(Bucket=BUCKET, Key="clusters/share-a/bundle")["Body"].read(
    ).decode()
    assert bundle_key.startswith("bundles/") and bundle_key in objects()
    assert cli(aws_env, "down", "--name", "share-a").returncode == 0
    assert bundle_key in objects() and not any("share-a" in k for k in objects())
    assert cli(aws_env, "down", "--name", "share-b").returncode == 0
    assert bundle_key not in objects() and not any("/share-" in k for k in objects())


def test_a_node_that_reports_a_failed_boot_fails_ups_wait(aws_env: dict[str, str]) -> None:
    assert cli(aws_env, "up", "--name", "sad", "--allow-cidr", CIDR,
               "--no-wait").returncode == 0
    (inst,) = instances_of("sad")
    play_node(inst["InstanceId"], "failed bundle archive sha256 is 00ff, expected 1234\n")
    # the default wait; it probes only nodes that reported ready (none here)
    again = cli(aws_env, "up", "--name", "sad", "--allow-cidr", CIDR, "--wait-timeout", "60s")
    assert again.returncode == ec2.EXIT_NODE_FAILED
    assert inst["InstanceId"] in again.stderr and "sha256 is 00ff" in again.stderr
    listed = json.loads(cli(aws_env, "list", "--json").stdout)
    assert listed[0]["daemon"].startswith("failed: bundle archive sha256")
    assert cli(aws_env, "down", "--name", "sad").returncode == 0


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


def test_a_reused_group_is_reconciled_to_what_up_makes(aws_env: dict[str, str]) -> None:
    """An existing deathstar-NAME group open to the world (someone's, or an old run's)
    gets exactly up's rules, not its own."""
    vpc = client().describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}]
                                 )["Vpcs"][0]["VpcId"]
    group = client().create_security_group(
        GroupName="deathstar-reuse", Description="left behind", VpcId=vpc,
        TagSpecifications=[{"ResourceType": "security-group", "Tags": [
            {"Key": "deathstar:cluster", "Value": "reuse"}]}])["GroupId"]
    world = [{"CidrIp": "0.0.0.0/0"}]
    client().authorize_security_group_ingress(GroupId=group, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": world},
        {"IpProtocol": "tcp", "FromPort": 6000, "ToPort": 6002, "IpRanges": world},
        {"IpProtocol": "tcp", "FromPort": 8080, "ToPort": 8080, "IpRanges": world}])
    up = cli(aws_env, "up", "--name", "reuse", "--allow-cidr", CIDR, "--no-wait")
    assert up.returncode == 0, up.stderr
    (found,) = groups_of("reuse")
    assert found["GroupId"] == group
    have = {(r.get("IpProtocol"), r.get("FromPort"), r.get("ToPort"), x.get("CidrIp"))
            for r in found["IpPermissions"] for x in r.get("IpRanges", [])}
    assert have == {("tcp", 6000, 6002, CIDR)}
    pairs = [p["GroupId"] for r in found["IpPermissions"] for p in r.get("UserIdGroupPairs", [])]
    assert pairs == [group]
    assert cli(aws_env, "down", "--name", "reuse").returncode == 0


@pytest.mark.parametrize("cidr, ssh", [("0.0.0.0/0", False), ("0.0.0.0/0", True),
                                       ("::/0", False)])
def test_the_whole_world_needs_yes_world(aws_env: dict[str, str], cidr: str,
                                         ssh: bool) -> None:
    extra = ["--ssh"] if ssh else []
    res = cli(aws_env, "up", "--name", "world", "--allow-cidr", cidr, "--no-wait", *extra)
    assert res.returncode == ec2.EXIT_USAGE and "--yes-world" in res.stderr, res.stderr
    assert ("SSH" in res.stderr) == ssh and len(res.stderr.strip().splitlines()) == 1
    assert instances_of("world") == [] and groups_of("world") == []
    assert not [k for k in objects() if k.startswith("clusters/world/")]
    if cidr != "0.0.0.0/0" or ssh:
        return
    ok = cli(aws_env, "up", "--name", "world", "--allow-cidr", cidr, "--no-wait",
             "--yes-world", *extra)
    assert ok.returncode == 0, ok.stderr
    assert "warning" in ok.stderr and "anyone on the internet" in ok.stderr
    (group,) = groups_of("world")
    assert {r["CidrIp"] for rule in group["IpPermissions"] for r in rule.get("IpRanges", [])
            } == {"0.0.0.0/0"}
    assert cli(aws_env, "down", "--name", "world").returncode == 0


def test_cluster_names_stay_inside_the_config_folder(aws_env: dict[str, str]) -> None:
    """Attack 7 of issue 14: down --name ../.. emptied ~/.config; up --name ../keys
    shipped the default node secret. Every command refuses such a name before anything
    is touched."""
    config_home = Path(aws_env["XDG_CONFIG_HOME"])
    keys.keygen(config_home / "deathstar" / "keys")
    (config_home / "deathstar" / "clusters").mkdir()
    other = config_home / "other-program" / "settings.ini"
    other.parent.mkdir(parents=True)
    other.write_text("keep me")
    before = sorted(str(p) for p in config_home.rglob("*"))
    calls = [["down", "--name", name] for name in ("../..", "..", "a/b", "", "x" * 65,
                                                   "n\u00e4me")]
    calls += [["up", "--name", "../keys", "--allow-cidr", CIDR, "--no-wait"],
              ["nodes", "../.."], ["list", "--name", "../.."]]
    for args in calls:
        res = cli(aws_env, *args)
        assert res.returncode == ec2.EXIT_USAGE, (args, res.stderr)
        assert "cluster name" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert sorted(str(p) for p in config_home.rglob("*")) == before
    assert other.read_text() == "keep me"
    assert client().describe_instances(Filters=[{"Name": "instance-state-name",
                                                 "Values": ["pending", "running"]}]
                                       )["Reservations"] == []


def test_no_wheel_for_the_nodes_stops_up_before_anything_is_made(
        aws_env: dict[str, str], tmp_path: Path) -> None:
    links = tmp_path / "links"
    name = sdist_only_package(links)
    env = {**aws_env, "PIP_FIND_LINKS": str(links)}
    before = objects()
    res = cli(env, "up", "--name", "nowheel", "--allow-cidr", CIDR, "--no-wait",
              "--pip", name)
    assert res.returncode == ec2.EXIT_BUNDLE, res.stderr
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for word in (name, "manylinux_2_34_x86_64", f"CPython {python}", "nothing was launched"):
        assert word in res.stderr, (word, res.stderr)
    assert instances_of("nowheel") == [] and groups_of("nowheel") == []
    assert objects() == before


@pytest.fixture
def strict_moto(tmp_path: Path) -> Iterator[str]:
    """A moto server of its own that enforces IAM policies (after the first three calls,
    which make the user the test then acts as)."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        pytest.skip(f"no {exe} (moto[server] installs it)")
    port = free_port()
    proc = subprocess.Popen([str(exe), "-H",
                             "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)

    def answers() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            return proc.poll() is not None  # died: fail below
    try:
        wait_for(answers, 30, "moto_server")
        assert proc.poll() is None, "moto_server died"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.parametrize("action", ["s3:CreateBucket", "s3:PutObject"])
def test_a_missing_s3_permission_is_named(aws_env: dict[str, str], strict_moto: str,
                                          action: str) -> None:
    """A user whose policy denies one S3 action: up exits with the AWS-error code naming
    that action, and leaves no instance or group."""
    iam = boto3.client("iam", endpoint_url=strict_moto, region_name="us-east-1")
    iam.create_user(UserName="narrow")
    iam.put_user_policy(UserName="narrow", PolicyName="all-but-one", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "*", "Resource": "*"},
            {"Effect": "Deny", "Action": action, "Resource": "*"}]}))
    key = iam.create_access_key(UserName="narrow")["AccessKey"]
    env = {**aws_env, "AWS_ENDPOINT_URL": strict_moto, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
           "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    res = cli(env, "up", "--name", "denied", "--allow-cidr", CIDR, "--no-wait")
    assert res.returncode == ec2.EXIT_AWS, res.stderr
    assert f"AWS denied {action}" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    strict = boto3.client("ec2", endpoint_url=strict_moto, region_name="us-east-1",
                          aws_access_key_id=key["AccessKeyId"],
                          aws_secret_access_key=key["SecretAccessKey"])
    assert strict.describe_instances()["Reservations"] == []
    assert not [g for g in strict.describe_security_groups()["SecurityGroups"]
                if g["GroupName"] == "deathstar-denied"]


FIXED_CLIENT = b"Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"
GOLDEN = Path(__file__).parent.parent / "golden" / "user_data.yaml"
GOLDEN_PLAN = BootPlan(
    python="3.11", client_public=FIXED_CLIENT,
    report_url="https://deathstar-123456789012-us-east-1.s3.amazonaws.com/clusters/golden/"
               "nodes/0a1b2c3d-0?X-Amz-Signature=0123",
    bundle_url="https://deathstar-123456789012-us-east-1.s3.amazonaws.com/bundles/"
               f"{'ab' * 32}.tar?X-Amz-Signature=4567",
    archive_sha256="cd" * 32,
    install_command=f"sh install.sh {'ab' * 32} /opt/deathstar/venv python3.11")


def test_user_data_matches_the_golden_file_and_fits() -> None:
    text = ec2.render_user_data(GOLDEN_PLAN)
    if os.environ.get("DEATHSTAR_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    assert len(text.encode()) < ec2.USER_DATA_LIMIT // 2
    assert f"ExecStart={' '.join(daemon_command(GOLDEN_PLAN))}" in text
    for hardening in ("User=deathstar", "NoNewPrivileges=yes", "ProtectSystem=strict",
                      "PrivateTmp=yes", "ProtectHome=yes",
                      "ReadWritePaths=/var/lib/deathstar/work"):
        assert f"\n{hardening}\n" in text
    assert "secret-key" not in text and "pip install" not in text
    assert "--no-index" not in text  # the bundle's install.sh does the offline install


def test_install_is_what_users_who_publish_their_own_build_get() -> None:
    plan = BootPlan(python="3.11", client_public=FIXED_CLIENT, report_url="https://r",
                    install="my-deathstar-fork==2.0")
    text = ec2.render_user_data(plan)
    assert "install=my-deathstar-fork==2.0\n" in text and "bundle_url" not in text
    assert "deathstar==" not in ec2.render_user_data(GOLDEN_PLAN)


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
    public, secret = zmq.auth.create_certificates(str(node_dir), "node")
    os.chmod(secret, 0o600)
    (node_dir / "authorized" / "client.key").write_text(public_certificate(ck.public))
    node_public = zmq.auth.load_certificate(public)[0]
    (keydir / "nodes").mkdir(mode=0o700)
    port = _free_port_triple()
    (keydir / "nodes" / f"127.0.0.1_{port}.key").write_text(public_certificate(node_public))
    plan = BootPlan(python="3.11", client_public=ck.public, report_url="", port=port)
    cmd = daemon_command(plan, keys_dir=str(node_dir), host="127.0.0.1",
                         python=sys.executable, work_dir=str(tmp_path / "work"))
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
