"""The network side of an EC2 cluster: who may reach the nodes (``--allow-cidr``), and the
cluster's security group, created with exactly the rules ``up`` means or reconciled to them.
"""

from __future__ import annotations

import ipaddress
import os
import time
from typing import Any

from deathstar.deploy.aws import EXIT_NO_ADDRESS, EXIT_NO_DEFAULT_VPC, EXIT_USAGE, Aws, Ec2Error
from deathstar.deploy.provider import check_name

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Rule = tuple[str, Any, Any, str, str]  # protocol, from, to, "cidr"/"cidr6"/"group", value


def check_allow_cidr(allow_cidr: str | None, yes_world: bool = False, ssh: bool = False
                     ) -> Network:
    """The parsed ``allow_cidr``; Ec2Error when it is missing, malformed, or the whole
    world (a /0) without ``yes_world``."""
    if allow_cidr is None:
        raise Ec2Error("say who may reach the nodes: --allow-cidr YOUR.ADDRESS/32 "
                       "(your address could not be found)", EXIT_NO_ADDRESS)
    try:
        network = ipaddress.ip_network(allow_cidr, strict=False)
    except ValueError:
        raise Ec2Error(f"--allow-cidr {allow_cidr!r} is not an address range such as "
                       "203.0.113.7/32", EXIT_USAGE) from None
    if network.prefixlen == 0 and not yes_world:
        what = "the daemon ports and SSH" if ssh else "the daemon ports"
        raise Ec2Error(f"--allow-cidr {allow_cidr} opens {what} to the whole internet; "
                       "give your own address range, or add --yes-world if you mean it",
                       EXIT_USAGE)
    return network


def default_vpc(aws: Aws) -> str:
    """The region's default VPC; Ec2Error (EXIT_NO_DEFAULT_VPC) when there is none."""
    vpcs = aws.call(aws.ec2, "describe_vpcs",
                    Filters=[{"Name": "isDefault", "Values": ["true"]}]).get("Vpcs", [])
    if not vpcs:
        raise Ec2Error(f"no default VPC in {aws.region}: create one (aws ec2 "
                       "create-default-vpc) or use another region", EXIT_NO_DEFAULT_VPC)
    return str(vpcs[0]["VpcId"])


def wanted_rules(network: Network, port: int, ssh: bool, group_id: str) -> set[Rule]:
    """The ingress ``up`` gives a cluster: exec/status/worker ports from ``network``
    only, everything between the cluster's own instances, SSH only when asked."""
    kind = "cidr" if network.version == 4 else "cidr6"
    rules: set[Rule] = {("tcp", port, port + 2, kind, str(network)),
                        ("-1", None, None, "group", group_id)}
    if ssh:
        rules.add(("tcp", 22, 22, kind, str(network)))
    return rules


def _flat(permissions: list[dict[str, Any]]) -> set[Rule]:
    out: set[Rule] = set()
    for p in permissions:
        proto = str(p.get("IpProtocol"))
        low, high = (None, None) if proto == "-1" else (p.get("FromPort"), p.get("ToPort"))
        out |= {(proto, low, high, "cidr", r["CidrIp"]) for r in p.get("IpRanges", [])}
        out |= {(proto, low, high, "cidr6", r["CidrIpv6"]) for r in p.get("Ipv6Ranges", [])}
        out |= {(proto, low, high, "group", g["GroupId"])
                for g in p.get("UserIdGroupPairs", [])}
        out |= {(proto, low, high, "prefix", x["PrefixListId"])
                for x in p.get("PrefixListIds", [])}
    return out


def _permissions(rules: set[Rule]) -> list[dict[str, Any]]:
    out = []
    for proto, low, high, kind, value in sorted(rules, key=str):
        p: dict[str, Any] = {"IpProtocol": proto}
        if low is not None:
            p.update(FromPort=low, ToPort=high)
        p.update({"cidr": {"IpRanges": [{"CidrIp": value}]},
                  "cidr6": {"Ipv6Ranges": [{"CidrIpv6": value}]},
                  "group": {"UserIdGroupPairs": [{"GroupId": value}]},
                  "prefix": {"PrefixListIds": [{"PrefixListId": value}]}}[kind])
        out.append(p)
    return out


def security_group(aws: Aws, name: str, network: Network, port: int, ssh: bool, vpc: str,
                   tag_spec: dict[str, Any]) -> str:
    """Create cluster ``name``'s group ``deathstar-NAME`` with ``wanted_rules`` (tagged
    with ``tag_spec``), or reconcile an existing one to them: rules it should not have
    are revoked, missing ones added. Returns its id."""
    group_name = f"deathstar-{check_name(name)}"
    existing = aws.call(aws.ec2, "describe_security_groups", Filters=[
        {"Name": "group-name", "Values": [group_name]}, {"Name": "vpc-id", "Values": [vpc]}])
    if existing.get("SecurityGroups"):
        group = existing["SecurityGroups"][0]
        group_id = str(group["GroupId"])
        have = _flat(group.get("IpPermissions", []))
        want = wanted_rules(network, port, ssh, group_id)
        if have - want:
            aws.call(aws.ec2, "revoke_security_group_ingress", GroupId=group_id,
                     IpPermissions=_permissions(have - want))
        if want - have:
            aws.call(aws.ec2, "authorize_security_group_ingress", GroupId=group_id,
                     IpPermissions=_permissions(want - have))
        return group_id
    group = aws.call(aws.ec2, "create_security_group", GroupName=group_name, VpcId=vpc,
                     Description=f"deathstar cluster {name}", TagSpecifications=[tag_spec])
    group_id = str(group["GroupId"])
    try:
        aws.call(aws.ec2, "authorize_security_group_ingress", GroupId=group_id,
                 IpPermissions=_permissions(wanted_rules(network, port, ssh, group_id)))
    except Ec2Error:
        aws.call(aws.ec2, "delete_security_group", GroupId=group_id)
        raise
    return group_id


def delete_group(aws: Aws, group_id: str, deadline_s: float) -> bool:
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


def find_caller_cidr(url: str | None = None, timeout_s: float = 3.0) -> str | None:
    """The caller's public address as a /32, asked of ``DEATHSTAR_CHECKIP_URL`` (default
    AWS's checkip service); None when it cannot be found."""
    import urllib.request

    url = url or os.environ.get("DEATHSTAR_CHECKIP_URL", "https://checkip.amazonaws.com")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310
            address = ipaddress.ip_address(response.read(64).decode().strip())
    except (OSError, ValueError):
        return None
    return f"{address}/{32 if address.version == 4 else 128}"

