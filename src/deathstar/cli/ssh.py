"""The ``deathstar ssh`` commands (parsing and rendering only; the work is in
``deathstar.deploy.ssh``)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from deathstar.cli.common import announce_cluster, err, fail, out, parse_duration
from deathstar.deploy import ssh
from deathstar.exitcodes import ExitCode
from deathstar.keys import KeyFileError
from deathstar.nodes import ClusterSpecError

ssh_app = typer.Typer(help="Your own machines over SSH: up, list, down.", no_args_is_help=True)

Name = Annotated[str, typer.Option(help="Cluster name.")]


def _event(started: float) -> ssh.OnEvent:
    def show(host: str, what: str) -> None:
        if not what.startswith("failed"):
            err.print(f"{time.monotonic() - started:6.1f}s  {host}: {what}", highlight=False)
    return show


@ssh_app.command("up")
def up_command(
    hosts: Annotated[list[str], typer.Argument(help="[user@]host[:ssh-port] ...")],
    name: Name = "ssh",
    user: Annotated[Optional[str], typer.Option(help="Login for hosts that name none.")]
    = None,
    workers: Annotated[Optional[int], typer.Option(help="Workers per host "
                                                   "[default: one per core].")] = None,
    pip: Annotated[Optional[list[str]], typer.Option(help="Also install this (repeat).")]
    = None,
    port: Annotated[int, typer.Option(help="The daemons' exec port (status is +1).")] = 6000,
    idle_shutdown: Annotated[str, typer.Option(help="Daemons stop after this long "
                                               "without work.")] = "30m",
    max_lifetime: Annotated[str, typer.Option(help="Daemons stop after this long.")] = "12h",
    ssh_option: Annotated[Optional[list[str]], typer.Option(
        help="An ssh -o option for every login, e.g. IdentityFile=~/.ssh/lab (repeat).")]
    = None,
    keys: Annotated[Optional[str], typer.Option(help="Your key folder [default: "
                                                "$DEATHSTAR_KEYS or the config folder].")]
    = None,
    wait_timeout: Annotated[str, typer.Option(help="How long to wait for each daemon to "
                                              "answer.")] = "60s",
) -> None:
    """Install this deathstar on each host, start a keyed daemon there, wait until each
    answers, and print the nodes (one a line)."""
    if workers is not None and workers < 1:
        raise fail("--workers must be at least 1", ExitCode.USAGE)
    try:
        opts = ssh.UpOptions(hosts=hosts, name=name, user=user, workers=workers,
                             pip=pip or [], port=port,
                             idle_shutdown_s=parse_duration(idle_shutdown),
                             max_lifetime_s=parse_duration(max_lifetime),
                             ssh_options=ssh_option or [], keys=keys,
                             wait_s=parse_duration(wait_timeout))
        for host in hosts:
            ssh.parse_target(host, user)
    except (ValueError, ssh.SshError) as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    try:
        result = ssh.up_with(opts, _event(time.monotonic()))
    except ssh.NoHostUp as exc:
        for why in exc.failures.values():
            err.print(f"[bold red]error:[/] {why}", highlight=False, soft_wrap=True)
        raise fail(f"no host of {name} came up", ExitCode.NO_NODES) from None
    except (ClusterSpecError, KeyFileError) as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    for why in result["failures"].values():
        err.print(f"[bold red]error:[/] {why}", highlight=False, soft_wrap=True)
    announce_cluster("ssh", name, [f"{node.host}:{node.port}" for node in result["nodes"]])


@ssh_app.command("list")
def list_command(
    name: Annotated[Optional[str], typer.Option(help="Only this cluster.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Every host of your ssh clusters: address, daemon up?, version, workers, uptime."""
    try:
        rows = ssh.list_hosts(name)
    except ClusterSpecError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    table = Table(title="deathstar on SSH hosts")
    for col in ("cluster", "host", "address", "daemon", "version", "workers", "uptime"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["cluster"], r["host"], f"{r['address']}:{r['port']}", r["daemon"],
                      r["version"], str(r["workers"]), f"{r['uptime_s'] // 60}m")
    out().print(table)


@ssh_app.command("down")
def down_command(
    name: Name = "ssh",
    purge: Annotated[bool, typer.Option(help="Remove the installs from the hosts too.")]
    = False,
) -> None:
    """Stop the daemons ``ssh up`` started (only those) and forget the cluster.
    Idempotent."""
    try:
        result: dict[str, Any] = ssh.down(name, purge=purge)
    except ClusterSpecError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    if "note" in result:
        err.print(result["note"], highlight=False)
        return
    err.print(f"cluster {name}: stopped {len(result['stopped'])} host(s)"
              + (" and removed the installs" if purge else ""), highlight=False)
    if result["failures"]:
        for why in result["failures"].values():
            err.print(f"[bold red]error:[/] {why}", highlight=False, soft_wrap=True)
        raise fail("some hosts could not be reached; run down again later",
                    ExitCode.NO_NODES)
