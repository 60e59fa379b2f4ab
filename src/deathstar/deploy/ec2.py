"""EC2 clusters: launch tagged instances that run a keyed deathstar daemon, find them again
by tag (from any machine), and tear them down.

Everything made carries ``deathstar:cluster=NAME`` and ``deathstar:version`` from its
creation (TagSpecifications), so a crash half-way leaves nothing untagged and ``down`` finds
it all. A cluster's node keypair lives in ``<config>/clusters/NAME/``; the user's client
public key goes to the nodes in user-data, so the nodes serve this user only. boto3 is
imported lazily (the ``ec2`` extra).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import zmq.auth

from deathstar import config, keys
from deathstar._version import __version__
from deathstar.client.status import query_status
from deathstar.deploy.provider import cluster_dir
from deathstar.exitcodes import ExitCode
from deathstar.nodes import ClusterSpecError, NodeAddress

TAG_CLUSTER = "deathstar:cluster"
TAG_VERSION = "deathstar:version"
DEFAULT_IMAGE_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
USER_DATA_LIMIT = 16 * 1024
LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
KEYS_ON_NODE = "/etc/deathstar/keys"

# Exit codes of the ec2 commands (distinct per failure, as the CLI promises).
EXIT_NO_BOTO3 = ExitCode.EC2_NO_BOTO3
EXIT_NO_CREDENTIALS = ExitCode.EC2_NO_CREDENTIALS
EXIT_NO_DEFAULT_VPC = ExitCode.EC2_NO_DEFAULT_VPC
EXIT_TYPE_NOT_OFFERED = ExitCode.EC2_TYPE_NOT_OFFERED
EXIT_QUOTA = ExitCode.EC2_QUOTA
EXIT_REGION = ExitCode.EC2_REGION
EXIT_NO_ADDRESS = ExitCode.EC2_NO_ADDRESS
EXIT_AWS = ExitCode.EC2_AWS


class Ec2Error(Exception):
    """A failure with a one-line explanation and the exit code the CLI uses for it."""

    def __init__(self, message: str, code: int = EXIT_AWS):
        super().__init__(message)
        self.code = code


@dataclass
class UpOptions:
    """What ``ec2 up`` launches."""

    name: str
    count: int = 1
    instance_type: str = "c5.xlarge"
    spot: bool = False
    region: str | None = None
    image_parameter: str = DEFAULT_IMAGE_PARAMETER
    allow_cidr: str | None = None
    ssh: bool = False
    idle_shutdown_s: float = 30 * 60
    max_lifetime_s: float = 12 * 3600
    install: str = f"deathstar=={__version__}"
    port: int = config.DEFAULT_PORT
    key_name: str | None = None  # an EC2 key pair, for --ssh


@dataclass
class Instance:
    """One instance of a cluster, as listed."""

    cluster: str
    id: str
    type: str
    state: str
    spot: bool
    address: str
    launched: float  # epoch seconds
    tags: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------ AWS access


class Aws:
    """boto3 clients for one region, with AWS errors turned into ``Ec2Error``."""

    def __init__(self, region: str | None):
        try:
            import boto3
            import botocore.exceptions
        except ImportError:
            raise Ec2Error("the ec2 commands need boto3: pip install 'deathstar[ec2]'",
                           EXIT_NO_BOTO3) from None
        self.botocore_exceptions = botocore.exceptions
        session = boto3.session.Session(region_name=region)
        self.region = session.region_name
        if not self.region:
            raise Ec2Error("no AWS region: pass --region or set AWS_DEFAULT_REGION",
                           EXIT_REGION)
        known = set(session.get_available_regions("ec2"))
        if known and self.region not in known:
            raise Ec2Error(f"unknown AWS region {self.region!r}", EXIT_REGION)
        if session.get_credentials() is None:
            raise Ec2Error("no AWS credentials: configure them (aws configure, "
                           "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or an instance role)",
                           EXIT_NO_CREDENTIALS)
        self.ec2 = session.client("ec2")
        self.ssm = session.client("ssm")

    def call(self, client: Any, operation: str, **kwargs: Any) -> Any:
        try:
            return getattr(client, operation)(**kwargs)
        except self.botocore_exceptions.NoCredentialsError:
            raise Ec2Error("no AWS credentials", EXIT_NO_CREDENTIALS) from None
        except self.botocore_exceptions.ClientError as exc:
            raise translate(exc) from None
        except self.botocore_exceptions.EndpointConnectionError as exc:
            raise Ec2Error(f"cannot reach AWS in {self.region}: {exc}", EXIT_REGION) from None


def translate(exc: Any) -> Ec2Error:
    """A botocore ClientError as a one-line Ec2Error with its exit code."""
    error = exc.response.get("Error", {})
    code, message = error.get("Code", ""), error.get("Message", str(exc))
    if code in ("InstanceLimitExceeded", "VcpuLimitExceeded", "MaxSpotInstanceCountExceeded",
                "InsufficientInstanceCapacity", "RequestLimitExceeded"):
        return Ec2Error(f"AWS capacity or quota: {code}: {message}", EXIT_QUOTA)
    if code in ("Unsupported", "InvalidInstanceType") or "instance type" in message.lower():
        return Ec2Error(f"instance type not available: {code}: {message}",
                        EXIT_TYPE_NOT_OFFERED)
    if code in ("AuthFailure", "UnrecognizedClientException", "InvalidClientTokenId"):
        return Ec2Error(f"AWS refused the credentials: {message}", EXIT_NO_CREDENTIALS)
    return Ec2Error(f"AWS error {code}: {message}", EXIT_AWS)


# ------------------------------------------------------------------------ keys and user-data


def make_cluster_keys(name: str) -> tuple[bytes, bytes]:
    """The cluster's node keypair, made once and kept (0600) so a retried ``up`` and the
    client agree on it."""
    folder = cluster_dir(name)
    secret = folder / "node.key_secret"
    if not secret.exists():
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        public_file, secret_file = zmq.auth.create_certificates(str(folder), "node")
        os.chmod(secret_file, 0o600)
    public, secret_key = zmq.auth.load_certificate(str(secret))
    assert secret_key is not None
    return public, secret_key


def client_public_key(key_folder: str | Path | None) -> bytes:
    """The user's client public key, making the default keys first if there are none."""
    folder = keys.resolve_dir(key_folder, keys.CLIENT)
    if folder is None:
        folder = keys.default_dir()
        keys.keygen(folder)
    return keys.load_client_keys(folder).public


def daemon_command(opts: UpOptions, keys_dir: str = KEYS_ON_NODE,
                   host: str = "0.0.0.0", python: str = "/opt/deathstar/bin/python"
                   ) -> list[str]:
    """The daemon's command line on a node (the systemd ExecStart)."""
    return [python, "-m", "deathstar", "daemon", "--host", host, "--port", str(opts.port),
            "--keys", keys_dir, "--idle-shutdown", f"{opts.idle_shutdown_s:g}",
            "--max-lifetime", f"{opts.max_lifetime_s:g}"]


def _certificate(public: bytes, secret: bytes | None) -> str:
    lines = ["#   ****  Generated by deathstar ec2 up  ****", "metadata", "curve",
             f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def render_user_data(opts: UpOptions, node_public: bytes, node_secret: bytes,
                     client_public: bytes, python_minor: str | None = None) -> str:
    """The cloud-config that installs deathstar (same version, same Python minor as the
    client: pickles do not cross Python minors), writes the node's keys and starts the
    daemon as a systemd service that powers the instance off when the daemon stops by
    itself (idle or lifetime) - with shutdown behaviour terminate, that ends the bill."""
    python_minor = python_minor or f"{sys.version_info.major}.{sys.version_info.minor}"
    command = " ".join(daemon_command(opts))
    unit = "\n".join([
        "[Unit]", "Description=deathstar daemon", "After=network-online.target",
        "Wants=network-online.target", "", "[Service]", f"ExecStart={command}",
        "Restart=on-failure", "RestartSec=2",
        # a clean exit is the dead-man's switch (idle, lifetime): power off
        "ExecStopPost=/bin/sh -c 'test \"$SERVICE_RESULT\" = success && systemctl poweroff'",
        "", "[Install]", "WantedBy=multi-user.target", ""])
    files = [
        (f"{KEYS_ON_NODE}/node.key", _certificate(node_public, None), "0644"),
        (f"{KEYS_ON_NODE}/node.key_secret", _certificate(node_public, node_secret), "0600"),
        (f"{KEYS_ON_NODE}/authorized/client.key", _certificate(client_public, None), "0644"),
        ("/etc/systemd/system/deathstar.service", unit, "0644"),
    ]
    body = ["#cloud-config", "write_files:"]
    for path, content, mode in files:
        body += [f"  - path: {path}", f"    permissions: '{mode}'", "    content: |"]
        body += [f"      {line}" for line in content.rstrip("\n").split("\n")]
    body += [
        "runcmd:",
        f"  - [chmod, '0700', {KEYS_ON_NODE}, {KEYS_ON_NODE}/authorized]",
        f"  - [sh, -c, 'dnf install -y python{python_minor} || apt-get install -y "
        f"python{python_minor}-venv']",
        f"  - [python{python_minor}, -m, venv, /opt/deathstar]",
        f"  - [/opt/deathstar/bin/pip, install, '{opts.install}']",
        "  - [systemctl, daemon-reload]",
        "  - [systemctl, enable, --now, deathstar.service]",
    ]
    text = "\n".join(body) + "\n"
    if len(text.encode()) > USER_DATA_LIMIT:
        raise Ec2Error(f"user-data is {len(text.encode())} bytes, over EC2's "
                       f"{USER_DATA_LIMIT}", EXIT_AWS)
    return text


# ------------------------------------------------------------------------ finding


def _tags(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def find_instances(aws: Aws, name: str | None = None,
                   states: list[str] | None = None) -> list[Instance]:
    """Instances tagged by deathstar (of cluster ``name``, or all), in ``states``."""
    filters = [{"Name": "tag-key", "Values": [TAG_CLUSTER]},
               {"Name": "instance-state-name", "Values": states or LIVE_STATES + ["running"]}]
    if name is not None:
        filters.append({"Name": f"tag:{TAG_CLUSTER}", "Values": [name]})
    found = []
    token: dict[str, Any] = {}
    while True:
        page = aws.call(aws.ec2, "describe_instances", Filters=filters, **token)
        for reservation in page.get("Reservations", []):
            for inst in reservation.get("Instances", []):
                tags = _tags(inst)
                launched = inst.get("LaunchTime")
                found.append(Instance(
                    tags.get(TAG_CLUSTER, "?"), inst["InstanceId"], inst.get("InstanceType", ""),
                    inst.get("State", {}).get("Name", ""),
                    inst.get("InstanceLifecycle") == "spot",
                    inst.get("PublicIpAddress") or inst.get("PrivateIpAddress") or "",
                    launched.timestamp() if launched is not None else 0.0, tags))
        if not page.get("NextToken"):
            return sorted(found, key=lambda i: (i.cluster, i.id))
        token = {"NextToken": page["NextToken"]}


def cluster_nodes(spec: str) -> list[NodeAddress]:
    """``NAME`` or ``NAME@region`` -> the running instances' nodes, each with the cluster's
    node public key. Raises ClusterSpecError when there are none."""
    name, _, region = spec.partition("@")
    try:
        aws = Aws(region or None)
        running = find_instances(aws, name, ["running"])
    except Ec2Error as exc:
        raise ClusterSpecError(f"ec2:{spec}: {exc}") from None
    if not running:
        raise ClusterSpecError(f"ec2:{spec}: no running instance is tagged "
                               f"{TAG_CLUSTER}={name}")
    public_file = cluster_dir(name) / "node.key"
    server_key = zmq.auth.load_certificate(str(public_file))[0] if public_file.exists() else None
    port = int(running[0].tags.get("deathstar:port", config.DEFAULT_PORT))
    return [NodeAddress(f"{i.address}:{port}", i.address, port, server_key)
            for i in running if i.address]


# ------------------------------------------------------------------------ up


def _default_vpc(aws: Aws) -> str:
    vpcs = aws.call(aws.ec2, "describe_vpcs",
                    Filters=[{"Name": "isDefault", "Values": ["true"]}]).get("Vpcs", [])
    if not vpcs:
        raise Ec2Error(f"no default VPC in {aws.region}: create one (aws ec2 "
                       "create-default-vpc) or use another region", EXIT_NO_DEFAULT_VPC)
    return str(vpcs[0]["VpcId"])


def _check_type_offered(aws: Aws, instance_type: str) -> None:
    offers = aws.call(aws.ec2, "describe_instance_type_offerings",
                      Filters=[{"Name": "instance-type", "Values": [instance_type]}])
    if not offers.get("InstanceTypeOfferings"):
        raise Ec2Error(f"instance type {instance_type} is not offered in {aws.region}",
                       EXIT_TYPE_NOT_OFFERED)


def _tag_spec(resource: str, name: str, extra: dict[str, str] | None = None
              ) -> dict[str, Any]:
    tags = {TAG_CLUSTER: name, TAG_VERSION: __version__, "Name": f"deathstar-{name}",
            **(extra or {})}
    return {"ResourceType": resource, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}


def security_group(aws: Aws, opts: UpOptions, vpc: str) -> str:
    """Create (or reuse) the cluster's security group: exec/status/worker ports from
    ``allow_cidr`` only, everything between the cluster's own instances, SSH only when
    asked. Never open to the world by default."""
    group_name = f"deathstar-{opts.name}"
    existing = aws.call(aws.ec2, "describe_security_groups", Filters=[
        {"Name": "group-name", "Values": [group_name]}, {"Name": "vpc-id", "Values": [vpc]}])
    if existing.get("SecurityGroups"):
        return str(existing["SecurityGroups"][0]["GroupId"])
    assert opts.allow_cidr is not None
    group = aws.call(aws.ec2, "create_security_group", GroupName=group_name, VpcId=vpc,
                     Description=f"deathstar cluster {opts.name}",
                     TagSpecifications=[_tag_spec("security-group", opts.name)])
    group_id = str(group["GroupId"])
    rules = [{"IpProtocol": "tcp", "FromPort": opts.port, "ToPort": opts.port + 2,
              "IpRanges": [{"CidrIp": opts.allow_cidr, "Description": "deathstar client"}]},
             {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id}]}]
    if opts.ssh:
        rules.append({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                      "IpRanges": [{"CidrIp": opts.allow_cidr, "Description": "ssh"}]})
    try:
        aws.call(aws.ec2, "authorize_security_group_ingress", GroupId=group_id,
                 IpPermissions=rules)
    except Ec2Error:
        aws.call(aws.ec2, "delete_security_group", GroupId=group_id)
        raise
    return group_id


def client_token(opts: UpOptions) -> str:
    """Same request, same token: a retried ``up`` cannot launch twice."""
    digest = hashlib.sha256(json.dumps([opts.name, opts.count, opts.instance_type, opts.spot,
                                        opts.image_parameter], sort_keys=True).encode())
    return f"deathstar-{opts.name}-{digest.hexdigest()[:24]}"[:64]


def up(opts: UpOptions, key_folder: str | Path | None = None, aws: Aws | None = None
       ) -> list[Instance]:
    """Launch the cluster (or return it when it is already up). Returns its instances.

    Raises Ec2Error (with its exit code); on a failure after the security group was made,
    the group is removed again (instances are only ever made all at once, tagged)."""
    if opts.allow_cidr is None:
        raise Ec2Error("say who may reach the nodes: --allow-cidr YOUR.ADDRESS/32 "
                       "(your address could not be found)", EXIT_NO_ADDRESS)
    aws = aws or Aws(opts.region)
    existing = find_instances(aws, opts.name, ["pending", "running"])
    if existing:
        return existing
    _check_type_offered(aws, opts.instance_type)
    image = aws.call(aws.ssm, "get_parameter", Name=opts.image_parameter)["Parameter"]["Value"]
    node_public, node_secret = make_cluster_keys(opts.name)
    user_data = render_user_data(opts, node_public, node_secret, client_public_key(key_folder))
    vpc = _default_vpc(aws)
    group_id = security_group(aws, opts, vpc)
    extra_tags = {"deathstar:port": str(opts.port)}
    request: dict[str, Any] = dict(
        ImageId=image, InstanceType=opts.instance_type, MinCount=opts.count,
        MaxCount=opts.count, UserData=user_data, SecurityGroupIds=[group_id],
        InstanceInitiatedShutdownBehavior="terminate", ClientToken=client_token(opts),
        TagSpecifications=[_tag_spec("instance", opts.name, extra_tags),
                           _tag_spec("volume", opts.name)])
    if opts.spot:
        request["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
            "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
    if opts.key_name:
        request["KeyName"] = opts.key_name
    try:
        aws.call(aws.ec2, "run_instances", **request)
    except Ec2Error:
        _delete_group(aws, group_id, deadline_s=30)
        raise
    return find_instances(aws, opts.name, ["pending", "running"])


def watch(opts: UpOptions, deadline_s: float, probe: bool = True,
          interval_s: float = 3.0) -> Iterator[list[dict[str, Any]]]:
    """Yield the cluster's rows (instance, state, address, daemon) until every instance's
    daemon answers on its status port (or, with ``probe`` False, is running); raises
    Ec2Error at the deadline."""
    aws = Aws(opts.region)
    deadline = time.monotonic() + deadline_s
    server_key = make_cluster_keys(opts.name)[0]
    while True:
        instances = find_instances(aws, opts.name, ["pending", "running"])
        rows = [{"id": i.id, "state": i.state, "address": i.address, "daemon": ""}
                for i in instances]
        running = [r for r in rows if r["state"] == "running" and r["address"]]
        if probe and running:
            nodes = [NodeAddress(f"{r['address']}:{opts.port}", r["address"], opts.port,
                                 server_key) for r in running]
            for row, status in zip(running, query_status(nodes, timeout=2.0)):
                row["daemon"] = "up" if not status["error"] else "starting"
        yield rows
        ready = rows and all(r["state"] == "running" and (not probe or r["daemon"] == "up")
                             for r in rows)
        if ready:
            return
        if time.monotonic() > deadline:
            raise Ec2Error(f"cluster {opts.name} not ready within {deadline_s:g} s "
                           "(it is still up: 'deathstar ec2 down' to remove it)", EXIT_AWS)
        time.sleep(interval_s)  # polling AWS: no event to wait on


# ------------------------------------------------------------------------ down


def _delete_group(aws: Aws, group_id: str, deadline_s: float) -> bool:
    """Delete a security group, retrying while instances still hold it."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            aws.call(aws.ec2, "delete_security_group", GroupId=group_id)
            return True
        except Ec2Error as exc:
            if "InvalidGroup.NotFound" in str(exc):
                return True
            if "DependencyViolation" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(5)  # AWS frees the group only once the instances are gone


def down(name: str, region: str | None = None, wait_s: float = 600.0) -> dict[str, Any]:
    """Terminate every instance of the cluster (pending, running, stopping, stopped),
    wait for them, delete its security groups. Idempotent: nothing left is fine."""
    aws = Aws(region)
    instances = find_instances(aws, name, LIVE_STATES)
    ids = [i.id for i in instances if i.state != "shutting-down"]
    if ids:
        aws.call(aws.ec2, "terminate_instances", InstanceIds=ids)
    all_ids = [i.id for i in instances]
    if all_ids:
        waiter = aws.ec2.get_waiter("instance_terminated")
        try:
            waiter.wait(InstanceIds=all_ids, WaiterConfig={"Delay": 5,
                                                           "MaxAttempts": int(wait_s / 5)})
        except Exception as exc:  # botocore WaiterError
            raise Ec2Error(f"instances of {name} did not terminate in time: {exc}") from None
    groups = aws.call(aws.ec2, "describe_security_groups", Filters=[
        {"Name": f"tag:{TAG_CLUSTER}", "Values": [name]}]).get("SecurityGroups", [])
    for group in groups:
        _delete_group(aws, group["GroupId"], deadline_s=wait_s)
    shutil.rmtree(cluster_dir(name), ignore_errors=True)
    return {"cluster": name, "terminated": all_ids,
            "security_groups": [g["GroupId"] for g in groups]}


def find_caller_cidr(url: str | None = None, timeout_s: float = 3.0) -> str | None:
    """The caller's public address as a /32, asked of ``DEATHSTAR_CHECKIP_URL`` (default
    AWS's checkip service); None when it cannot be found."""
    import ipaddress
    import urllib.request

    url = url or os.environ.get("DEATHSTAR_CHECKIP_URL", "https://checkip.amazonaws.com")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310
            address = ipaddress.ip_address(response.read(64).decode().strip())
    except (OSError, ValueError):
        return None
    return f"{address}/{32 if address.version == 4 else 128}"

