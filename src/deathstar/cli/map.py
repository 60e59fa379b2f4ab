"""``deathstar map``: run a function over the inputs of a file on a cluster, and its
terminal display (parsing and rendering only; the work is in ``deathstar.client``)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from deathstar import config
from deathstar.cli.common import KeysOption, err, fail, setup_logging, summary_table, write_plot
from deathstar.cli.inputs import (InputError, Inputs, load_function, parse_kwargs,
                                  read_inputs)
from deathstar.cli.output import OutputError, Previous, ResultWriter, read_previous
from deathstar.client import Cluster, NoNodesError, ordered
from deathstar.client.outcomes import Batch, Outcome, in_order
from deathstar.errors import describe
from deathstar.exitcodes import ExitCode
from deathstar.keys import KeyFileError
from deathstar.nodes import ClusterSpecError
from deathstar.report import ReportWriter, Tally, TaskRecord
from deathstar.serialize import SerializationError


class _Display:
    """Progress on stderr: a bar and a live per-node table on a terminal, else a plain
    line every few seconds."""

    def __init__(self, cluster: Cluster, total: int | None, enabled: bool) -> None:
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
            shown = "?" if self.total is None else str(self.total)
            err.print(f"deathstar: {self.done}/{shown} done, {self.failed} failed, "
                      f"{self.done / (time.monotonic() - self.started):,.0f} tasks/s",
                      highlight=False)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def _node_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False)
    for col in ("node", "state", "workers", "in flight", "done", "failed", "tasks/s",
                "lag ms"):
        table.add_column(col, justify="left" if col in ("node", "state") else "right")
    for row in rows:
        lag = "" if row["lag_ms"] is None else f"{row['lag_ms']:,.1f}"
        table.add_row(row["node"], row["state"], str(row["workers"]), str(row["in_flight"]),
                      str(row["done"]), str(row["failed"]), f"{row['rate']:,.1f}", lag)
    return table


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
    setup_logging("client")
    try:
        fn = load_function(function)
        common = parse_kwargs(kwargs)
        inputs = read_inputs(args)
        total = inputs.total
        _check_map_options(out, report, resume, retry_failed, timeout, max_attempts,
                           chunksize)
        previous = read_previous(out, retry_failed) if resume and out is not None \
            else Previous()
        output = ResultWriter(out, append=resume)  # locked: a second map stops here
    except (InputError, OutputError) as exc:
        raise fail(str(exc), ExitCode.BAD_INPUT) from None
    cl = _connect(cluster, connect_timeout, workers, keys)
    skip = previous.succeeded | previous.failed
    if skip:
        err.print(f"resuming: {len(skip)} input(s) already in {out} "
                  f"({len(previous.failed)} of them failed)", highlight=False)
    run = _MapRun(cl, output,
                  ReportWriter(report) if report is not None else None,
                  _Display(cl, total - len(skip), enabled=not quiet), quiet,
                  earlier_failures=len(previous.failed), keep_records=plot is not None)
    options: dict[str, Any] = dict(chunksize=chunksize, timeout=timeout,
                                   max_attempts=max_attempts, seed=seed,
                                   capture_output=capture_output)
    code = run.run(fn, common, inputs, skip, total - len(skip), options)
    if plot is not None and run.records:
        write_plot(run.records, plot)
    raise typer.Exit(code)


def _connect(spec: str | None, connect_timeout: float, workers: int | None,
             keys: str | None) -> Cluster:
    """The cluster of ``--cluster``, warning about the nodes it goes on without."""
    try:
        cl = Cluster(spec, connect_timeout=connect_timeout, workers=workers, keys=keys)
    except (ClusterSpecError, KeyFileError) as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    except NoNodesError as exc:
        raise fail(str(exc), ExitCode.NO_NODES) from None
    for problem in cl.unreachable:
        err.print(f"[yellow]warning:[/] going on without {problem}", highlight=False)
    return cl


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
                 display: _Display, quiet: bool, earlier_failures: int = 0,
                 keep_records: bool = False) -> None:
        self.cluster = cluster
        self.output = output
        self.report = report
        self.display = display
        self.quiet = quiet
        self.tally = Tally()
        #: every record, kept only for --plot
        self.records: list[TaskRecord] | None = [] if keep_records else None
        self.failed: list[BaseException] = []
        #: with --resume, the failures already in the output: the exit code speaks for the
        #: whole output
        self.failed_count = earlier_failures

    def run(self, fn: Any, common: dict[str, Any], inputs: Inputs, skip: set[int],
            total: int, options: dict[str, Any]) -> ExitCode:
        started = time.monotonic()
        kept: list[int] = []  # with --resume: the original index of each input sent

        def remaining() -> Iterator[Any]:
            for index, call in enumerate(inputs.calls):
                if index not in skip:
                    kept.append(index)
                    yield call

        code = ExitCode.OK
        try:
            progress = self.display.progress_callback
            if skip:
                stream = self.cluster.outcomes(fn, remaining(),
                                               indices=(kept[i] for i in itertools.count()),
                                               total=total, progress=progress, **options,
                                               **common)
                for index, ok, value, record in ordered(stream, kept):
                    self.deliver(index, ok, value, record)
            else:  # by message: a batch of results is written, tallied, reported at once
                pieces = self.cluster.deliveries(
                    fn, iter(()) if inputs.plain is not None else inputs.calls,
                    plain=inputs.plain, total=total, progress=progress, **options, **common)
                for piece in in_order(pieces):
                    self.deliver_piece(piece)
        except (InputError, SerializationError, OutputError) as exc:
            code = self.stop(ExitCode.BAD_INPUT, f"[bold red]error:[/] {exc}")
        except NoNodesError as exc:
            code = self.stop(ExitCode.NO_NODES, f"[bold red]error:[/] {exc}")
        except KeyboardInterrupt:
            code = self.stop(ExitCode.INTERRUPTED, "interrupted: queued inputs were cancelled "
                             "and running ones stopped; finished results are in the output")
        finally:
            self.display.close()
            self.output.close()
            if self.report is not None:
                self.report.close()
            self.cluster.close()
        self.print_summary(time.monotonic() - started)
        if code == ExitCode.OK and self.failed_count:
            code = ExitCode.TASKS_FAILED
        return code

    def deliver_piece(self, piece: list[Outcome] | Batch) -> None:
        if not isinstance(piece, Batch):
            for outcome in piece:
                self.deliver(*outcome)
            return
        self.output.write_batch(piece.indices, piece.values)
        self.tally.add_batch(piece.node, piece.worker, len(piece), piece.busy_s())
        if self.report is not None or self.records is not None:
            records = piece.records()
            if self.report is not None:
                for record in records:
                    self.report.add(record)
            if self.records is not None:
                self.records.extend(records)

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
            self.display.failure()

    def stop(self, code: ExitCode, message: str) -> ExitCode:
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
            info = describe(exc)  # what the function raised comes back as itself
            where = f" on {info['node']} ({info['worker']})" if info["node"] else ""
            err.print(f"[red]input {getattr(exc, 'index', '?')} failed{where}:[/] "
                      f"{info['type']}: {info['message']}", highlight=False)
            if info["traceback"]:
                err.print(info["traceback"].rstrip(), highlight=False, markup=False)
        if self.failed_count > len(self.failed):
            err.print(f"[red]... and {self.failed_count - len(self.failed)} more failed "
                      "inputs[/]", highlight=False)


