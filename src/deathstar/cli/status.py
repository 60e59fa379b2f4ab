"""``deathstar status``: each node's capacity, load and versions (from its status port),
as a table or JSON."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from deathstar import config
from deathstar.cli.common import KeysOption, fail, out
from deathstar.client.status import query_status
from deathstar.exitcodes import ExitCode
from deathstar.keys import KeyFileError
from deathstar.nodes import ClusterSpecError
from deathstar.protocol import local_versions

#: The versions a node must share with this client.
COMPARED = ("protocol", "deathstar", "python")


def status(
    nodes: Annotated[list[str], typer.Argument(help="Nodes: host or host:port.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each node.")]
    = config.CONNECT_TIMEOUT_S,
    keys: KeysOption = None,
) -> None:
    """Capacity, load, and versions of each node."""
    try:
        rows = query_status(nodes, timeout, keys=keys)
    except (ClusterSpecError, KeyFileError) as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    ours = local_versions()
    for row in rows:
        versions = row.get("versions") or {}
        row["mismatch"] = sorted(k for k in COMPARED
                                 if versions and str(versions.get(k)) != str(ours[k]))
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
    else:
        out().print(status_table(rows))
    if all(r["error"] for r in rows):
        raise typer.Exit(ExitCode.NO_NODES)


def status_table(rows: list[dict[str, Any]]) -> Table:
    """One line a node; a node that did not answer shows its error."""
    table = Table(title="deathstar nodes")
    for col in ("node", "host", "workers", "idle", "busy", "queued", "done", "lost",
                "restarts", "clients", "uptime", "load", "versions"):
        table.add_column(col, justify="right" if col not in ("node", "host", "versions")
                         else "left")
    for row in rows:
        if row["error"]:
            table.add_row(row["node"], f"[red]{row['error']}[/]", *[""] * 11)
            continue
        v = row.get("versions", {})
        text = f"deathstar {v.get('deathstar')}, py {v.get('python')}, " \
               f"protocol {v.get('protocol')}"
        if row["mismatch"]:
            text = f"[red]{text} (differs: {', '.join(row['mismatch'])})[/]"
        table.add_row(row["node"], str(row.get("hostname")), str(row.get("workers")),
                      str(row.get("idle")), str(row.get("busy")), str(row.get("queued")),
                      str(row.get("tasks_done")), str(row.get("tasks_lost")),
                      str(row.get("worker_restarts")), str(row.get("clients")),
                      fmt_uptime(row.get("uptime_s", 0)),
                      f"{row.get('load1', 0):.2f}", text)
    return table


def fmt_uptime(seconds: float) -> str:
    """'4m07s' under an hour, else '3h12m'."""
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
