"""One SLURM job step: a keyed daemon on this node that reports itself to the client.

Run by the batch script of ``deathstar slurm up`` (``srun --ntasks-per-node=1 python -m
deathstar.deploy.slurm_node CLUSTER_DIR ...``) on every allocated node. It makes the node's
own keypair in ``CLUSTER_DIR/run/HOST/`` (with the client's public key from
``CLUSTER_DIR/client.key`` authorized), starts ``deathstar daemon`` on free ports as its
child (so the job's end, or ``scancel``, ends it), and writes ``CLUSTER_DIR/nodes/HOST.json``
(address, port, public key) atomically once the daemon listens. It passes SIGTERM/SIGINT
on, and exits with the daemon (which also stops by itself when idle).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import FrameType

import zmq.auth

from deathstar.deploy import remote


def address_toward(peer: str | None) -> str | None:
    """This node's address on the route to ``peer`` (the submit host), found by a UDP
    connect, which sends nothing; None when there is no such route."""
    if not peer:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, 9))
            address = str(s.getsockname()[0])
    except OSError:
        return None
    return None if address.startswith("127.") else address  # the peer's name lied


def make_keys(folder: Path, run: Path) -> bytes:
    """The node keypair in ``run`` and the client's key authorized; the public key."""
    authorized = run / "authorized"
    authorized.mkdir(parents=True, exist_ok=True)
    for d in (run, authorized):
        d.chmod(0o700)
    for old in ("node.key", "node.key_secret"):
        (run / old).unlink(missing_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(str(run), "node")
    os.chmod(secret_file, 0o600)
    shutil.copyfile(folder / "client.key", authorized / "client.key")
    return zmq.auth.load_certificate(public_file)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deathstar.deploy.slurm_node")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--idle-shutdown", default="30m")
    args = parser.parse_args(argv)
    host = socket.gethostname()
    run = args.folder / "run" / host
    public = make_keys(args.folder, run)
    command = [sys.executable, "-m", "deathstar", "daemon", "--host", "0.0.0.0", "--port",
               "0", "--keys", str(run), "--log-dir", str(run / "logs"), "--ready-json",
               "--idle-shutdown", args.idle_shutdown]
    if args.workers:
        command += ["--workers", str(args.workers)]
    daemon = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)

    def forward(signum: int, frame: FrameType | None) -> None:
        daemon.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    assert daemon.stdout is not None
    line = daemon.stdout.readline()
    report = args.folder / "nodes" / f"{host}.json"
    if line:
        ports = json.loads(line)
        address = address_toward(os.environ.get("SLURM_SUBMIT_HOST")) or host
        remote.write_json(report, {"host": host, "address": address, "port": ports["exec"],
                                   "public": public.decode(), "pid": daemon.pid,
                                   "job": os.environ.get("SLURM_JOB_ID", "")})
    code = daemon.wait()
    report.unlink(missing_ok=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
