"""The table scripts/bench.py prints and writes: the figures it collected (``Results``),
one row per workload metric, each peer's figure with deathstar's ratio to it, and whether
issue 5's targets hold."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from dataclasses import dataclass
from typing import Any

ALL_PEERS = ["pool", "ppe", "loky", "dask", "ray"]
PEER_TITLES = {"pool": "mp.Pool", "ppe": "ProcessPool\nExecutor", "loky": "loky",
               "dask": "Dask", "ray": "Ray", "floor": "raw pyzmq\n(floor)",
               "chain": "brokered pyzmq\n(floor)"}


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


def rows_for(only: list[str]) -> list[Row]:
    cols = {p: p for p in ALL_PEERS}
    rows = [Row("setup", "s to 1st result", "setup_s", False, cols, "{:.2f}")]
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
        rows += [Row("W5 skew", "makespan/ideal", "W5.makespan_ideal", False, cols, "{:.3f}")]
    if "W6" in only:
        rows += [Row("W6 common", "wall s", "W6.wall_s", False, cols, "{:.3f}"),
                 Row("W6 common", "MB sent (client)", "W6.sent_MB", False, {}, "{:,.1f}")]
    if "W7" in only:
        rows += [Row("W7 scale", "daemon CPU µs/task, 2 workers", "W7.daemon_us_2", False, {}),
                 Row("W7 scale", "… with 300 workers", "W7.daemon_us_300", False, {}),
                 Row("W7 scale", "tasks/s", "W7.tasks_s", True, {"pool": "pool"}),
                 Row("W7 scale", "peak RSS MB", "W7.peak_rss_MB", False, {"pool": "pool"},
                     "{:,.0f}")]
    return rows


def ratio(ds: float | None, peer: float | None, higher_better: bool) -> float | None:
    """deathstar vs peer, oriented so that > 1 means deathstar is better."""
    if ds is None or peer is None or ds <= 0 or peer <= 0:
        return None
    return ds / peer if higher_better else peer / ds


def targets(res: Results, workers: int) -> dict[str, tuple[str, bool | None, str]]:
    """Row key -> (target text, holds?, the figures it was judged on)."""
    g = res.get
    out: dict[str, tuple[str, bool | None, str]] = {}

    def check(parts: list[tuple[str, float | None, float]]) -> tuple[bool | None, str]:
        known = [(label, r, need) for label, r, need in parts if r is not None]
        if not known:
            return None, "no figures"
        ok = all(r >= need for _, r, need in known)
        text = "; ".join(f"{label} {r:.2f}× (need ≥{need:g})" for label, r, need in known)
        missing = [label for label, r, _ in parts if r is None]
        if missing:
            text += "; n/a: " + ", ".join(missing)
        return ok, text

    ds = "deathstar"
    s = g(ds, "setup_s")
    if s is not None:
        out["setup_s"] = ("≤ 0.5 s", s <= 0.5, f"{s:.3f} s")
    ok, text = check([("vs Pool", ratio(g(ds, "W1.batched.tasks_s"), g("pool", "W1.batched.tasks_s"), True), 1.0),
                      ("vs Dask", ratio(g(ds, "W1.batched.tasks_s"), g("dask", "W1.batched.tasks_s"), True), 100.0),
                      ("vs Ray", ratio(g(ds, "W1.batched.tasks_s"), g("ray", "W1.batched.tasks_s"), True), 100.0)])
    out["W1.batched.tasks_s"] = ("≥1× Pool; ≥100× Dask, Ray", ok, text)
    ok, text = check([("vs Pool c=1", ratio(g(ds, "W1.one.tasks_s"), g("pool", "W1.one.tasks_s"), True), 1.0)])
    out["W1.one.tasks_s"] = ("≥1× Pool(chunksize=1)", ok, text)
    # ds ≤ 1× Pool.apply  <=>  pool/ds ≥ 1;  ds ≤ 2× raw  <=>  raw/ds ≥ 0.5
    ok, text = check([("vs Pool.apply", ratio(g(ds, "W2.median_us"), g("pool", "W2.median_us"), False), 1.0),
                      ("vs raw", ratio(g(ds, "W2.median_us"), g("floor", "W2.median_us"), False), 0.5)])
    out["W2.median_us"] = ("≤1× Pool.apply; ≤2× raw", ok, text)
    eff, pool_eff = g(ds, "W3.efficiency"), g("pool", "W3.efficiency")
    if eff is not None:
        holds = eff >= 0.95 or (pool_eff is not None and eff >= pool_eff)
        out["W3.efficiency"] = ("≥ 0.95 (or ≥ Pool's)", holds,
                                f"{eff:.3f}" + (f" vs Pool {pool_eff:.3f}" if pool_eff else ""))
    best = max([v for v in (g("dask", "W4.MB_s"), g("ray", "W4.MB_s")) if v is not None],
               default=None)
    ok, text = check([("vs raw", ratio(g(ds, "W4.MB_s"), g("floor", "W4.MB_s"), True), 0.5),
                      ("vs best(Dask,Ray)", ratio(g(ds, "W4.MB_s"), best, True), 1.5)])
    out["W4.MB_s"] = ("≥0.5× raw; ≥1.5× best(Dask,Ray)", ok, text)
    m = g(ds, "W5.makespan_ideal")
    if m is not None:
        out["W5.makespan_ideal"] = ("≤ 1.06", m <= 1.06, f"{m:.3f}")
    sent, common = g(ds, "W6.sent_MB"), g(ds, "W6.common_MB")
    if sent is not None and common:
        once = common * 1  # one node: the embedded daemon
        out["W6.sent_MB"] = ("≈ size × nodes", sent <= 1.1 * once,
                             f"{sent:,.1f} MB sent for {common:,.1f} MB × 1 node "
                             f"= {sent / once:.2f}×")
    tps = g(ds, "W7.tasks_s")
    if tps is not None:
        out["W7.tasks_s"] = ("≥ 100,000 tasks/s", tps >= 100_000, f"{tps:,.0f}")
    few, many = g(ds, "W7.daemon_us_2"), g(ds, "W7.daemon_us_300")
    if few and many:
        out["W7.daemon_us_300"] = ("per-task cost flat in workers", many <= 1.5 * few,
                                   f"{few:.0f} µs/task with 2 workers, {many:.0f} with 300 "
                                   f"= {many / few:.2f}×")
    rss = g(ds, "W7.peak_rss_MB")
    if rss is not None:
        out["W7.peak_rss_MB"] = ("≤ 300 MB", rss <= 300, f"{rss:,.0f} MB")
    return out


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


def render(res: Results, rows: list[Row], columns: list[str], workers: int,
           meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Print the table (rich when importable, else plain lines), the targets and the
    notes; return the table's rows as data (for --json)."""
    judged = targets(res, workers)
    table_rows = table_data(res, rows, columns, judged)
    header = (f"deathstar vs peers, {workers} workers, {meta['cpus']} cores, "
              f"median of {meta['reps']} after a warm-up. Peer cells: figure (ratio); "
              f"ratio = deathstar/peer oriented so that > 1 means deathstar is better.")
    if importlib.util.find_spec("rich") is None:  # without rich: plain lines
        _print_plain(res, rows, columns, table_rows, header)
    else:
        _print_rich(res, rows, columns, table_rows, header)
    print("\nTargets (issue 5):")
    for row in rows:
        t = judged.get(row.key)
        if t is not None:
            mark = "HOLDS" if t[1] else "MISSED" if t[1] is False else "?"
            print(f"  {mark:<6} {row.workload} {row.metric}: {t[0]} — {t[2]}")
    for note in res.notes:
        print(f"  note: {note}")
    return table_rows


def table_data(res: Results, rows: list[Row], columns: list[str],
               judged: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry a row: deathstar's figure, each peer's, the ratios and the target."""
    table_rows = []
    for row in rows:
        ds = res.get("deathstar", row.key)
        entry: dict[str, Any] = {"workload": row.workload, "metric": row.metric,
                                 "key": row.key, "higher_is_better": row.higher_better,
                                 "deathstar": ds, "peers": {}, "ratios": {}}
        for col in columns:
            system = row.peers.get(col)
            if system is None:
                continue
            v = res.get(system, row.key)
            entry["peers"][col] = v
            entry["ratios"][col] = ratio(ds, v, row.higher_better)
        t = judged.get(row.key)
        if t is not None:
            entry["target"], entry["holds"], entry["judged_on"] = t
        table_rows.append(entry)
    return table_rows


def _print_rich(res: Results, rows: list[Row], columns: list[str],
                table_rows: list[dict[str, Any]], header: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=header, title_justify="left", show_lines=True)
    table.add_column("workload")
    table.add_column("metric")
    table.add_column("deathstar", justify="right", style="bold")
    for col in columns:
        table.add_column(PEER_TITLES[col], justify="right")
    table.add_column("target")
    table.add_column("holds")
    for row, entry in zip(rows, table_rows):
        ds = entry["deathstar"]
        cells = [row.workload, row.metric,
                 cell(res, "deathstar", row.key, row.fmt, None, row.higher_better, False)]
        for col in columns:
            system = row.peers.get(col)
            cells.append("" if system is None else
                         cell(res, system, row.key, row.fmt, ds, row.higher_better, True))
        holds = entry.get("holds")
        cells += [entry.get("target", ""),
                  "" if "target" not in entry else
                  ("[green]yes[/]" if holds else "[red]no[/]" if holds is False else "?")]
        table.add_row(*cells)
    console.print(table)


def _print_plain(res: Results, rows: list[Row], columns: list[str],
                 table_rows: list[dict[str, Any]], header: str) -> None:
    print(header)
    for row, entry in zip(rows, table_rows):
        parts = [f"{row.workload:<11} {row.metric:<16} "
                 f"{cell(res, 'deathstar', row.key, row.fmt, None, True, False):>12}"]
        for col in columns:
            system = row.peers.get(col)
            parts.append(f"{col}=" + ("" if system is None else
                         cell(res, system, row.key, row.fmt, entry['deathstar'],
                              row.higher_better, True)))
        if "target" in entry:
            parts.append(f"target {entry['target']}: {'yes' if entry['holds'] else 'no'}")
        print("  ".join(parts))
