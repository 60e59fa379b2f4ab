"""``deathstar report``: the node summary and per-node figures of a report that
``deathstar map --report`` wrote, and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from deathstar.cli.common import fail, out, summary_table, write_plot
from deathstar.exitcodes import ExitCode
from deathstar.report import NodeFigures, node_figures, node_summary, read_report


def report(
    path: Annotated[Path, typer.Argument(help="A report written by map --report.")],
    plot: Annotated[Optional[Path], typer.Option(help="Also draw a timeline and a per-node "
                                                 "chart into this image (.png).")] = None,
) -> None:
    """The node summary and per-node figures of a report; --plot draws it."""
    try:
        records = read_report(path)
    except (OSError, ValueError, KeyError) as exc:
        raise fail(f"{path}: not a readable report ({exc})", ExitCode.BAD_INPUT) from None
    console = out()
    console.print(summary_table(node_summary(records)))
    console.print(figures_table(node_figures(records)))
    if plot is not None:
        write_plot(records, plot)


def figures_table(figures: list[NodeFigures]) -> Table:
    table = Table(title="per node")
    for col in ("node", "tasks", "failed", "mean s", "p50 s", "p95 s", "busy share",
                "retries"):
        table.add_column(col, justify="left" if col == "node" else "right")
    for f in figures:
        table.add_row(f.node, str(f.tasks), str(f.failed), f"{f.mean_s:.4f}",
                      f"{f.p50_s:.4f}", f"{f.p95_s:.4f}", f"{f.busy_share:.0%}",
                      str(f.retries))
    return table
