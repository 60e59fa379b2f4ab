"""The ``deathstar`` command: parses, calls the library, renders with rich. The only
module that touches the terminal.

Exit codes (also in the README):
    0  every input succeeded            3  some inputs failed (the rest are in the output)
    2  bad command-line usage           4  no node of the cluster could be reached
    5  bad input (function, file, arguments, output)          130  interrupted
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import pickle
import socket
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

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
from deathstar.nodes import ClusterSpecError
from deathstar.report import NodeSummary, TaskRecord, node_summary, write_report
from deathstar.serialize import SerializationError

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_TASKS_FAILED = 3
EXIT_NO_NODES = 4
EXIT_BAD_INPUT = 5
EXIT_INTERRUPTED = 130

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run a Python function over a list of inputs on many machines at once.")
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
    insecure: Annotated[bool, typer.Option(
        help="Listen beyond loopback with no authentication: anyone who can reach the "
             "ports can run code as this user.")] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    parent_pid: Annotated[Optional[int], typer.Option(hidden=True)] = None,
    ready_json: Annotated[bool, typer.Option(hidden=True)] = False,
) -> None:
    """Run a node: exec port for work, status port for queries, a worker per core."""
    from deathstar.broker import run_daemon

    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise _fail(f"--log-level {log_level}: use debug, info, warning or error", EXIT_USAGE)
    _setup_logging("daemon", log_level)
    if workers is not None and workers < 0:
        raise _fail("--workers must be 0 or more", EXIT_USAGE)
    if not _is_loopback(host) and not insecure:
        raise _fail(
            f"refusing to listen on {host} without authentication: anyone who can reach "
            "it could run code here. Listen on 127.0.0.1, or pass --insecure on a network "
            "you trust.", EXIT_USAGE)
    if not _is_loopback(host):
        err.print(f"[bold yellow]WARNING:[/] listening on {host} with no authentication "
                  "(--insecure): anyone who can reach these ports can run code as this user.")

    def on_ready(ports: dict[str, int]) -> None:
        if ready_json:
            print(json.dumps(ports), flush=True)
        logging.getLogger("deathstar.daemon").info(
            "listening on %s: exec %d, status %d, workers %d; %s local worker(s)", host,
            ports["exec"], ports["status"], ports["workers"],
            workers if workers is not None else os.cpu_count())

    try:
        run_daemon(host=host, port=port, workers=workers, worker_port=worker_port,
                   heartbeat_s=heartbeat, parent_pid=parent_pid, on_ready=on_ready)
    except OSError as exc:  # zmq.ZMQError is an OSError: port in use, bad address
        raise _fail(f"cannot listen on {host}:{port}: {exc}", EXIT_USAGE) from None


@app.command()
def worker(
    connect: Annotated[str, typer.Option(help="The daemon's worker endpoint, "
                                         "e.g. tcp://node1:6002.")],
) -> None:
    """Run one worker for a daemon, from any machine that can reach it."""
    from deathstar.worker import main as worker_main

    raise typer.Exit(worker_main(connect))


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
) -> None:
    """Capacity, load, and versions of each node."""
    from deathstar.protocol import local_versions

    try:
        rows = query_status(nodes, timeout)
    except ClusterSpecError as exc:
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
                    "clients", "uptime", "load", "versions"):
            table.add_column(col, justify="right" if col not in ("node", "host", "versions")
                             else "left")
        for row in rows:
            if row["error"]:
                table.add_row(row["node"], f"[red]{row['error']}[/]", *[""] * 10)
                continue
            v = row.get("versions", {})
            text = f"deathstar {v.get('deathstar')}, py {v.get('python')}, " \
                   f"protocol {v.get('protocol')}"
            if row["mismatch"]:
                text = f"[red]{text} (differs: {', '.join(row['mismatch'])})[/]"
            table.add_row(row["node"], str(row.get("hostname")), str(row.get("workers")),
                          str(row.get("idle")), str(row.get("busy")), str(row.get("queued")),
                          str(row.get("tasks_done")), str(row.get("tasks_lost")),
                          str(row.get("clients")), _fmt_uptime(row.get("uptime_s", 0)),
                          f"{row.get('load1', 0):.2f}", text)
        Console(width=None if sys.stdout.isatty() else _PIPE_WIDTH).print(table)
    if all(r["error"] for r in rows):
        raise typer.Exit(EXIT_NO_NODES)


# ---------------------------------------------------------------------- map


class _Output:
    """Where results go: JSONL lines in input order to stdout or a file, or a pickle."""

    def __init__(self, path: Path | None):
        self.path = path
        self.pickled = path is not None and path.suffix.lower() in (".pkl", ".pickle")
        self.values: list[Any] = []
        self.fh = sys.stdout if path is None else (None if self.pickled else path.open("w"))

    def write(self, index: int, ok: bool, value: Any, record: TaskRecord) -> None:
        if self.pickled:
            self.values.append(value)
            return
        if ok:
            line = {"index": index, "result": value}
        else:
            line = {"index": index, "error": {"type": getattr(value, "type_name",
                                                                type(value).__name__),
                                              "message": getattr(value, "message", str(value)),
                                              "node": record.node, "worker": record.worker,
                                              "attempts": record.attempts}}
        try:
            text = json.dumps(line, default=_json_default)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"the result of input {index} ({type(value).__name__}) cannot be written as "
                f"JSON ({exc}); write a pickle instead: --out results.pkl") from None
        assert self.fh is not None
        self.fh.write(text + "\n")

    def close(self) -> None:
        if self.pickled and self.path is not None:
            with self.path.open("wb") as fh:
                pickle.dump(self.values, fh, protocol=5)
        elif self.fh is not None and self.fh is not sys.stdout:
            self.fh.close()
        elif self.fh is sys.stdout:
            sys.stdout.flush()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


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

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
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
    out: Annotated[Optional[Path], typer.Option(help="Results: .jsonl (default: stdout) "
                                                "or .pkl.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write the execution report "
                                                   "(.json or .csv).")] = None,
    chunksize: Annotated[Optional[int], typer.Option(help="Inputs per message "
                                                     "[default: adaptive].")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Workers of the embedded local "
                                                   "cluster [default: one per core].")] = None,
    connect_timeout: Annotated[float, typer.Option(help="Seconds to wait for each node.")]
    = config.CONNECT_TIMEOUT_S,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary.")]
    = False,
) -> None:
    """Run FUNCTION over every input in --args on the cluster; results in input order."""
    _setup_logging("client")
    try:
        fn = load_function(function)
        common = parse_kwargs(kwargs)
        calls, total = read_calls(args)
        if chunksize is not None and chunksize < 1:
            raise InputError("--chunksize must be at least 1")
        if out is not None and out.suffix.lower() not in (".jsonl", ".json", ".pkl", ".pickle"):
            raise InputError(f"--out {out}: use a .jsonl or a .pkl file")
        if report is not None and report.suffix.lower() not in (".json", ".csv"):
            raise InputError(f"--report {report}: use a .json or a .csv file")
    except InputError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from None
    try:
        cl = Cluster(cluster, connect_timeout=connect_timeout, workers=workers)
    except ClusterSpecError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    except NoNodesError as exc:
        raise _fail(str(exc), EXIT_NO_NODES) from None
    for problem in cl.unreachable:
        err.print(f"[yellow]warning:[/] going on without {problem}", highlight=False)
    code = _run_map(cl, fn, common, calls, total, out, report, chunksize, quiet)
    raise typer.Exit(code)


def _run_map(cl: Cluster, fn: Any, common: dict[str, Any], calls: Iterator[Any],
             total: int, out: Path | None, report_path: Path | None,
             chunksize: int | None, quiet: bool) -> int:
    started = time.monotonic()
    records: list[TaskRecord] = []
    failed: list[TaskFailed] = []
    output = _Output(out)
    display = _Display(cl, total, enabled=not quiet)
    code = EXIT_OK
    try:
        stream = cl.outcomes(fn, calls, chunksize=chunksize, total=total, **common)
        for index, ok, value, record in ordered(stream):
            output.write(index, ok, value, record)
            records.append(record)
            if not ok:
                failed.append(value)
            display.update(ok)
    except (InputError, SerializationError) as exc:
        code = EXIT_BAD_INPUT
        display.close()
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
    except NoNodesError as exc:
        code = EXIT_NO_NODES
        display.close()
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
        display.close()
        err.print("interrupted: the inputs not yet run were cancelled")
    finally:
        display.close()
        output.close()
        cl.close()
    if report_path is not None:
        write_report(records, report_path)
    if not quiet:
        if records:
            err.print(summary_table(node_summary(records), time.monotonic() - started))
        for exc in failed[:3]:
            err.print(f"[red]input {exc.index} failed:[/] {exc}", highlight=False)
        if len(failed) > 3:
            err.print(f"[red]... and {len(failed) - 3} more failed inputs[/]")
    if code == EXIT_OK and failed:
        code = EXIT_TASKS_FAILED
    return code


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main", "summary_table"]
