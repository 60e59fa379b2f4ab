"""The tables scripts/bench.py prints and writes: the figures it collected (``Results``);
one row per workload metric with each deathstar column's figure and each peer's, with the
embedded figure's ratio to it; and issue 16's targets (bench_targets) with holds/misses."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from dataclasses import dataclass
from typing import Any

from bench_targets import COLUMNS, TARGETS, holds_text, judge_all, summary

ALL_PEERS = ["pool", "ppe", "loky", "dask", "ray"]
TITLES = {"deathstar": "deathstar\nembedded", "deathstar-tcp": "deathstar\nTCP loopback",
          "pool": "mp.Pool", "ppe": "ProcessPool\nExecutor", "loky": "loky",
          "dask": "Dask", "ray": "Ray", "floor": "raw pyzmq\n(floor)",
          "chain": "brokered pyzmq\n(floor)", "serial": "serial"}


class Results:
    """samples[system][key] -> list of numbers; errors[system][key] -> text."""

    def __init__(self) -> None:
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.errors: dict[str, dict[str, str]] = {}
        self.notes: list[str] = []

    def add(self, system: str, key: str, value: float) -> None:
        self.samples.setdefault(system, {}).setdefault(key, []).append(float(value))

    def error(self, system: str, key: str, text: str) -> None:
        self.errors.setdefault(system, {})[key] = text

    def get(self, system: str, key: str) -> float | None:
        values = self.samples.get(system, {}).get(key)
        return statistics.median(values) if values else None

    def err(self, system: str, key: str) -> str | None:
        errs = self.errors.get(system, {})
        return errs.get(key) or errs.get(key.split(".")[0])


@dataclass
class Row:
    workload: str
    metric: str
    key: str
    higher_better: bool
    peers: dict[str, str]  # column -> system whose figure goes there (key may differ)
    fmt: str = "{:,.0f}"
    peer_keys: dict[str, str] | None = None  # column -> key, when not ``key``


def rows_for(only: list[str], seeds: int) -> list[Row]:
    """The comparison table's rows for the workloads that ran (``seeds``: W5's count)."""
    cols = {p: p for p in ALL_PEERS}
    rows = []
    if "SETUP" in only:
        rows += [Row("setup", "s to 1st result", "setup_s", False, cols, "{:.2f}")]
    if "W1" in only:
        rows += [Row("W1 batched", "tasks/s", "W1.batched.tasks_s", True, cols),
                 Row("W1 one/msg", "tasks/s", "W1.one.tasks_s", True,
                     {**{p: p for p in ("pool", "ppe", "loky")}, "chain": "chain"})]
    if "W2" in only:
        floors = {"floor": "floor", "chain": "chain"}
        rows += [Row("W2 latency", "median µs", "W2.median_us", False, {**cols, **floors}),
                 Row("W2 latency", "p99 µs", "W2.p99_us", False, {**cols, **floors})]
    if "W3" in only:
        rows += [Row("W3 compute", "efficiency", "W3.efficiency", True, cols, "{:.3f}")]
    if "W4" in only:
        rows += [Row("W4 payload", "MB/s", "W4.MB_s", True, {**cols, "floor": "floor"})]
    if "W5" in only:
        rows += [Row("W5 skew", f"makespan/ideal, worst of {seeds} seeds", "W5.worst",
                     False, cols, "{:.3f}")]
    if "W6" in only:
        rows += [Row("W6 common", "wall s", "W6.wall_s", False, cols, "{:.3f}"),
                 Row("W6 common", "MB sent (client)", "W6.sent_MB", False, {}, "{:,.1f}")]
    if "W7" in only:
        rows += [Row("W7 scale", "daemon CPU µs/task, 2 workers", "W7.daemon_us_2", False, {}),
                 Row("W7 scale", "… with 300 workers", "W7.daemon_us_300", False, {}),
                 Row("W7 scale", "tasks/s", "W7.tasks_s", True, {"pool": "pool"}),
                 Row("W7 scale", "peak RSS MB", "W7.peak_rss_MB", False, {"pool": "pool"},
                     "{:,.0f}")]
    if "IDLE" in only:
        rows += [Row("idle", "CPU % of a core", "IDLE.cpu_pct", False, cols, "{:.2f}")]
    if "GRID" in only:
        rows += [Row("GridSearchCV", "wall s (joblib)", "GRID.wall_s", False,
                     {"loky": "loky"}, "{:.2f}")]
    return rows


def ratio(ds: float | None, peer: float | None, higher_better: bool) -> float | None:
    """deathstar vs peer, oriented so that > 1 means deathstar is better."""
    if ds is None or peer is None or ds <= 0 or peer <= 0:
        return None
    return ds / peer if higher_better else peer / ds


def cell(res: Results, system: str, key: str, fmt: str, ds: float | None,
         higher_better: bool, with_ratio: bool) -> str:
    value = res.get(system, key)
    if value is None:
        e = res.err(system, key)
        return "timeout" if e == "timeout" else ("err" if e else "—")
    text = fmt.format(value)
    r = ratio(ds, value, higher_better) if with_ratio else None
    if r is not None:
        text += f" ({r:.2f}×)" if r < 100 else f" ({r:,.0f}×)"
    return text


def render(res: Results, rows: list[Row], columns: list[str], ds_columns: list[str],
           meta: dict[str, Any]) -> dict[str, Any]:
    """Print the comparison table, issue 16's targets and the notes (rich when
    importable, else plain lines); return both tables as data (for --json)."""
    only = meta["only"]
    judged = judge_all(res, only, ds_columns, meta["sizes"]["w5_seeds"])
    table_rows = table_data(res, rows, columns, ds_columns)
    load = (f"load average (1, 5, 15 min) {meta['load_at_start']} at the start, "
            f"{meta['load_at_end']} at the end")
    header = (f"deathstar vs peers, {meta['workers']} workers, {meta['cpus']} cores, "
              f"median of {meta['reps']} after a warm-up; {load}. Peer cells: figure "
              f"(ratio); ratio = deathstar embedded/peer oriented so that > 1 means "
              f"deathstar is better.")
    titles = [TITLES[c] for c in ds_columns] + [TITLES[c] for c in columns]
    cells = [[row.workload, row.metric]
             + [cell(res, c, row.key, row.fmt, None, row.higher_better, False)
                for c in ds_columns]
             + ["" if row.peers.get(c) is None else
                cell(res, row.peers[c], row.key, row.fmt, res.get("deathstar", row.key),
                     row.higher_better, True) for c in columns]
             for row in rows]
    _print_table(header, ["workload", "metric", *titles], cells, len(ds_columns))
    if judged:
        _print_table(f"Targets of issue 16: ratio = deathstar ÷ peer, in this run; {load}",
                     ["target", "need", *[TITLES[c] for c in ds_columns], "peer",
                      *[f"{COLUMNS[c]} ÷ peer" for c in ds_columns], "holds"],
                     [target_cells(res, e, ds_columns) for e in judged], len(ds_columns))
        print(summary(judged))
    for line in detail_lines(judged):
        print(f"  {line}")
    for note in res.notes:
        print(f"  note: {note}")
    return {"rows": table_rows, "targets": judged}


def target_cells(res: Results, entry: dict[str, Any], ds_columns: list[str]) -> list[str]:
    t = next(t for t in TARGETS if t.key == entry["key"])
    figures = [cell(res, c, t.key, t.fmt, None, True, False) for c in ds_columns]
    peer = "" if entry["peer"] is None else (
        f"{t.peer_label} " + cell(res, entry["peer"], t.key, t.fmt, None, True, False))
    ratios = [f"{r:.2f}×" if r is not None else "" for r in
              (entry["ratios"].get(c) for c in ds_columns)]
    return [entry["target"], entry["need"], *figures, peer, *ratios, holds_text(entry)]


def detail_lines(judged: list[dict[str, Any]]) -> list[str]:
    """What the targets table has no room for: W5's per-seed figures, the serial
    GridSearchCV wall, and the errors behind "err" cells."""
    lines = []
    for entry in judged:
        for system, figures in entry.get("seeds", {}).items():
            shown = ", ".join("—" if f is None else f"{f:.3f}" for f in figures)
            lines.append(f"{entry['target']}: {TITLES[system]}: {shown}")
        for label, value in entry["also"].items():
            if value is not None:
                lines.append(f"{entry['target']}: {label} {value:.2f} s")
        for system, error in entry["errors"].items():
            lines.append(f"{entry['target']}: {TITLES[system]} failed: {error}")
    return [line.replace("\n", " ") for line in lines]


def table_data(res: Results, rows: list[Row], columns: list[str],
               ds_columns: list[str]) -> list[dict[str, Any]]:
    """One entry a row: each deathstar column's figure, each peer's, and the ratios of
    the embedded figure to the peers'."""
    table_rows = []
    for row in rows:
        ds = res.get("deathstar", row.key)
        entry: dict[str, Any] = {"workload": row.workload, "metric": row.metric,
                                 "key": row.key, "higher_is_better": row.higher_better,
                                 "deathstar": ds, "peers": {}, "ratios": {}}
        for column in ds_columns:
            entry[column] = res.get(column, row.key)
        for col in columns:
            system = row.peers.get(col)
            if system is None:
                continue
            v = res.get(system, row.key)
            entry["peers"][col] = v
            entry["ratios"][col] = ratio(ds, v, row.higher_better)
        table_rows.append(entry)
    return table_rows


def _print_table(title: str, headers: list[str], rows: list[list[str]], bold: int) -> None:
    """A table: rich's when importable, else tab-free plain lines. The first two
    columns are labels, the next ``bold`` ones deathstar's."""
    if importlib.util.find_spec("rich") is None:
        print(title)
        for cells in rows:
            print("  ".join(f"{h.replace(chr(10), ' ')}={c}" if i >= 2 else c
                            for i, (h, c) in enumerate(zip(headers, cells))))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 220)
    table = Table(title=title, title_justify="left", show_lines=True)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < 2 else "right",
                         style="bold" if 2 <= i < 2 + bold else None)
    for cells in rows:
        table.add_row(*(_coloured(c) if h == "holds" else c for h, c in zip(headers, cells)))
    console.print(table)


def _coloured(holds: str) -> str:
    """A holds cell ("embedded yes; TCP no") with yes in green, no and err in red."""
    return "; ".join(part.replace(" yes", " [green]yes[/]").replace(" no", " [red]no[/]")
                     .replace(" err", " [red]err[/]") for part in holds.split("; "))
