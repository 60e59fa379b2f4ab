"""What the command modules share: the stderr console, ``fail``, logging setup, the
``--keys`` option, size and duration parsing, and the node summary table.

Imports nothing else from ``deathstar.cli``: every command module may import it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Mapping, Optional

import typer
from rich.console import Console
from rich.table import Table

from deathstar import config
from deathstar.exitcodes import ExitCode
from deathstar.report import NodeSummary, TaskRecord, plot_report

__all__ = ["KeysOption", "err", "fail", "out", "parse_duration", "parse_size", "setup_logging",
           "summary_table", "write_plot"]

#: Piped output gets wide tables instead of rich's default 80 columns.
PIPE_WIDTH = 160

#: Progress, warnings, errors and summaries go to stderr; stdout carries only results.
err = Console(stderr=True, width=None if sys.stderr.isatty() else PIPE_WIDTH)

KeysOption = Annotated[Optional[str], typer.Option(
    "--keys", help="Key folder (deathstar keygen) [default: $DEATHSTAR_KEYS, else the "
                   "config folder's keys when present]; 'none' for no keys.")]


def out() -> Console:
    """A console on stdout, for the tables a command prints as its result."""
    return Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)


def fail(message: str, code: int) -> typer.Exit:
    """Print ``error: message`` on stderr; ``raise fail(...)`` ends the command with
    ``code`` (an ``ExitCode``, or the one an error carries, like ``Ec2Error.code``)."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def setup_logging(prefix: str, level: str = "info") -> None:
    logging.basicConfig(level=logging.DEBUG if config.DEBUG else level.upper(),
                        format=f"%(asctime)s {prefix} %(levelname)s %(message)s")


def _scaled(text: str, units: Mapping[str, float], example: str) -> float:
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


def write_plot(records: list[TaskRecord], path: Path) -> None:
    """Draw a run's timeline and per-node chart (``--plot``); needs matplotlib."""
    try:
        plot_report(records, path)
    except ImportError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    err.print(f"plot written to {path}", highlight=False)


def announce_cluster(provider: str, name: str, addresses: list[str]) -> None:
    """After ``PROVIDER up``: each node's address on stdout (one a line, for scripts) and
    how to use and remove the cluster on stderr."""
    for address in addresses:
        typer.echo(address)
    err.print(f"use it: deathstar map ... --cluster {provider}:{name}   "
              f"(then: deathstar {provider} down --name {name})", highlight=False)
