"""The ``deathstar slurm`` commands (parsing and rendering only; the work is in
``deathstar.deploy.slurm``)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Optional

import typer
from rich.table import Table

from deathstar.cli.common import announce_cluster, err, fail, out, parse_duration
from deathstar.deploy import slurm
from deathstar.exitcodes import ExitCode
from deathstar.keys import KeyFileError
from deathstar.nodes import ClusterSpecError

slurm_app = typer.Typer(help="Nodes from a SLURM allocation: up, list, down.",
                        no_args_is_help=True)

Name = Annotated[str, typer.Option(help="Cluster name.")]


def _on_state(started: float) -> slurm.OnState:
    last: list[tuple[str, str, int]] = []

    def show(state: str, reason: str, ready: int, wanted: int) -> None:
        now = (state, reason, ready)
        if last and last[-1] == now:
            return
        last.append(now)
        why = f" ({reason})" if reason else ""
        err.print(f"{time.monotonic() - started:6.1f}s  job {state}{why}: "
                  f"{ready}/{wanted} node(s) up", highlight=False, soft_wrap=True)
    return show


@slurm_app.command("up")
def up_command(
    nodes: Annotated[int, typer.Option(help="Nodes to allocate.")] = 1,
    name: Name = "slurm",
    min_nodes: Annotated[Optional[int], typer.Option(
        help="Return once this many answer [default: all].")] = None,
    partition: Annotated[Optional[str], typer.Option(help="The partition.")] = None,
    time_limit: Annotated[Optional[str], typer.Option(
        "--time", help="The job's time limit, as sbatch takes it (2:00:00).")] = None,
    workers_per_node: Annotated[Optional[int], typer.Option(
        help="Workers per node [default: one per core].")] = None,
    sbatch_arg: Annotated[Optional[list[str]], typer.Option(
        help="Pass this to sbatch, e.g. --sbatch-arg=--account=X (repeat).")] = None,
    idle_shutdown: Annotated[str, typer.Option(help="Daemons stop after this long "
                                               "without work.")] = "30m",
    bundle: Annotated[bool, typer.Option(
        help="Nodes install the node bundle instead of using this Python environment "
             "(when it is not on the shared file system).")] = False,
    keys: Annotated[Optional[str], typer.Option(help="Your key folder.")] = None,
    wait_timeout: Annotated[str, typer.Option(help="How long to wait for the nodes.")]
    = "1h",
) -> None:
    """Submit one batch job with a daemon on each node, wait until they answer, and
    print the nodes (one a line). Ctrl-C while waiting cancels the job."""
    try:
        opts = slurm.UpOptions(name=name, nodes=nodes, min_nodes=min_nodes,
                               partition=partition, time=time_limit,
                               workers_per_node=workers_per_node,
                               sbatch_args=sbatch_arg or [],
                               idle_shutdown_s=parse_duration(idle_shutdown), keys=keys,
                               wait_s=parse_duration(wait_timeout),
                               environment="bundle" if bundle else "client")
    except ValueError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    try:
        found = slurm.up_with(opts, _on_state(time.monotonic()))
    except KeyboardInterrupt:
        err.print(f"interrupted: cancelled the job of slurm:{name}", highlight=False)
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except (ClusterSpecError, KeyFileError) as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    except slurm.SlurmError as exc:
        raise fail(str(exc), ExitCode.NO_NODES) from None
    announce_cluster("slurm", name, [f"{node.host}:{node.port}" for node in found])


@slurm_app.command("list")
def list_command(
    name: Annotated[Optional[str], typer.Option(help="Only this cluster.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Your slurm clusters: job, its state, each node's address and daemon."""
    try:
        rows = slurm.list_nodes(name)
    except (ClusterSpecError, slurm.SlurmError) as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    table = Table(title="deathstar on SLURM")
    for col in ("cluster", "job", "state", "node", "address", "daemon", "workers"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["cluster"], r["job"], r["state"] + (f" ({r['reason']})"
                      if r["reason"] else ""), r["node"], r["address"], r["daemon"],
                      str(r["workers"]))
    out().print(table)


@slurm_app.command("down")
def down_command(name: Name = "slurm") -> None:
    """Cancel the cluster's job (its daemons end with it) and forget it. Idempotent."""
    try:
        result = slurm.down(name)
    except ClusterSpecError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    except slurm.SlurmError as exc:
        raise fail(str(exc), ExitCode.NO_NODES) from None
    if "note" in result:
        err.print(result["note"], highlight=False)
        return
    err.print(f"cluster {name}: cancelled job {result['cancelled']}", highlight=False)
