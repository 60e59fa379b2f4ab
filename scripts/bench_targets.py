"""Issue 16's targets, as scripts/bench.py judges them: one ``Target`` per row of the
issue's "Targets" table, each with a need per deathstar column (the embedded local
cluster, "deathstar"; the TCP node on loopback, "deathstar-tcp"), judged on figures
measured in the same run.

A target with a ``peer`` needs the ratio deathstar ÷ peer to be at least (a rate) or at
most (a time) the need, as the issue writes "≥ 1.0 × Pool.map" or "≤ 1.5 × Pool.apply".
A target without one needs the figure itself within the need; its ``peer`` figure, when
``context`` names one, is shown for comparison only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

#: The deathstar columns, in table order, with their short titles.
COLUMNS = {"deathstar": "embedded", "deathstar-tcp": "TCP"}


class Figures(Protocol):
    """What the judging reads (bench_report.Results)."""

    def get(self, system: str, key: str) -> float | None: ...
    def err(self, system: str, key: str) -> str | None: ...


@dataclass(frozen=True)
class Target:
    title: str
    key: str  # the figure judged (Results key)
    fmt: str
    higher_better: bool
    workload: str  # the --only name that measures it
    need: dict[str, float]  # deathstar column -> ratio (with a peer) or absolute need
    peer: str | None = None  # the system the need is a ratio to
    peer_label: str = ""
    context: str | None = None  # a system shown beside an absolute need, not judged
    per_seed: bool = False  # W5: the worst of the per-seed figures; all are shown
    also: dict[str, str] = field(default_factory=dict)  # label -> system, shown too


TARGETS = [
    Target("W1 x+1, default batching", "W1.batched.tasks_s", "{:,.0f}/s", True, "W1",
           {"deathstar": 1.0, "deathstar-tcp": 1.0}, "pool", "Pool.map"),
    Target("W1 one input per message", "W1.one.tasks_s", "{:,.0f}/s", True, "W1",
           {"deathstar": 0.5, "deathstar-tcp": 0.3}, "pool", "Pool(chunksize=1)"),
    Target("W2 Executor.submit(f, x).result(), median", "W2.median_us", "{:,.0f} µs",
           False, "W2", {"deathstar": 1.0, "deathstar-tcp": 1.5}, "pool", "Pool.apply"),
    Target("W3 efficiency, function of a stateful module", "W3.efficiency", "{:.3f}", True,
           "W3", {"deathstar": 0.97, "deathstar-tcp": 0.97}, context="pool",
           peer_label="Pool"),
    Target("W4 large arrays", "W4.MB_s", "{:,.0f} MB/s", True, "W4",
           {"deathstar": 5.0, "deathstar-tcp": 3.0}, "pool", "Pool"),
    Target("W5 makespan/ideal, worst of the seeds", "W5.worst", "{:.3f}", False, "W5",
           {"deathstar": 1.06, "deathstar-tcp": 1.06}, context="pool", peer_label="Pool",
           per_seed=True),
    Target("setup to first result", "setup_s", "{:.2f} s", False, "SETUP",
           {"deathstar": 0.25}, context="pool", peer_label="Pool"),
    Target("idle CPU, cluster connected and idle", "IDLE.cpu_pct", "{:.2f}% core", False,
           "IDLE", {"deathstar": 0.3, "deathstar-tcp": 0.3}, context="pool",
           peer_label="Pool"),
    Target("W7 JSONL inputs through the CLI", "W7.tasks_s", "{:,.0f}/s", True, "W7",
           {"deathstar": 1.0}, "pool", "Pool.imap script"),
    Target("GridSearchCV via joblib, no cluster given", "GRID.wall_s", "{:.2f} s", False,
           "GRID", {"deathstar": 1.05}, "loky", "loky", also={"serial": "serial"}),
]


def seed_figures(res: Figures, system: str, seeds: int) -> list[float | None]:
    """W5: each seed's figure (the median of its reps), None where it has none."""
    return [res.get(system, f"W5.seed{s}") for s in range(1, seeds + 1)]


def worst_of_seeds(res: Figures, system: str, seeds: int) -> float | None:
    """W5's judged figure: the worst seed's, or None unless every seed has a figure."""
    figures = seed_figures(res, system, seeds)
    known = [f for f in figures if f is not None]
    return max(known) if known and len(known) == len(figures) else None


def need_text(t: Target) -> str:
    sign = "≥" if t.higher_better else "≤"
    parts = []
    for column, need in t.need.items():
        what = f"{need:g}× {t.peer_label}" if t.peer else t.fmt.format(need)
        parts.append(f"{COLUMNS[column]} {sign} {what}")
    return "; ".join(parts)


def judge(res: Figures, t: Target, columns: list[str], seeds: int) -> dict[str, Any]:
    """One target as data: each deathstar column's figure, the peer's, the ratios, the
    need and whether it holds (True, False, or None when not measured; a figure that
    failed with an error does not hold)."""
    peer_system = t.peer or t.context
    peer = res.get(peer_system, t.key) if peer_system else None
    entry: dict[str, Any] = {"target": t.title, "key": t.key, "need": need_text(t),
                             "peer": peer_system, "peer_label": t.peer_label,
                             "peer_figure": peer, "figures": {}, "ratios": {},
                             "holds": {}, "errors": {},
                             "also": {label: res.get(s, t.key) for label, s in t.also.items()}}
    for column in columns:
        value = res.get(column, t.key)
        entry["figures"][column] = value
        entry["ratios"][column] = value / peer if value and peer and t.peer else None
        error = res.err(column, t.key)
        if error:
            entry["errors"][column] = error
        if column not in t.need:
            continue
        judged_on = entry["ratios"][column] if t.peer else value
        if judged_on is None:
            entry["holds"][column] = False if error else None
            continue
        need = t.need[column]
        entry["holds"][column] = judged_on >= need if t.higher_better else judged_on <= need
    if t.per_seed:
        entry["seeds"] = {system: seed_figures(res, system, seeds)
                          for system in [*columns, peer_system] if system}
    return entry


def judge_all(res: Figures, only: list[str], columns: list[str],
              seeds: int) -> list[dict[str, Any]]:
    """Every target whose workload ran (``seeds``: W5's seed count)."""
    return [judge(res, t, columns, seeds) for t in TARGETS if t.workload in only]


def holds_text(entry: dict[str, Any]) -> str:
    """"embedded yes; TCP no" (err: failed; ?: not measured)."""
    parts = []
    for column, ok in entry["holds"].items():
        mark = ("yes" if ok else "no" if ok is False and column not in entry["errors"]
                else "err" if ok is False else "?")
        parts.append(f"{COLUMNS[column]} {mark}")
    return "; ".join(parts)


def summary(judged: list[dict[str, Any]]) -> str:
    """"targets holding: embedded 3 of 10, TCP 1 of 6" (err and not measured count as not
    holding; "not measured" names them)."""
    parts, unmeasured = [], []
    for column, title in COLUMNS.items():
        verdicts = [(e["target"], e["holds"][column]) for e in judged if column in e["holds"]]
        if verdicts:
            held = sum(1 for _, ok in verdicts if ok)
            parts.append(f"{title} {held} of {len(verdicts)}")
            unmeasured += [f"{name} ({title})" for name, ok in verdicts if ok is None]
    text = "targets holding: " + ", ".join(parts)
    return text + (f"; not measured: {', '.join(unmeasured)}" if unmeasured else "")
