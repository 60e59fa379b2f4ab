"""EC2 clusters: launch tagged instances that boot this very deathstar from the node bundle
and run a keyed daemon, find them again by tag (from any machine), and tear them down.

Everything made carries ``deathstar:cluster=NAME`` and ``deathstar:version`` from its
creation (TagSpecifications), so a crash half-way leaves nothing untagged and ``down`` finds
it all. ``up`` builds the node bundle first (before anything exists in AWS), uploads it to
the account's bundle bucket (``deploy.s3``), and launches each node with its own user-data
(``deploy.ec2_boot``): presigned URLs to fetch the bundle and to report back. Each node
makes its own keypair and reports its public key; nodes hold no AWS credentials. The user's
client public key goes to the nodes in user-data, so the nodes serve this user only.
boto3 is imported lazily (the ``ec2`` extra).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from deathstar import config, keys
from deathstar._version import __version__
from deathstar.client.status import query_status
from deathstar.deploy.aws import (EXIT_AWS, EXIT_BUNDLE, EXIT_NO_ADDRESS, EXIT_NO_BOTO3,
                                  EXIT_NO_CREDENTIALS, EXIT_NO_DEFAULT_VPC,
                                  EXIT_NODE_FAILED, EXIT_QUOTA, EXIT_REGION,
                                  EXIT_TYPE_NOT_OFFERED, EXIT_USAGE, Aws, Ec2Error,
                                  translate)
from deathstar.deploy import ec2_network
from deathstar.deploy.bundle import Bundle, build_bundle
from deathstar.deploy.ec2_network import Network, find_caller_cidr
from deathstar.deploy.ec2_boot import (DEFAULT_IMAGE_PARAMETER, KEYS_ON_NODE,
                                       USER_DATA_LIMIT, VENV, BootPlan, daemon_command,
                                       render_user_data)
from deathstar.deploy.provider import BadClusterName, check_name, cluster_dir
from deathstar.deploy.wheels import BundleError
from deathstar.deploy.s3 import BundleBucket, NodeReport
from deathstar.nodes import ClusterSpecError, NodeAddress

__all__ = ["Aws", "BadClusterName", "BootPlan", "DEFAULT_IMAGE_PARAMETER", "Ec2Error",
           "Instance", "NodeReport", "UpOptions", "check_name", "cluster_dir",
           "cluster_nodes", "daemon_command", "down", "find_caller_cidr", "find_instances", "node_addresses", "node_platform",
           "node_reports", "render_user_data", "translate", "up", "watch", "EXIT_AWS",
           "EXIT_BUNDLE", "EXIT_NO_ADDRESS", "EXIT_NO_BOTO3", "EXIT_NO_CREDENTIALS",
           "EXIT_NO_DEFAULT_VPC", "EXIT_NODE_FAILED", "EXIT_QUOTA", "EXIT_REGION",
           "EXIT_TYPE_NOT_OFFERED", "EXIT_USAGE", "KEYS_ON_NODE", "TAG_NODE",
           "USER_DATA_LIMIT"]

TAG_CLUSTER = "deathstar:cluster"
TAG_VERSION = "deathstar:version"
TAG_PORT = "deathstar:port"
TAG_NODE = "deathstar:node"  # LAUNCH-SLOT: which report object is this instance's
#: Amazon Linux 2023 has glibc 2.34: its nodes run manylinux_2_34 (and older) wheels.
DEFAULT_GLIBC = "2_34"
LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]


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
    yes_world: bool = False  # allow_cidr may be a /0
    ssh: bool = False
    idle_shutdown_s: float = 30 * 60
    max_lifetime_s: float = 12 * 3600
    pip: list[str] = field(default_factory=list)  # --pip SPEC, bundled
    requirements: str | None = None  # --requirements FILE, bundled
    install: str | None = None  # a pip requirement from the index instead of the bundle
    port: int = config.DEFAULT_PORT
    key_name: str | None = None  # an EC2 key pair, for --ssh
    platform: str | None = None  # the nodes' wheel platform [default: node_platform()]
    python: str | None = None  # the nodes' CPython minor [default: the client's]


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


def node_platform(opts: UpOptions) -> str:
    """The wheel platform of ``opts``' nodes: given, else manylinux (Amazon Linux 2023's
    glibc) for the image's architecture."""
    if opts.platform:
        return opts.platform
    arch = "aarch64" if "arm64" in opts.image_parameter else "x86_64"
    return f"manylinux_{DEFAULT_GLIBC}_{arch}"


def client_public_key(key_folder: str | Path | None) -> bytes:
    """The user's client public key, making the default keys first if there are none."""
    folder = keys.resolve_dir(key_folder, keys.CLIENT)
    if folder is None:
        folder = keys.default_dir()
        keys.keygen(folder)
    return keys.load_client_keys(folder).public


def check_allow_cidr(opts: UpOptions) -> Network:
    """``opts.allow_cidr`` parsed; Ec2Error when missing, malformed, or /0 without
    ``yes_world``."""
    return ec2_network.check_allow_cidr(opts.allow_cidr, opts.yes_world, opts.ssh)


def security_group(aws: Aws, opts: UpOptions, vpc: str) -> str:
    """The cluster's security group, created or reconciled to what ``up`` makes."""
    return ec2_network.security_group(aws, opts.name, check_allow_cidr(opts), opts.port,
                                      opts.ssh, vpc, _tag_spec("security-group", opts.name))


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


def node_addresses(instances: list[Instance], reports: dict[str, NodeReport]
                   ) -> list[NodeAddress]:
    """The nodes among ``instances`` that reported ready, each with its own public key."""
    nodes = []
    for inst in instances:
        report = reports.get(inst.tags.get(TAG_NODE, ""))
        if inst.address and report is not None and report.state == "ready":
            port = int(inst.tags.get(TAG_PORT, config.DEFAULT_PORT))
            nodes.append(NodeAddress(f"{inst.address}:{port}", inst.address, port,
                                     report.detail.encode()))
    return nodes


def cluster_nodes(spec: str) -> list[NodeAddress]:
    """``NAME`` or ``NAME@region`` -> the running instances that reported ready, each with
    the public key it made for itself. Raises ClusterSpecError when there are none."""
    name, _, region = spec.partition("@")
    check_name(name)
    try:
        aws = Aws(region or None)
        running = find_instances(aws, name, ["running"])
        reports = BundleBucket(aws).reports(name) if running else {}
    except Ec2Error as exc:
        raise ClusterSpecError(f"ec2:{spec}: {exc}") from None
    if not running:
        raise ClusterSpecError(f"ec2:{spec}: no running instance is tagged "
                               f"{TAG_CLUSTER}={name}")
    nodes = node_addresses(running, reports)
    if not nodes:
        raise ClusterSpecError(f"ec2:{spec}: {len(running)} running instance(s), none has "
                               "reported its key yet (still booting, or failed: see "
                               "'deathstar ec2 list')")
    return nodes


# ------------------------------------------------------------------------ up


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


def client_token(opts: UpOptions, launch: str, slot: int) -> str:
    """One token per node of one ``up``: botocore's retries of a call cannot launch twice."""
    digest = hashlib.sha256(json.dumps([opts.name, opts.count, opts.instance_type, opts.spot,
                                        opts.image_parameter], sort_keys=True).encode())
    return f"ds-{digest.hexdigest()[:16]}-{launch}-{slot}-{opts.name}"[:64]


def _bundle(opts: UpOptions) -> Bundle | None:
    """The node bundle for ``opts``' nodes (None with ``install``); Ec2Error naming the
    package, platform and Python when a wheel cannot be had."""
    if opts.install is not None:
        return None
    try:
        return build_bundle(node_platform(opts), _python(opts), pip=opts.pip,
                            requirements=opts.requirements)
    except BundleError as exc:
        raise Ec2Error(f"cannot build the node bundle (nothing was launched): {exc}",
                       EXIT_BUNDLE) from None


def _python(opts: UpOptions) -> str:
    return opts.python or f"{sys.version_info.major}.{sys.version_info.minor}"


def up(opts: UpOptions, key_folder: str | Path | None = None, aws: Aws | None = None
       ) -> list[Instance]:
    """Launch the cluster (or return it when it is already up). Returns its instances.

    Order: checks, the bundle (a missing wheel stops here, before anything exists in
    AWS), the bucket and upload, the security group, then one RunInstances per node (each
    with its own report URL). Raises Ec2Error (with its exit code); on a failure after
    something was made, what this call made is removed again."""
    try:
        check_name(opts.name)
    except ClusterSpecError as exc:
        raise Ec2Error(str(exc), EXIT_USAGE) from None
    check_allow_cidr(opts)
    aws = aws or Aws(opts.region)
    existing = find_instances(aws, opts.name, ["pending", "running"])
    if existing:
        return existing
    _check_type_offered(aws, opts.instance_type)
    image = aws.call(aws.ssm, "get_parameter", Name=opts.image_parameter)["Parameter"]["Value"]
    bundle = _bundle(opts)
    client_public = client_public_key(key_folder)
    bucket = BundleBucket(aws)
    bucket.ensure()
    launched: list[str] = []
    group_id = None
    try:
        key = bucket.upload(bundle, opts.name) if bundle is not None else ""
        group_id = security_group(aws, opts, ec2_network.default_vpc(aws))
        launch = secrets.token_hex(4)
        for slot in range(opts.count):
            plan = BootPlan(
                python=_python(opts), client_public=client_public,
                report_url=bucket.report_url(opts.name, launch, slot),
                bundle_url=bucket.download_url(key) if bundle else "",
                archive_sha256=bundle.archive_sha256 if bundle else "",
                install_command=bundle.install_command(VENV, f"python{_python(opts)}")
                if bundle else "", install=opts.install,
                port=opts.port, idle_shutdown_s=opts.idle_shutdown_s,
                max_lifetime_s=opts.max_lifetime_s)
            launched.append(_run_instance(aws, opts, image, group_id, plan, launch, slot))
    except Ec2Error:
        _undo(aws, bucket, opts.name, launched, group_id)
        raise
    return find_instances(aws, opts.name, ["pending", "running"])


def _run_instance(aws: Aws, opts: UpOptions, image: str, group_id: str, plan: BootPlan,
                  launch: str, slot: int) -> str:
    """Launch node ``slot``; its instance id."""
    try:
        user_data = render_user_data(plan)
    except ValueError as exc:
        raise Ec2Error(str(exc), EXIT_AWS) from None
    tags = {TAG_PORT: str(opts.port), TAG_NODE: f"{launch}-{slot}"}
    request: dict[str, Any] = dict(
        ImageId=image, InstanceType=opts.instance_type, MinCount=1, MaxCount=1,
        UserData=user_data, SecurityGroupIds=[group_id],
        InstanceInitiatedShutdownBehavior="terminate",
        ClientToken=client_token(opts, launch, slot),
        # IMDSv2 only, and no hop beyond the instance (nothing on it needs the service)
        MetadataOptions={"HttpTokens": "required", "HttpPutResponseHopLimit": 1,
                         "HttpEndpoint": "enabled"},
        TagSpecifications=[_tag_spec("instance", opts.name, tags),
                           _tag_spec("volume", opts.name)])
    if opts.spot:
        request["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
            "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
    if opts.key_name:
        request["KeyName"] = opts.key_name
    reply = aws.call(aws.ec2, "run_instances", **request)
    return str(reply["Instances"][0]["InstanceId"])


def _undo(aws: Aws, bucket: BundleBucket, name: str, instance_ids: list[str],
          group_id: str | None) -> None:
    """Remove what a failed ``up`` made: its instances, its group, its objects."""
    if instance_ids:
        aws.call(aws.ec2, "terminate_instances", InstanceIds=instance_ids)
        _wait_terminated(aws, name, instance_ids, 600.0)
    if group_id is not None:
        ec2_network.delete_group(aws, group_id, deadline_s=600.0)
    bucket.forget(name)


def watch(opts: UpOptions, deadline_s: float, probe: bool = True,
          interval_s: float = 3.0) -> Iterator[list[dict[str, Any]]]:
    """Yield the cluster's rows (instance, state, address, daemon) until every node
    reported ready and its daemon answers on its status port with the key it reported
    (with ``probe`` False: until every instance is running). A node that reported a failed
    boot ends the wait: Ec2Error (EXIT_NODE_FAILED) naming it and its reason. Ec2Error at
    the deadline too."""
    aws = Aws(opts.region)
    bucket = BundleBucket(aws)
    deadline = time.monotonic() + deadline_s
    while True:
        instances = find_instances(aws, opts.name, ["pending", "running"])
        reports = bucket.reports(opts.name)
        rows = [_row(i, reports.get(i.tags.get(TAG_NODE, ""))) for i in instances]
        if probe:
            ready = {n.host: n for n in node_addresses(
                [i for i in instances if i.state == "running"], reports)}
            probed = [r for r in rows if r["address"] in ready]
            statuses = query_status([ready[r["address"]] for r in probed], timeout=2.0) \
                if probed else []
            for row, status in zip(probed, statuses):
                row["daemon"] = "up" if not status["error"] else "starting"
        yield rows
        failed = [r for r in rows if r["daemon"].startswith("failed")]
        if failed:
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise Ec2Error(f"node {failed[0]['id']} of {opts.name}: boot {failed[0]['daemon']}"
                           f"{more} (the cluster is still up: 'deathstar ec2 down --name "
                           f"{opts.name}')", EXIT_NODE_FAILED)
        if rows and all(r["state"] == "running" and (not probe or r["daemon"] == "up")
                        for r in rows):
            return
        if time.monotonic() > deadline:
            raise Ec2Error(f"cluster {opts.name} not ready within {deadline_s:g} s "
                           "(it is still up: 'deathstar ec2 down' to remove it)", EXIT_AWS)
        time.sleep(interval_s)  # polling AWS: no event to wait on


def _row(inst: Instance, report: NodeReport | None) -> dict[str, Any]:
    daemon = "" if report is None else (
        "started" if report.state == "ready" else f"failed: {report.detail}")
    return {"id": inst.id, "state": inst.state, "address": inst.address, "daemon": daemon}


def node_reports(aws: Aws, name: str) -> dict[str, NodeReport]:
    """Instance id -> what that node of cluster ``name`` reported (nodes that did)."""
    reports = BundleBucket(aws).reports(name)
    return {i.id: reports[i.tags[TAG_NODE]] for i in find_instances(aws, name, LIVE_STATES)
            if i.tags.get(TAG_NODE) in reports}


# ------------------------------------------------------------------------ down


def _wait_terminated(aws: Aws, name: str, ids: list[str], wait_s: float) -> None:
    """Poll until every instance of ``ids`` is terminated (often seconds, at most
    ``wait_s``); Ec2Error past that."""
    deadline = time.monotonic() + wait_s
    delay = 0.5
    while True:
        page = aws.call(aws.ec2, "describe_instances", InstanceIds=ids)
        states = [i["State"]["Name"] for r in page.get("Reservations", [])
                  for i in r["Instances"]]
        if all(state == "terminated" for state in states):
            return
        if time.monotonic() > deadline:
            raise Ec2Error(f"instances of {name} did not terminate within {wait_s:g} s "
                           f"(states: {', '.join(sorted(set(states)))})")
        time.sleep(delay)  # polling AWS: no event to wait on
        delay = min(delay * 2, 5.0)


def down(name: str, region: str | None = None, wait_s: float = 600.0) -> dict[str, Any]:
    """Terminate every instance of the cluster (pending, running, stopping, stopped),
    wait for them, delete its security groups, its objects in the bundle bucket (and its
    bundle when no other cluster uses it) and its local state folder. Idempotent: nothing
    left is fine. A name that is not a plain word is refused before anything is done."""
    try:
        folder = cluster_dir(name)
    except ClusterSpecError as exc:
        raise Ec2Error(str(exc), EXIT_USAGE) from None
    aws = Aws(region)
    instances = find_instances(aws, name, LIVE_STATES)
    ids = [i.id for i in instances if i.state != "shutting-down"]
    if ids:
        aws.call(aws.ec2, "terminate_instances", InstanceIds=ids)
    all_ids = [i.id for i in instances]
    if all_ids:
        _wait_terminated(aws, name, all_ids, wait_s)
    groups = aws.call(aws.ec2, "describe_security_groups", Filters=[
        {"Name": f"tag:{TAG_CLUSTER}", "Values": [name]}]).get("SecurityGroups", [])
    for group in groups:
        ec2_network.delete_group(aws, group["GroupId"], deadline_s=wait_s)
    objects = BundleBucket(aws).forget(name)
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder)
    return {"cluster": name, "terminated": all_ids,
            "security_groups": [g["GroupId"] for g in groups], "objects": objects}
