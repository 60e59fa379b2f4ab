"""The ``deathstar`` command: the typer app and one module per command group."""

from deathstar.cli.app import app, main

__all__ = ["app", "main"]
