"""The one place the library may touch the terminal: the bar ``progress=True`` shows.

A map's ``progress`` option is a callback ``(done, total)``; ``progress_bar`` makes the
default one (a rich bar on stderr when it is a terminal; in a Jupyter kernel, a line of
the cell's output updated in place; else nothing). The CLI imports it from here too, so
the library never imports ``deathstar.cli``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

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
        return notebook_line(total) or (lambda done, total: None)
    bar = Progress(TextColumn("deathstar"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=console)
    task = bar.add_task("map", total=total)
    bar.start()

    def update(done: int, total_now: int | None) -> None:
        bar.update(task, completed=done, total=total_now)
        if total_now is not None and done >= total_now:
            bar.stop()

    return update


#: Seconds between two updates of a notebook's progress line.
NOTEBOOK_UPDATE_S = 0.25


def notebook_line(total: int | None) -> ProgressFn | None:
    """In a Jupyter kernel: a ``(done, total)`` callback that keeps one line of the cell's
    output up to date (``deathstar: 12/20 done``), at most every ``NOTEBOOK_UPDATE_S``
    and at the end. None outside a kernel."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None or not hasattr(shell, "kernel"):
        return None
    try:  # IPython is there (a kernel loaded it), but it is no dependency of ours
        from IPython.display import display
    except ImportError:
        return None

    def text(done: int, total_now: int | None) -> dict[str, str]:
        return {"text/plain": f"deathstar: {done}/{'?' if total_now is None else total_now}"
                              " done"}

    handle: Any = display(text(0, total), raw=True,  # type: ignore[no-untyped-call]
                          display_id=True)
    last = [0.0]

    def update(done: int, total_now: int | None) -> None:
        now = time.monotonic()
        if now - last[0] >= NOTEBOOK_UPDATE_S or (total_now is not None and done >= total_now):
            last[0] = now
            handle.update(text(done, total_now), raw=True)

    return update


def resolve(progress: ProgressFn | bool | None, total: int | None) -> ProgressFn | None:
    """The callback a map's ``progress`` option stands for: True gives ``progress_bar``,
    False or None none, a callable itself."""
    if progress is True:
        return progress_bar(total)
    return progress or None
