"""``python -m deathstar.daemon``: the embedded local daemon, as ``client/embedded.py``
starts it. The same ``Daemon`` a node runs, keyless on ipc sockets in the private folder
``--ipc`` names, its ports printed as one JSON line once bound. Its options are parsed
with argparse so that it starts without the CLI's imports (typer, rich, the providers):
about a tenth of a second off every embedded cluster's start. ``deathstar daemon`` is
the command for everything else."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from deathstar import config
from deathstar.daemon.loop import run_daemon
from deathstar.daemon.sockets import UnsafeFolder
from deathstar.exitcodes import ExitCode


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deathstar.daemon",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ipc", required=True, help="the private folder for the sockets")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--max-tasks-per-worker", type=int, default=None)
    parser.add_argument("--heartbeat", type=float, default=config.HEARTBEAT_INTERVAL_S)
    parser.add_argument("--log-dir", default=None)
    parser.add_argument("--log-level", default="warning",
                        choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be 0 or more")
    if args.max_tasks_per_worker is not None and args.max_tasks_per_worker < 1:
        parser.error("--max-tasks-per-worker must be 1 or more")
    if args.heartbeat <= 0:
        parser.error("--heartbeat must be more than 0 seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if config.DEBUG else args.log_level.upper(),
                        format="%(asctime)s daemon %(levelname)s %(message)s")

    def on_ready(ports: dict[str, Any]) -> None:
        print(json.dumps(ports), flush=True)

    try:
        run_daemon(workers=args.workers, heartbeat_s=args.heartbeat,
                   parent_pid=args.parent_pid, on_ready=on_ready,
                   max_tasks_per_worker=args.max_tasks_per_worker,
                   log_dir=args.log_dir or str(config.log_dir()), ipc=args.ipc)
    except (UnsafeFolder, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
