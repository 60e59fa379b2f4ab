"""``deathstar ec2``: clusters on EC2 (up, list, nodes, down). Parsing and rendering only;
the work is in ``deathstar.deploy.ec2``, whose errors carry their exit codes (20-29 of
``deathstar.exitcodes``). It is imported by the commands that use it: every other
command starts without it (and the client it imports)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypedDict

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from deathstar.cli.common import announce_cluster, err, fail, parse_duration
from deathstar.deploy.ec2_boot import DEFAULT_IMAGE_PARAMETER
from deathstar.exitcodes import ExitCode
from deathstar.nodes import ClusterSpecError

if TYPE_CHECKING:
    from deathstar.deploy import ec2

ec2_app = typer.Typer(help="Clusters on EC2: up, list, nodes, down (needs the ec2 extra: boto3).",
                      no_args_is_help=True)

Region = Annotated[Optional[str], typer.Option(help="AWS region [default: AWS config].")]


@ec2_app.command("up")
def up_command(
    count: Annotated[int, typer.Option(help="Instances to launch.")] = 1,
    instance_type: Annotated[str, typer.Option("--type", help="Instance type.")] = "c5.xlarge",
    name: Annotated[str, typer.Option(help="Cluster name (the tag).")] = "deathstar",
    spot: Annotated[bool, typer.Option(help="Spot, one-time, terminate on interruption.")]
    = False,
    region: Region = None,
    image_parameter: Annotated[str, typer.Option(help="SSM public parameter of the image.")]
    = DEFAULT_IMAGE_PARAMETER,
    allow_cidr: Annotated[Optional[str], typer.Option(
        help="Who may reach the nodes' ports [default: your public address/32].")] = None,
    ssh: Annotated[bool, typer.Option(help="Open SSH (port 22) to --allow-cidr.")] = False,
    key_name: Annotated[Optional[str], typer.Option(help="EC2 key pair for SSH.")] = None,
    idle_shutdown: Annotated[str, typer.Option(help="Nodes power off after this long "
                                               "without work.")] = "30m",
    max_lifetime: Annotated[str, typer.Option(help="Nodes power off after this long.")]
    = "12h",
    pip: Annotated[Optional[list[str]], typer.Option(
        "--pip", help="A requirement the nodes get too, as a wheel in their bundle "
        "(repeatable).")] = None,
    requirements: Annotated[Optional[str], typer.Option(
        help="A requirements file (specs only) the nodes get too, bundled.")] = None,
    install: Annotated[Optional[str], typer.Option(
        help="Instead of the bundle of this very deathstar: a pip requirement the nodes "
        "install from the package index (your own published build).")] = None,
    yes_world: Annotated[bool, typer.Option(
        "--yes-world", help="Allow an --allow-cidr of /0 (anyone may reach the ports).")]
    = False,
    keys: Annotated[Optional[str], typer.Option(help="Your key folder [default: "
                                                "$DEATHSTAR_KEYS or the config folder].")]
    = None,
    wait: Annotated[bool, typer.Option(help="Wait until every daemon answers.")] = True,
    wait_timeout: Annotated[str, typer.Option(help="How long to wait.")] = "15m",
) -> None:
    """Launch a keyed deathstar cluster booting this very deathstar (its node bundle, via
    the account's deathstar S3 bucket); nodes serve only your client key."""
    from deathstar.deploy import ec2

    if count < 1:
        raise fail("--count must be at least 1", ExitCode.USAGE)
    try:
        opts = ec2.UpOptions(name=name, count=count, instance_type=instance_type, spot=spot,
                             region=region, image_parameter=image_parameter,
                             allow_cidr=allow_cidr or ec2.find_caller_cidr(), ssh=ssh,
                             idle_shutdown_s=parse_duration(idle_shutdown),
                             max_lifetime_s=parse_duration(max_lifetime), install=install,
                             key_name=key_name, pip=list(pip or []),
                             requirements=requirements, yes_world=yes_world)
        deadline_s = parse_duration(wait_timeout)
    except ValueError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    if yes_world and opts.allow_cidr and opts.allow_cidr.endswith("/0"):
        err.print(f"[bold yellow]warning:[/] --allow-cidr {opts.allow_cidr}: anyone on the "
                  "internet may reach the nodes' ports" + (" and SSH" if ssh else "")
                  + " (they still need your key to submit work)", highlight=False)
    try:
        instances = ec2.up(opts, keys)
        err.print(f"cluster {name}: {len(instances)} instance(s) "
                  f"({', '.join(i.id for i in instances)})", highlight=False)
        rows: list[dict[str, Any]] = []
        with Live(console=err, refresh_per_second=2, transient=False) as live:
            for rows in ec2.watch(opts, deadline_s, probe=wait):
                live.update(_watch_table(rows))
    except ec2.Ec2Error as exc:
        raise fail(str(exc), exc.code) from None
    announce_cluster("ec2", name, [f"{row['address']}:{opts.port}" for row in rows])


def _watch_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="instances")
    for col in ("instance", "state", "address", "daemon"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["id"], r["state"], r["address"] or "-", r["daemon"] or "-")
    return table


class ListRow(TypedDict):
    """One line of ``deathstar ec2 list`` (the keys of its --json, in order)."""

    cluster: str
    id: str
    type: str
    state: str
    spot: bool
    address: str
    uptime_s: int
    daemon: str


@ec2_app.command("list")
def list_command(
    name: Annotated[Optional[str], typer.Option(help="Only this cluster.")] = None,
    region: Region = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    probe: Annotated[bool, typer.Option(help="Ask each running daemon for its status.")]
    = True,
) -> None:
    """Every deathstar instance (found by tag): cluster, id, type, state, spot, address,
    uptime, daemon status."""
    from deathstar.deploy import ec2

    try:
        aws = ec2.Aws(region)
        instances = ec2.find_instances(aws, ec2.check_name(name) if name else None)
    except ClusterSpecError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    except ec2.Ec2Error as exc:
        raise fail(str(exc), exc.code) from None
    now = time.time()
    rows = [ListRow(cluster=i.cluster, id=i.id, type=i.type, state=i.state, spot=i.spot,
                    address=i.address,
                    uptime_s=round(now - i.launched) if i.launched else 0, daemon="")
            for i in instances]
    if probe:
        _probe_daemons(aws, rows, instances)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    table = Table(title="deathstar on EC2")
    for col in ("cluster", "instance", "type", "state", "spot", "address", "uptime", "daemon"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["cluster"], r["id"], r["type"], r["state"], "yes" if r["spot"] else "",
                      r["address"], f"{r['uptime_s'] // 60}m", r["daemon"])
    Console().print(table)


def _probe_daemons(aws: ec2.Aws, rows: list[ListRow], instances: list[ec2.Instance]
                   ) -> None:
    """Fill the daemon column: a node's reported boot failure, else what its status port
    says (asked with the public key that node reported)."""
    from deathstar.client.status import query_status
    from deathstar.deploy import ec2

    reports: dict[str, ec2.NodeReport] = {}
    for cluster in sorted({i.cluster for i in instances}):
        try:
            reports.update(ec2.node_reports(aws, cluster))
        except ClusterSpecError:
            continue  # tagged by hand with a name deathstar never makes
        except ec2.Ec2Error as exc:
            raise fail(str(exc), exc.code) from None
    for row in rows:
        report = reports.get(row["id"])
        if report is not None and report.state == "failed":
            row["daemon"] = f"failed: {report.detail}"
    running = [i for i in instances if i.state == "running"]
    nodes = ec2.node_addresses(running, {i.tags.get(ec2.TAG_NODE, ""): reports[i.id]
                                         for i in running if i.id in reports})
    by_host = {n.host: n for n in nodes}
    probed = [r for r in rows if r["address"] in by_host and not r["daemon"]]
    if not probed:
        return
    for row, status in zip(probed, query_status([by_host[r["address"]] for r in probed],
                                                timeout=2.0)):
        row["daemon"] = f"{status['workers']} workers" if not status["error"] else "no answer"


@ec2_app.command("nodes")
def nodes_command(
    name: Annotated[str, typer.Argument(help="The cluster.")],
    region: Region = None,
) -> None:
    """Print the running nodes of a cluster, one a line (what --cluster ec2:NAME uses)."""
    from deathstar.deploy import ec2

    try:
        nodes = ec2.cluster_nodes(f"{ec2.check_name(name)}@{region}" if region else name)
    except ClusterSpecError as exc:
        usage = isinstance(exc, ec2.BadClusterName)
        raise fail(str(exc), ExitCode.USAGE if usage else ExitCode.EC2_AWS) from None
    for node in nodes:
        typer.echo(node.name)


@ec2_app.command("down")
def down_command(
    name: Annotated[str, typer.Option(help="The cluster.")] = "deathstar",
    region: Region = None,
    wait_timeout: Annotated[str, typer.Option(help="How long to wait.")] = "10m",
) -> None:
    """Terminate every instance of the cluster (any state) and delete its security
    group. Idempotent."""
    from deathstar.deploy import ec2

    try:
        result = ec2.down(name, region, wait_s=parse_duration(wait_timeout))
    except ec2.Ec2Error as exc:
        raise fail(str(exc), exc.code) from None
    err.print(f"cluster {name}: terminated {len(result['terminated'])} instance(s), deleted "
              f"{len(result['security_groups'])} security group(s) and "
              f"{len(result['objects'])} bucket object(s)", highlight=False)
