"""Running a node: ``deathstar daemon``, ``deathstar worker``, and ``deathstar keygen`` for
the keys they serve with. Parsing and reporting only; the node is ``deathstar.daemon`` and
``deathstar.worker``, imported by the command that runs it (the other commands start
without them)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Callable, NamedTuple, Optional

import typer

from deathstar import config
from deathstar.cli.common import (KeysOption, err, fail, parse_duration, parse_size,
                                  setup_logging)
from deathstar.exitcodes import ExitCode
from deathstar.keys import (CLIENT, KeyFileError, ServerKeys, default_dir, load_client_keys,
                            resolve_dir)
from deathstar.keys import keygen as keygen_keys
from deathstar.nodes import NodeAddress

LOG_LEVELS = ("debug", "info", "warning", "error")


def daemon(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Exec port; status is PORT+1. 0 picks free ports.")]
    = config.DEFAULT_PORT,
    workers: Annotated[Optional[int], typer.Option(help="Local worker processes "
                                                   "[default: one per core].")] = None,
    worker_port: Annotated[Optional[int], typer.Option(
        help="Port for workers started by hand [default: PORT+2].")] = None,
    heartbeat: Annotated[float, typer.Option(help="Heartbeat interval, seconds.")]
    = config.HEARTBEAT_INTERVAL_S,
    keys: KeysOption = None,
    insecure: Annotated[bool, typer.Option(
        help="Listen beyond loopback with no authentication: anyone who can reach the "
             "ports can run code as this user.")] = False,
    max_tasks_per_worker: Annotated[Optional[int], typer.Option(
        help="Replace a worker after it has run this many inputs.")] = None,
    max_worker_memory: Annotated[Optional[str], typer.Option(
        help="Replace a worker, between tasks, once it holds this much memory "
             "(e.g. 2G, 500M).")] = None,
    idle_shutdown: Annotated[Optional[str], typer.Option(
        help="Stop after this long without work (e.g. 30m); for cloud nodes.")] = None,
    max_lifetime: Annotated[Optional[str], typer.Option(
        help="Stop after this long in all (e.g. 12h); for cloud nodes.")] = None,
    log_dir: Annotated[Optional[Path], typer.Option(
        help="Where each worker's output (what tasks print) goes, as worker-PID.log "
             "[default: $XDG_STATE_HOME/deathstar/logs].")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    ipc: Annotated[Optional[Path], typer.Option(
        help="Listen on ipc sockets in this folder (exec, status) instead of TCP: only "
             "this machine's users the folder lets in can connect. The embedded local "
             "cluster runs this way.")] = None,
    ready_json: Annotated[bool, typer.Option(hidden=True)] = False,
    zap: Annotated[bool, typer.Option(hidden=True, help="Tests only: without the ZAP "
                                      "authenticator, as if its thread had died.")] = True,
) -> None:
    """Run a node: exec port for work, status port for queries, a worker per core.

    With keys (deathstar keygen) it serves only the clients whose public keys are in the
    key folder's authorized/; without, it listens only on loopback unless --insecure."""
    from deathstar.daemon.loop import run_daemon
    from deathstar.daemon.guard import UnsafeBind
    from deathstar.daemon.sockets import UnsafeFolder

    if log_level.lower() not in LOG_LEVELS:
        raise fail(f"--log-level {log_level}: use debug, info, warning or error",
                   ExitCode.USAGE)
    setup_logging("daemon", log_level)
    limits = _limits(workers, max_tasks_per_worker, heartbeat, max_worker_memory,
                     idle_shutdown, max_lifetime)
    server_keys = _server_keys(keys, ipc, insecure)
    try:
        run_daemon(host=host, port=port, workers=workers, worker_port=worker_port,
                   heartbeat_s=heartbeat,
                   on_ready=_announce(host, ipc, workers, ready_json),
                   max_tasks_per_worker=max_tasks_per_worker,
                   max_worker_memory=limits.memory, keys=server_keys, zap=zap,
                   idle_shutdown_s=limits.idle_s, max_lifetime_s=limits.lifetime_s,
                   log_dir=str(log_dir or config.log_dir()),
                   ipc=None if ipc is None else str(ipc), insecure=insecure)
    except (UnsafeBind, UnsafeFolder) as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    except OSError as exc:  # zmq.ZMQError is an OSError: port in use, bad address
        raise fail(f"cannot listen on {host}:{port}: {exc}", ExitCode.USAGE) from None


class _Limits(NamedTuple):
    memory: int | None  #: bytes
    idle_s: float | None
    lifetime_s: float | None


def _limits(workers: int | None, max_tasks_per_worker: int | None, heartbeat: float,
            max_worker_memory: str | None, idle_shutdown: str | None,
            max_lifetime: str | None) -> _Limits:
    """The daemon's numeric options checked, and its sizes and durations parsed."""
    if workers is not None and workers < 0:
        raise fail("--workers must be 0 or more", ExitCode.USAGE)
    if max_tasks_per_worker is not None and max_tasks_per_worker < 1:
        raise fail("--max-tasks-per-worker must be 1 or more", ExitCode.USAGE)
    if heartbeat <= 0:
        raise fail("--heartbeat must be more than 0 seconds", ExitCode.USAGE)
    try:
        return _Limits(None if max_worker_memory is None else parse_size(max_worker_memory),
                       None if idle_shutdown is None else parse_duration(idle_shutdown),
                       None if max_lifetime is None else parse_duration(max_lifetime))
    except ValueError as exc:
        raise fail(f"{exc}", ExitCode.USAGE) from None


def _server_keys(keys: str | None, ipc: Path | None, insecure: bool) -> ServerKeys | None:
    """The node keys the daemon serves with (``guard.daemon_keys``: made at the first
    start when the user has none), logged when there are some."""
    from deathstar.daemon.guard import daemon_keys

    try:
        server_keys, note = daemon_keys(keys, ipc=None if ipc is None else str(ipc),
                                        insecure=insecure)
    except KeyFileError as exc:
        raise fail(f"{exc}", ExitCode.USAGE) from None
    if note:
        err.print(f"[bold]note:[/] {note}", highlight=False)
    if server_keys is not None:
        logging.getLogger("deathstar.daemon").info(
            "CurveZMQ on: serving the %d key(s) in %s", len(server_keys.authorized),
            server_keys.folder / "authorized")
    return server_keys


def _announce(host: str, ipc: Path | None, workers: int | None,
              ready_json: bool) -> Callable[[dict[str, Any]], None]:
    """The daemon's ``on_ready``: log where it listens (and print the ports as JSON for
    the process that started it, with --ready-json)."""

    def on_ready(ports: dict[str, Any]) -> None:
        if ready_json:
            print(json.dumps(ports), flush=True)
        where = (f"ipc sockets in {ipc}" if ipc is not None else
                 f"{host}: exec {ports['exec']}, status {ports['status']}, "
                 f"workers {ports['workers']}")
        logging.getLogger("deathstar.daemon").info(
            "listening on %s; %s local worker(s)", where,
            workers if workers is not None else os.cpu_count())

    return on_ready


def worker(
    connect: Annotated[str, typer.Option(help="The daemon's worker endpoint, "
                                         "e.g. tcp://node1:6002.")],
    keys: KeysOption = None,
    heartbeat: Annotated[float, typer.Option(help="Heartbeat interval, seconds.")]
    = config.HEARTBEAT_INTERVAL_S,
) -> None:
    """Run one worker for a daemon, from any machine that can reach it.

    With keys, it uses the client keypair (which the daemon must authorize) and the
    node's public key."""
    from deathstar.worker.start import main as worker_main

    curve = None
    try:
        folder = resolve_dir(keys, CLIENT)
        if folder is not None:
            client_keys = load_client_keys(folder)
            host, _, port = connect.removeprefix("tcp://").rpartition(":")
            node = NodeAddress(connect, host, int(port) - 2 if port.isdigit() else 0)
            curve = (client_keys.public, client_keys.secret, client_keys.server_key(node))
    except KeyFileError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    setup_logging("worker")
    raise typer.Exit(worker_main(connect, heartbeat_s=heartbeat, curve=curve))


def keygen(
    folder: Annotated[Optional[Path], typer.Argument(
        help="Where to put the keys [default: the config folder's keys/].")] = None,
    force: Annotated[bool, typer.Option(help="Replace existing keys.")] = False,
) -> None:
    """Make a node keypair and a client keypair, and authorize the client.

    Copy the folder to each node (or just node.key_secret, node.key and authorized/),
    and keep client.key_secret to yourself. To let another user in, put their client.key
    in the node's authorized/ folder."""
    target = folder if folder is not None else default_dir()
    try:
        written = keygen_keys(target, force=force)
    except KeyFileError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    for path in written:
        typer.echo(str(path))
