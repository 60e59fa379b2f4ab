"""The ``deathstar`` command: parses, calls the library, renders with rich. The only
module that touches the terminal.

Exit codes (also in the README):
    0  every input succeeded            3  some inputs failed (the rest are in the output)
    2  bad command-line usage           4  no node of the cluster could be reached
    5  bad input (function, file, arguments, output)          130  interrupted
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from deathstar._version import __version__
from deathstar import config
from deathstar.client.status import query_status
from deathstar.daemon.loop import run_daemon
from deathstar.daemon.guard import UnsafeBind, daemon_keys
from deathstar.daemon.sockets import UnsafeFolder
from deathstar.keys import (CLIENT, NODE, KeyFileError, default_dir, load_client_keys,
                            load_server_keys, resolve_dir)
from deathstar.keys import keygen as keygen_keys
from deathstar.nodes import ClusterSpecError, NodeAddress
from deathstar.report import (NodeSummary, TaskRecord, node_figures, node_summary, plot_report,
                              read_report)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_TASKS_FAILED = 3
EXIT_NO_NODES = 4
EXIT_BAD_INPUT = 5
EXIT_INTERRUPTED = 130

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run a Python function over a list of inputs on many machines at once.")
KeysOption = Annotated[Optional[str], typer.Option(
    "--keys", help="Key folder (deathstar keygen) [default: $DEATHSTAR_KEYS, else the "
                   "config folder's keys when present]; 'none' for no keys.")]

#: Piped output gets wide tables instead of rich's default 80 columns.
_PIPE_WIDTH = 160
err = Console(stderr=True, width=None if sys.stderr.isatty() else _PIPE_WIDTH)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"deathstar {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version,
                                                is_eager=True, help="Print the version.")]
          = False) -> None:
    """deathstar: map a function over inputs on local and remote nodes."""


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _setup_logging(prefix: str, level: str = "info") -> None:
    logging.basicConfig(level=logging.DEBUG if config.DEBUG else level.upper(),
                        format=f"%(asctime)s {prefix} %(levelname)s %(message)s")


# ---------------------------------------------------------------------- daemon / worker


def _scaled(text: str, units: dict[str, float], example: str) -> float:
    """A number with an optional unit suffix from ``units`` ("" is the bare unit)."""
    t = text.strip().upper()
    unit = t[-1:] if t[-1:] in units and t[-1:] else ""
    try:
        value = float(t[:-1] if unit else t) * units[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not like {example}") from None
    if value <= 0:
        raise ValueError(f"{text!r}: must be more than 0")
    return value


def parse_size(text: str) -> int:
    """'2G', '500M', '1.5g', '4096' -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(_scaled(text.strip().upper().removesuffix("B").removesuffix("I"), units,
                       "2G or 500M"))


def parse_duration(text: str) -> float:
    """'30m', '12h', '90s', '45' (seconds) -> seconds."""
    return _scaled(text, {"": 1, "S": 1, "M": 60, "H": 3600, "D": 86400}, "30m, 12h or 90s")


def default_log_dir() -> Path:
    """$XDG_STATE_HOME/deathstar/logs (~/.local/state/deathstar/logs)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "deathstar" / "logs"


@app.command()
def daemon(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Exec port; status is PORT+1. 0 picks free ports.")]
    = config.DEFAULT_PORT,
    workers: Annotated[Optional[int], typer.Option(help="Local worker processes "
                                                   "[default: one per core].")] = None,
    worker_port: Annotated[Optional[int], typer.Option(
        help="Port for workers started by hand [default: PORT+2].")] = None,
    heartbeat: Annotated[float, typer.Option(help="Heartbeat interval, seconds.")]
    = config.HEARTBEAT_INTERVAL_S,
    keys: KeysOption = None,
    insecure: Annotated[bool, typer.Option(
        help="Listen beyond loopback with no authentication: anyone who can reach the "
             "ports can run code as this user.")] = False,
    max_tasks_per_worker: Annotated[Optional[int], typer.Option(
        help="Replace a worker after it has run this many inputs.")] = None,
    max_worker_memory: Annotated[Optional[str], typer.Option(
        help="Replace a worker, between tasks, once it holds this much memory "
             "(e.g. 2G, 500M).")] = None,
    idle_shutdown: Annotated[Optional[str], typer.Option(
        help="Stop after this long without work (e.g. 30m); for cloud nodes.")] = None,
    max_lifetime: Annotated[Optional[str], typer.Option(
        help="Stop after this long in all (e.g. 12h); for cloud nodes.")] = None,
    log_dir: Annotated[Optional[Path], typer.Option(
        help="Where each worker's output (what tasks print) goes, as worker-PID.log "
             "[default: $XDG_STATE_HOME/deathstar/logs].")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    ipc: Annotated[Optional[Path], typer.Option(
        help="Listen on ipc sockets in this folder (exec, status) instead of TCP: only "
             "this machine's users the folder lets in can connect. The embedded local "
             "cluster runs this way.")] = None,
    parent_pid: Annotated[Optional[int], typer.Option(hidden=True)] = None,
    ready_json: Annotated[bool, typer.Option(hidden=True)] = False,
    zap: Annotated[bool, typer.Option(hidden=True, help="Tests only: without the ZAP "
                                      "authenticator, as if its thread had died.")] = True,
) -> None:
    """Run a node: exec port for work, status port for queries, a worker per core.

    With keys (deathstar keygen) it serves only the clients whose public keys are in the
    key folder's authorized/; without, it listens only on loopback unless --insecure."""
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise _fail(f"--log-level {log_level}: use debug, info, warning or error", EXIT_USAGE)
    _setup_logging("daemon", log_level)
    if workers is not None and workers < 0:
        raise _fail("--workers must be 0 or more", EXIT_USAGE)
    if max_tasks_per_worker is not None and max_tasks_per_worker < 1:
        raise _fail("--max-tasks-per-worker must be 1 or more", EXIT_USAGE)
    if heartbeat <= 0:
        raise _fail("--heartbeat must be more than 0 seconds", EXIT_USAGE)
    try:
        memory = None if max_worker_memory is None else parse_size(max_worker_memory)
        idle_s = None if idle_shutdown is None else parse_duration(idle_shutdown)
        lifetime_s = None if max_lifetime is None else parse_duration(max_lifetime)
    except ValueError as exc:
        raise _fail(f"{exc}", EXIT_USAGE) from None
    try:
        server_keys, note = daemon_keys(keys, ipc=None if ipc is None else str(ipc),
                                        insecure=insecure)
    except KeyFileError as exc:
        raise _fail(f"{exc}", EXIT_USAGE) from None
    if note:
        err.print(f"[bold]note:[/] {note}", highlight=False)
    if server_keys is not None:
        logging.getLogger("deathstar.daemon").info(
            "CurveZMQ on: serving the %d key(s) in %s", len(server_keys.authorized),
            server_keys.folder / "authorized")

    def on_ready(ports: dict[str, Any]) -> None:
        if ready_json:
            print(json.dumps(ports), flush=True)
        where = (f"ipc sockets in {ipc}" if ipc is not None else
                 f"{host}: exec {ports['exec']}, status {ports['status']}, "
                 f"workers {ports['workers']}")
        logging.getLogger("deathstar.daemon").info(
            "listening on %s; %s local worker(s)", where,
            workers if workers is not None else os.cpu_count())

    try:
        run_daemon(host=host, port=port, workers=workers, worker_port=worker_port,
                   heartbeat_s=heartbeat, parent_pid=parent_pid, on_ready=on_ready,
                   max_tasks_per_worker=max_tasks_per_worker, max_worker_memory=memory,
                   keys=server_keys, zap=zap, idle_shutdown_s=idle_s,
                   max_lifetime_s=lifetime_s, log_dir=str(log_dir or default_log_dir()),
                   ipc=None if ipc is None else str(ipc), insecure=insecure)
    except (UnsafeBind, UnsafeFolder) as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    except OSError as exc:  # zmq.ZMQError is an OSError: port in use, bad address
        raise _fail(f"cannot listen on {host}:{port}: {exc}", EXIT_USAGE) from None


@app.command()
def worker(
    connect: Annotated[str, typer.Option(help="The daemon's worker endpoint, "
                                         "e.g. tcp://node1:6002.")],
    keys: KeysOption = None,
    heartbeat: Annotated[float, typer.Option(help="Heartbeat interval, seconds.")]
    = config.HEARTBEAT_INTERVAL_S,
) -> None:
    """Run one worker for a daemon, from any machine that can reach it.

    With keys, it uses the client keypair (which the daemon must authorize) and the
    node's public key."""
    from deathstar.worker.process import main as worker_main

    curve = None
    try:
        folder = resolve_dir(keys, CLIENT)
        if folder is not None:
            client_keys = load_client_keys(folder)
            host, _, port = connect.removeprefix("tcp://").rpartition(":")
            node = NodeAddress(connect, host, int(port) - 2 if port.isdigit() else 0)
            curve = (client_keys.public, client_keys.secret, client_keys.server_key(node))
    except KeyFileError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    _setup_logging("worker")
    raise typer.Exit(worker_main(connect, heartbeat_s=heartbeat, curve=curve))


@app.command()
def keygen(
    folder: Annotated[Optional[Path], typer.Argument(
        help="Where to put the keys [default: the config folder's keys/].")] = None,
    force: Annotated[bool, typer.Option(help="Replace existing keys.")] = False,
) -> None:
    """Make a node keypair and a client keypair, and authorize the client.

    Copy the folder to each node (or just node.key_secret, node.key and authorized/),
    and keep client.key_secret to yourself. To let another user in, put their client.key
    in the node's authorized/ folder."""
    target = folder if folder is not None else default_dir()
    try:
        written = keygen_keys(target, force=force)
    except KeyFileError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    for path in written:
        typer.echo(str(path))


# ---------------------------------------------------------------------- report


def summary_table(rows: list[NodeSummary], wall_s: float | None = None) -> Table:
    """The node summary as a rich table (the seed's table: node, jobs completed, ...)."""
    title = "node summary" + (f" ({wall_s:.2f} s wall)" if wall_s is not None else "")
    table = Table(title=title)
    for col in ("node", "jobs completed", "failed", "workers", "busy s"):
        table.add_column(col, justify="left" if col == "node" else "right")
    for r in rows:
        table.add_row(r.node, str(r.jobs_completed), str(r.failed), str(r.workers),
                      f"{r.busy_s:.2f}")
    return table



@app.command("report")
def report_command(
    path: Annotated[Path, typer.Argument(help="A report written by map --report.")],
    plot: Annotated[Optional[Path], typer.Option(help="Also draw a timeline and a per-node "
                                                 "chart into this image (.png).")] = None,
) -> None:
    """The node summary and per-node figures of a report; --plot draws it."""
    try:
        records = read_report(path)
    except (OSError, ValueError, KeyError) as exc:
        raise _fail(f"{path}: not a readable report ({exc})", EXIT_BAD_INPUT) from None
    err_out = Console(width=None if sys.stdout.isatty() else _PIPE_WIDTH)
    err_out.print(summary_table(node_summary(records)))
    table = Table(title="per node")
    for col in ("node", "tasks", "failed", "mean s", "p50 s", "p95 s", "busy share",
                "retries"):
        table.add_column(col, justify="left" if col == "node" else "right")
    for f in node_figures(records):
        table.add_row(f.node, str(f.tasks), str(f.failed), f"{f.mean_s:.4f}",
                      f"{f.p50_s:.4f}", f"{f.p95_s:.4f}", f"{f.busy_share:.0%}",
                      str(f.retries))
    err_out.print(table)
    if plot is not None:
        _plot(records, plot)


def _plot(records: list[TaskRecord], path: Path) -> None:
    try:
        plot_report(records, path)
    except ImportError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    err.print(f"plot written to {path}", highlight=False)


# ---------------------------------------------------------------------- config

config_app = typer.Typer(help="The config file (config.toml in the config folder).",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
                ) -> None:
    """Every setting's value and where it came from (env > config file > default), the
    named clusters, and the key folder in use."""
    keys_dir = resolve_dir(None, CLIENT)
    data = {"config_file": str(config.config_path()),
            "settings": {k.lower(): {"value": v, "from": src}
                         for k, (v, src) in sorted(config.SOURCES.items())},
            "clusters": config.named_clusters(),
            "keys": str(keys_dir) if keys_dir else None}
    if as_json:
        typer.echo(json.dumps(data, indent=1))
        return
    table = Table(title=f"deathstar settings ({data['config_file']})")
    for col in ("setting", "value", "from"):
        table.add_column(col)
    for name, row in data["settings"].items():
        table.add_row(name, str(row["value"]), row["from"])
    for name, nodes in data["clusters"].items():
        table.add_row(f"cluster {name}", ", ".join(nodes), "config file")
    table.add_row("keys", str(data["keys"] or "none"), "")
    Console(width=None if sys.stdout.isatty() else _PIPE_WIDTH).print(table)


# ---------------------------------------------------------------------- status


def _fmt_uptime(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@app.command()
def status(
    nodes: Annotated[list[str], typer.Argument(help="Nodes: host or host:port.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each node.")]
    = config.CONNECT_TIMEOUT_S,
    keys: KeysOption = None,
) -> None:
    """Capacity, load, and versions of each node."""
    from deathstar.protocol import local_versions

    try:
        rows = query_status(nodes, timeout, keys=keys)
    except (ClusterSpecError, KeyFileError) as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    ours = local_versions()
    for row in rows:
        versions = row.get("versions") or {}
        row["mismatch"] = sorted(k for k in ("protocol", "deathstar", "python")
                                 if versions and str(versions.get(k)) != str(ours[k]))
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
    else:
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
                          _fmt_uptime(row.get("uptime_s", 0)),
                          f"{row.get('load1', 0):.2f}", text)
        Console(width=None if sys.stdout.isatty() else _PIPE_WIDTH).print(table)
    if all(r["error"] for r in rows):
        raise typer.Exit(EXIT_NO_NODES)


def main() -> None:
    """Console-script entry point."""
    import importlib

    from deathstar.cli.ec2 import ec2_app

    importlib.import_module("deathstar.cli.map")  # registers the map command on the app

    if config.FILE_ERROR:
        err.print(f"[bold red]error:[/] {config.FILE_ERROR}", highlight=False)
        raise SystemExit(EXIT_USAGE)
    app.add_typer(ec2_app, name="ec2")
    app()


__all__ = ["app", "main", "summary_table"]
