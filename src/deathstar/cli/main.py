"""The ``deathstar`` typer app, assembled here and only here. A command module defines
plain command functions, or a ``typer.Typer`` holding its group's subcommands; none of
them touches the app, and importing one registers nothing.

To add a group (``deathstar ssh ...``): write ``cli/ssh.py`` exposing
``ssh_app = typer.Typer(...)``, import it below, and add one ``app.add_typer`` line under
"groups". Shared helpers (``err``, ``fail``, ``parse_duration``, ``KeysOption``) are in
``cli.common``; exit codes in ``deathstar.exitcodes``.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Annotated

import typer

from deathstar import config
from deathstar._version import __version__
from deathstar.cli.common import fail
from deathstar.cli.config import config_app
from deathstar.cli.ec2 import ec2_app
from deathstar.cli.map import map_command
from deathstar.cli.node import daemon, keygen, worker
from deathstar.cli.report import report
from deathstar.cli.slurm import slurm_app
from deathstar.cli.ssh import ssh_app
from deathstar.cli.status import status
from deathstar.exitcodes import ExitCode

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run a Python function over a list of inputs on many machines at once.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"deathstar {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version,
                                                is_eager=True, help="Print the version.")]
          = False) -> None:
    """deathstar: map a function over inputs on local and remote nodes."""


# commands, in the order of `deathstar --help`
app.command("daemon")(daemon)
app.command("worker")(worker)
app.command("keygen")(keygen)
app.command("report")(report)
app.command("status")(status)
app.command("map")(map_command)

# groups: `deathstar NAME ...`, one line each (the ssh and slurm providers' go here too)
app.add_typer(config_app, name="config")
app.add_typer(ec2_app, name="ec2")
app.add_typer(ssh_app, name="ssh")
app.add_typer(slurm_app, name="slurm")


def main() -> None:
    """Console-script entry point (``deathstar``). SIGTERM (``kill``, ``timeout``, a batch
    system's time limit) interrupts a command as Ctrl-C does: a map cancels its work on
    every node and keeps what finished, ``slurm up`` cancels its job. The serving commands
    (``daemon``, ``worker``) install their own handlers (drain, goodbye)."""
    if config.FILE_ERROR:  # before typer runs: SystemExit, not typer.Exit
        raise SystemExit(fail(config.FILE_ERROR, ExitCode.USAGE).exit_code)
    signal.signal(signal.SIGTERM, _interrupt)
    app()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
