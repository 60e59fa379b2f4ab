"""The ``deathstar`` command: the typer app (assembled in ``cli.main``), one module per
command group, the helpers they share in ``cli.common``; exit codes are
``deathstar.exitcodes``."""

from deathstar.cli.main import app, main

__all__ = ["app", "main"]
