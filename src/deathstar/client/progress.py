"""The one place the library may touch the terminal: the bar ``progress=True`` shows.

A map's ``progress`` option is a callback ``(done, total)``; ``progress_bar`` makes the
default one (a rich bar on stderr, or nothing when stderr is not a terminal). The CLI
imports it from here too, so the library never imports ``deathstar.cli``.
"""

from __future__ import annotations

from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

__all__ = ["ProgressFn", "progress_bar", "resolve"]

#: A map's progress callback: ``(done, total)``, total None when the inputs are unsized.
ProgressFn = Callable[[int, "int | None"], None]


def progress_bar(total: int | None) -> ProgressFn:
    """A ``(done, total)`` callback that draws a bar on stderr when it is a terminal (for
    ``progress=True`` in the library), and does nothing otherwise. The bar stops itself
    once ``done`` reaches the total."""
    console = Console(stderr=True)
    if not console.is_terminal:
        return lambda done, total: None
    bar = Progress(TextColumn("deathstar"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=console)
    task = bar.add_task("map", total=total)
    bar.start()

    def update(done: int, total_now: int | None) -> None:
        bar.update(task, completed=done, total=total_now)
        if total_now is not None and done >= total_now:
            bar.stop()

    return update


def resolve(progress: ProgressFn | bool | None, total: int | None) -> ProgressFn | None:
    """The callback a map's ``progress`` option stands for: True gives ``progress_bar``,
    False or None none, a callable itself."""
    if progress is True:
        return progress_bar(total)
    return progress or None
