"""The ``deathstar`` command: parses, calls the library, renders with rich. The only
module that touches the terminal.

Exit codes (also in the README):
    0  every input succeeded            3  some inputs failed (the rest are in the output)
    2  bad command-line usage           4  no node of the cluster could be reached
    5  bad input (function, file, arguments, output)          130  interrupted
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import deathstar
from deathstar import config
from deathstar.client import Cluster, NoNodesError, ordered, query_status
from deathstar.errors import TaskFailed
from deathstar.inputs import InputError, load_function, parse_kwargs, read_calls
from deathstar.keys import (CLIENT, NODE, KeyFileError, default_dir, load_client_keys,
                            load_server_keys, resolve_dir)
from deathstar.keys import keygen as keygen_keys
from deathstar.nodes import ClusterSpecError, NodeAddress
from deathstar.output import OutputError, ResultWriter, read_previous
from deathstar.report import (NodeSummary, ReportWriter, Tally, TaskRecord, node_figures,
                              node_summary, plot_report, read_report)
from deathstar.serialize import SerializationError

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
        typer.echo(f"deathstar {deathstar.__version__}")
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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


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
    parent_pid: Annotated[Optional[int], typer.Option(hidden=True)] = None,
    ready_json: Annotated[bool, typer.Option(hidden=True)] = False,
    zap: Annotated[bool, typer.Option(hidden=True, help="Tests only: without the ZAP "
                                      "authenticator, as if its thread had died.")] = True,
) -> None:
    """Run a node: exec port for work, status port for queries, a worker per core.

    With keys (deathstar keygen) it serves only the clients whose public keys are in the
    key folder's authorized/; without, it listens only on loopback unless --insecure."""
    from deathstar.broker import run_daemon

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
        folder = resolve_dir(keys, NODE)
        server_keys = load_server_keys(folder) if folder is not None else None
    except KeyFileError as exc:
        raise _fail(f"{exc}", EXIT_USAGE) from None
    if server_keys is None and not _is_loopback(host) and not insecure:
        raise _fail(
            f"refusing to listen on {host} without keys: anyone who can reach it could run "
            "code here. Make keys with 'deathstar keygen' (then --keys DIR), listen on "
            "127.0.0.1, or pass --insecure on a network you trust.", EXIT_USAGE)
    if server_keys is None and not _is_loopback(host):
        err.print(f"[bold yellow]WARNING:[/] listening on {host} with no authentication "
                  "(--insecure): anyone who can reach these ports can run code as this user.")
    elif server_keys is not None:
        logging.getLogger("deathstar.daemon").info(
            "CurveZMQ on: serving the %d key(s) in %s", len(server_keys.authorized),
            server_keys.folder / "authorized")

    def on_ready(ports: dict[str, int]) -> None:
        if ready_json:
            print(json.dumps(ports), flush=True)
        logging.getLogger("deathstar.daemon").info(
            "listening on %s: exec %d, status %d, workers %d; %s local worker(s)", host,
            ports["exec"], ports["status"], ports["workers"],
            workers if workers is not None else os.cpu_count())

    try:
        run_daemon(host=host, port=port, workers=workers, worker_port=worker_port,
                   heartbeat_s=heartbeat, parent_pid=parent_pid, on_ready=on_ready,
                   max_tasks_per_worker=max_tasks_per_worker, max_worker_memory=memory,
                   keys=server_keys, zap=zap, idle_shutdown_s=idle_s,
                   max_lifetime_s=lifetime_s, log_dir=str(log_dir or default_log_dir()))
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
    """Run one worker for a daemon, from any machine that can reach it. With keys, it
    uses the client keypair (which the daemon must authorize) and the node's public key."""
    from deathstar.worker import main as worker_main

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
                          str(row.get("worker_restarts")), str(row.get("clients")), _fmt_uptime(row.get("uptime_s", 0)),
                          f"{row.get('load1', 0):.2f}", text)
        Console(width=None if sys.stdout.isatty() else _PIPE_WIDTH).print(table)
    if all(r["error"] for r in rows):
        raise typer.Exit(EXIT_NO_NODES)


# ---------------------------------------------------------------------- map


class _Display:
    """Progress on stderr: a bar and a live per-node table on a terminal, else a plain
    line every few seconds."""

    def __init__(self, cluster: Cluster, total: int | None, enabled: bool):
        self.cluster = cluster
        self.total = total
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self.enabled = enabled
        self.live: Live | None = None
        self.next_line = self.started + 2.0
        if enabled and err.is_terminal:
            self.progress = Progress(TextColumn("mapping"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                     console=err)
            self.bar = self.progress.add_task("map", total=total, rate="")
            self.live = Live(self, console=err, refresh_per_second=4, transient=False)
            self.live.start()

    def __rich__(self) -> Group:
        return Group(self.progress, _node_table(self.cluster.node_stats()))

    def failure(self) -> None:
        self.failed += 1

    def progress_callback(self, done: int, total: int | None) -> None:
        """The library's ``progress(done, total)`` hook: this display is one consumer."""
        self.done = done
        if self.live is not None:
            rate = self.done / max(time.monotonic() - self.started, 1e-9)
            self.progress.update(self.bar, completed=self.done, rate=f"{rate:,.0f}/s")
        elif self.enabled and time.monotonic() >= self.next_line:
            self.next_line = time.monotonic() + 5.0
            total = "?" if self.total is None else str(self.total)
            err.print(f"deathstar: {self.done}/{total} done, {self.failed} failed, "
                      f"{self.done / (time.monotonic() - self.started):,.0f} tasks/s",
                      highlight=False)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def progress_bar(total: int | None) -> Callable[[int, "int | None"], None]:
    """A ``(done, total)`` callback that draws a bar on stderr when it is a terminal (for
    ``progress=True`` in the library), and does nothing otherwise."""
    if not err.is_terminal:
        return lambda done, total: None
    bar = Progress(TextColumn("deathstar"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=err)
    task = bar.add_task("map", total=total)
    bar.start()

    def update(done: int, total_now: int | None) -> None:
        bar.update(task, completed=done, total=total_now)
        if total_now is not None and done >= total_now:
            bar.stop()

    return update


def _node_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False)
    for col in ("node", "state", "workers", "in flight", "done", "failed", "tasks/s"):
        table.add_column(col, justify="left" if col in ("node", "state") else "right")
    for row in rows:
        table.add_row(row["node"], row["state"], str(row["workers"]), str(row["in_flight"]),
                      str(row["done"]), str(row["failed"]), f"{row['rate']:,.1f}")
    return table


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


@app.command("map")
def map_command(
    function: Annotated[str, typer.Argument(help="MODULE:FUNCTION, imported with the "
                                            "current folder on the path.")],
    args: Annotated[Path, typer.Option("--args", help="Inputs: JSONL (array = positional "
                                       "args, object = keyword args, else one argument) "
                                       "or .pkl/.pickle.")],
    kwargs: Annotated[Optional[str], typer.Option(help="Common keyword arguments, "
                                                  "a JSON object.")] = None,
    cluster: Annotated[Optional[str], typer.Option(
        help="Nodes: a,b:7000 or @nodes.txt [default: $DEATHSTAR_CLUSTER, else an "
             "embedded local cluster].")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Results: .jsonl (default: stdout), "
                                                "written as they arrive, or .pkl.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write the execution report "
                                                   "(.json or .csv).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="At the end, draw the run's timeline "
                                                 "and per-node chart into this .png.")] = None,
    resume: Annotated[bool, typer.Option(help="Run only the inputs missing from --out "
                                         "(a .jsonl an interrupted run left).")] = False,
    retry_failed: Annotated[bool, typer.Option(help="With --resume, also re-run the inputs "
                                               "that failed.")] = False,
    timeout: Annotated[Optional[float], typer.Option(
        help="Seconds an input may run; past it its worker is killed and it fails.")] = None,
    max_attempts: Annotated[int, typer.Option(
        help="Runs an input gets when its worker dies under it.")] = config.MAX_ATTEMPTS,
    seed: Annotated[Optional[int], typer.Option(
        help="Seed random and numpy with SEED + the input's index before each input.")]
    = None,
    capture_output: Annotated[bool, typer.Option(
        help="Bring back what each input prints, into the report.")] = False,
    chunksize: Annotated[Optional[int], typer.Option(help="Inputs per message "
                                                     "[default: adaptive].")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Workers of the embedded local "
                                                   "cluster [default: one per core].")] = None,
    connect_timeout: Annotated[float, typer.Option(help="Seconds to wait for each node.")]
    = config.CONNECT_TIMEOUT_S,
    keys: KeysOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary.")]
    = False,
) -> None:
    """Run FUNCTION over every input in --args on the cluster; results in input order."""
    _setup_logging("client")
    try:
        fn = load_function(function)
        common = parse_kwargs(kwargs)
        calls, total = read_calls(args)
        _check_map_options(out, report, resume, retry_failed, timeout, max_attempts,
                           chunksize)
        skip: set[int] = set()
        earlier_failures = 0
        if resume and out is not None:
            previous = read_previous(out, retry_failed)
            skip = previous.succeeded | previous.failed
            earlier_failures = len(previous.failed)
    except (InputError, OutputError) as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from None
    try:
        cl = Cluster(cluster, connect_timeout=connect_timeout, workers=workers, keys=keys)
    except (ClusterSpecError, KeyFileError) as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    except NoNodesError as exc:
        raise _fail(str(exc), EXIT_NO_NODES) from None
    for problem in cl.unreachable:
        err.print(f"[yellow]warning:[/] going on without {problem}", highlight=False)
    if skip:
        err.print(f"resuming: {len(skip)} input(s) already in {out} "
                  f"({earlier_failures} of them failed)", highlight=False)
    run = _MapRun(cl, ResultWriter(out, append=resume),
                  ReportWriter(report) if report is not None else None,
                  _Display(cl, total - len(skip), enabled=not quiet), quiet)
    run.failed_count = earlier_failures  # the exit code speaks for the whole output
    options = dict(chunksize=chunksize, timeout=timeout, max_attempts=max_attempts, seed=seed,
                   capture_output=capture_output)
    run.records = [] if plot is not None else None
    code = run.run(fn, common, calls, skip, total - len(skip), options)
    if plot is not None and run.records:
        _plot(run.records, plot)
    raise typer.Exit(code)


def _check_map_options(out: Path | None, report: Path | None, resume: bool,
                       retry_failed: bool, timeout: float | None, max_attempts: int,
                       chunksize: int | None) -> None:
    if chunksize is not None and chunksize < 1:
        raise InputError("--chunksize must be at least 1")
    if timeout is not None and timeout <= 0:
        raise InputError("--timeout must be more than 0 seconds")
    if max_attempts < 1:
        raise InputError("--max-attempts must be at least 1")
    if out is not None and out.suffix.lower() not in (".jsonl", ".json", ".pkl", ".pickle"):
        raise InputError(f"--out {out}: use a .jsonl or a .pkl file")
    if report is not None and report.suffix.lower() not in (".json", ".csv"):
        raise InputError(f"--report {report}: use a .json or a .csv file")
    if (resume or retry_failed) and out is None:
        raise InputError("--resume and --retry-failed need the --out file of the earlier run")
    if retry_failed and not resume:
        raise InputError("--retry-failed goes with --resume")


class _MapRun:
    """One ``deathstar map``: streams outcomes in input order to the output, the report,
    the display and the node tally; returns the exit code."""

    def __init__(self, cluster: Cluster, output: ResultWriter, report: ReportWriter | None,
                 display: _Display, quiet: bool):
        self.cluster = cluster
        self.output = output
        self.report = report
        self.display = display
        self.quiet = quiet
        self.tally = Tally()
        self.records: list[TaskRecord] | None = None  # kept only for --plot
        self.failed: list[TaskFailed] = []
        self.failed_count = 0

    def run(self, fn: Any, common: dict[str, Any], calls: Iterator[Any], skip: set[int],
            total: int, options: dict[str, Any]) -> int:
        started = time.monotonic()
        kept: list[int] = []  # with --resume: the original index of each input sent

        def remaining() -> Iterator[Any]:
            for index, call in enumerate(calls):
                if index not in skip:
                    kept.append(index)
                    yield call

        code = EXIT_OK
        try:
            progress = self.display.progress_callback
            if skip:
                stream = self.cluster.outcomes(fn, remaining(),
                                               indices=(kept[i] for i in itertools.count()),
                                               total=total, progress=progress, **options,
                                               **common)
            else:
                stream = self.cluster.outcomes(fn, calls, total=total, progress=progress,
                                               **options, **common)
            for index, ok, value, record in ordered(stream, kept if skip else None):
                self.deliver(index, ok, value, record)
        except (InputError, SerializationError, OutputError) as exc:
            code = self.stop(EXIT_BAD_INPUT, f"[bold red]error:[/] {exc}")
        except NoNodesError as exc:
            code = self.stop(EXIT_NO_NODES, f"[bold red]error:[/] {exc}")
        except KeyboardInterrupt:
            code = self.stop(EXIT_INTERRUPTED, "interrupted: queued inputs were cancelled and "
                             "running ones stopped; finished results are in the output")
        finally:
            self.display.close()
            self.output.close()
            if self.report is not None:
                self.report.close()
            self.cluster.close()
        self.print_summary(time.monotonic() - started)
        if code == EXIT_OK and self.failed_count:
            code = EXIT_TASKS_FAILED
        return code

    def deliver(self, index: int, ok: bool, value: Any, record: TaskRecord) -> None:
        self.output.write(index, ok, value, record)
        if self.report is not None:
            self.report.add(record)
        self.tally.add(record)
        if self.records is not None:
            self.records.append(record)
        if not ok:
            self.failed_count += 1
            if len(self.failed) < 3:
                self.failed.append(value)
        if not ok:
            self.display.failure()

    def stop(self, code: int, message: str) -> int:
        self.display.close()
        err.print(message, highlight=False)
        return code

    def print_summary(self, wall_s: float) -> None:
        if self.quiet:
            return
        rows = self.tally.summary()
        if rows:
            err.print(summary_table(rows, wall_s))
        for exc in self.failed:
            err.print(f"[red]input {exc.index} failed:[/] {exc}", highlight=False)
        if self.failed_count > len(self.failed):
            err.print(f"[red]... and {self.failed_count - len(self.failed)} more failed "
                      "inputs[/]", highlight=False)


def main() -> None:
    """Console-script entry point."""
    from deathstar.cli_ec2 import ec2_app

    if config.FILE_ERROR:
        err.print(f"[bold red]error:[/] {config.FILE_ERROR}", highlight=False)
        raise SystemExit(EXIT_USAGE)
    app.add_typer(ec2_app, name="ec2")
    app()


__all__ = ["app", "main", "summary_table"]
