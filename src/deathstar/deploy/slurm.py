"""SLURM allocations: one batch job whose steps run a keyed daemon on every allocated node,
found again through the cluster folder both sides see (the shared home of HPC sites).

``up`` writes the client's public key and a batch script into ``<config>/clusters/NAME/``
and submits it with ``sbatch``; the script's one step (``srun --ntasks-per-node=1``) runs
``deathstar.deploy.slurm_node`` on each node, which starts a daemon and writes
``nodes/HOST.json`` (address, port, its own public key) atomically. ``up`` waits for all
(or ``min_nodes``) and their status ports, reporting the job's state while it is pending;
interrupted, it cancels the job. Daemons end with the job (they are its step's children),
on ``scancel`` (``down``), and when idle. No SLURM library: ``sbatch``, ``squeue`` and
``scancel`` as subprocesses, with the user's environment (``SLURM_CONF`` and all).

Nodes run the client's own Python environment (it is on the shared file system); with
``environment="bundle"`` they install the node bundle into the cluster folder instead.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from deathstar.client.status import query_status
from deathstar.deploy import bundle as bundles
from deathstar.deploy import remote
from deathstar.deploy.provider import Provider, cluster_dir, clusters_root
from deathstar.nodes import ClusterSpecError, NodeAddress

prefix = "slurm"
STATE_FILE = "cluster.json"
#: Seconds between two looks at the job and the nodes folder while waiting.
POLL_S = 0.25
#: Job states in which the job can still start or is running.
LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING",
               "SUSPENDED"}

#: Called while ``up`` waits: (job state, its reason, nodes reported, nodes wanted).
OnState = Callable[[str, str, int, int], None]


class SlurmError(Exception):
    """A SLURM command that failed or is missing, or a job that ended before its nodes
    reported; the message says which and why."""


@dataclass
class UpOptions:
    """What ``slurm up`` submits."""

    name: str = "slurm"
    nodes: int = 1
    min_nodes: int | None = None  # up returns once this many answer (default: all)
    partition: str | None = None
    time: str | None = None  # the job's time limit, in sbatch's words (2:00:00)
    workers_per_node: int | None = None  # None: one per core of the node
    sbatch_args: list[str] = field(default_factory=list)
    idle_shutdown_s: float = 30 * 60
    keys: str | None = None
    wait_s: float = 3600.0  # for the job to start and its nodes to answer
    environment: str = "client"  # or "bundle"


def _run(*argv: str, what: str) -> str:
    """Run a SLURM command; its stdout, or SlurmError with its own words."""
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"no '{argv[0]}' here: run deathstar slurm on a SLURM login node "
                         "(or install slurm-client and point SLURM_CONF at your cluster)")
    proc = subprocess.run(list(argv), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    if proc.returncode != 0:
        raise SlurmError(f"{what}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


def job_state(job: str) -> tuple[str, str]:
    """(state, reason) of ``job`` from squeue; ("GONE", "") when squeue no longer has it."""
    out = _run("squeue", "-h", "-j", job, "-o", "%T|%r", what="squeue").strip()
    if not out:
        return "GONE", ""
    state, _, reason = out.splitlines()[0].partition("|")
    return state, "" if reason in ("None", "") else reason


def batch_script(opts: UpOptions, folder: Path, bundle: bundles.Bundle | None) -> str:
    """The batch script: (with a bundle, install it once into the cluster folder, then)
    one step with a daemon on every node. Every path is shell-quoted."""
    q = shlex.quote
    python = sys.executable
    lines = ["#!/bin/sh", f"# deathstar slurm cluster {opts.name}", "set -eu"]
    if bundle is not None:
        venv = folder / "env"
        python = str(venv / "venv" / "bin" / "python")
        lines += [
            f"if [ ! -x {q(python)} ]; then",
            f"  tmp=$(mktemp -d {q(str(folder))}/.env-XXXXXX)",
            f'  mkdir "$tmp/bundle" && tar -x -f {q(str(folder / "bundle.tar"))} '
            '-C "$tmp/bundle"',
            f'  sh "$tmp/bundle/install.sh" {bundle.sha256} "$tmp/venv" python{bundle.python}',
            f'  rm -rf "$tmp/bundle"; mv -T "$tmp" {q(str(venv))} || rm -rf "$tmp"',
            "fi"]
    else:
        why = (f"deathstar: {python} is not on node $(hostname): this Python environment "
               "is not on a shared file system; use slurm up --bundle")
        lines.append(f'[ -x {q(python)} ] || {{ echo "{why}" >&2; exit 3; }}')
    step = [python, "-m", "deathstar.deploy.slurm_node", str(folder),
            "--idle-shutdown", f"{opts.idle_shutdown_s:g}"]
    if opts.workers_per_node:
        step += ["--workers", str(opts.workers_per_node)]
    lines.append("exec srun --ntasks-per-node=1 --kill-on-bad-exit=0 "
                 + " ".join(q(w) for w in step))
    return "\n".join(lines) + "\n"


def submit(opts: UpOptions) -> str:
    """Prepare the cluster folder and submit the job; its id."""
    folder = cluster_dir(opts.name)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    shutil.rmtree(folder / "nodes", ignore_errors=True)
    (folder / "nodes").mkdir()
    (folder / "client.key").write_text(remote.certificate(remote.client_public_key(opts.keys)))
    bundle = None
    if opts.environment == "bundle":
        bundle = bundles.build_bundle()
        shutil.copyfile(bundle.archive, folder / "bundle.tar")
    script = folder / "job.sh"
    script.write_text(batch_script(opts, folder, bundle))
    argv = ["sbatch", "--parsable", f"--job-name=deathstar-{opts.name}",
            f"--nodes={opts.nodes}", "--ntasks-per-node=1",
            f"--output={folder / 'job-%j.out'}"]
    if opts.partition:
        argv.append(f"--partition={opts.partition}")
    if opts.time:
        argv.append(f"--time={opts.time}")
    job = _run(*argv, *opts.sbatch_args, str(script), what="sbatch").strip().split(";")[0]
    remote.write_json(folder / STATE_FILE, {"provider": prefix, "name": opts.name,
                                            "job": job, "nodes": opts.nodes,
                                            "submitted": time.time()})
    return job


def reported(name: str) -> list[NodeAddress]:
    """The nodes whose daemons wrote their report into the cluster folder."""
    found = []
    for path in sorted((cluster_dir(name) / "nodes").glob("*.json")):
        row = remote.read_json(path)
        if isinstance(row, dict):
            found.append(NodeAddress(row["host"], row["address"], int(row["port"]),
                                     row["public"].encode()))
    return found


def _wait(opts: UpOptions, job: str, on_state: OnState) -> list[NodeAddress]:
    """Wait until ``min_nodes`` (default all) reported and answer; SlurmError when the
    job ends first (with the end of its output) or ``wait_s`` passes."""
    wanted = opts.min_nodes or opts.nodes
    deadline = time.monotonic() + opts.wait_s
    while True:
        state, reason = job_state(job)
        found = reported(opts.name)
        on_state(state, reason, len(found), opts.nodes)
        if len(found) >= opts.nodes or (len(found) >= wanted and state != "PENDING"):
            answers = remote.wait_answering(found, max(1.0, deadline - time.monotonic()),
                                            opts.keys)
            ready = [n for n in found if not answers[n.name]["error"]]
            if len(ready) >= wanted:
                return ready
            silent = [f"{n.name} ({answers[n.name]['error']})" for n in found
                      if answers[n.name]["error"]]
            if time.monotonic() >= deadline:
                raise SlurmError(f"job {job}: node(s) reported but do not answer: "
                                 + "; ".join(silent))
        if state not in LIVE_STATES:
            raise SlurmError(f"job {job} ended ({state}) with {len(found)} of {wanted} "
                             f"node(s) up{_output_tail(opts.name, job)}")
        if time.monotonic() >= deadline:
            raise SlurmError(f"job {job} is {state}"
                             f"{f' ({reason})' if reason else ''} after {opts.wait_s:g} s "
                             f"with {len(found)} of {wanted} node(s) up; it is still "
                             f"queued: deathstar slurm down --name {opts.name} cancels it")
        time.sleep(POLL_S)


def _output_tail(name: str, job: str) -> str:
    path = cluster_dir(name) / f"job-{job}.out"
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return ""
    return f"; its output ({path}) ends: " + " / ".join(lines[-3:]) if lines else ""


def up(nodes: int = 1, name: str = "slurm", *, on_state: OnState | None = None,
       **options: Any) -> list[NodeAddress]:
    """``up_with(UpOptions(name, nodes, **options))``: e.g. ``up(4, name="hpc",
    partition="short", time="2:00:00")``."""
    return up_with(UpOptions(name=name, nodes=nodes, **options),
                   on_state or (lambda state, reason, ready, wanted: None))


def up_with(opts: UpOptions,
            on_state: OnState = lambda state, reason, ready, wanted: None
            ) -> list[NodeAddress]:
    """Submit the job and wait until its daemons answer; their nodes. Blocks while the job
    is pending (``on_state`` hears its state). An interrupt (KeyboardInterrupt) or a job
    that ends early cancels the job and removes the cluster folder; a job still queued
    after ``wait_s`` is left queued (SlurmError says so). A cluster whose job is still
    queued or running is not submitted again: ``up`` waits for it. Raises SlurmError when
    ``sbatch`` is missing or refuses the job."""
    if opts.nodes < 1 or (opts.min_nodes is not None and not 1 <= opts.min_nodes <= opts.nodes):
        raise SlurmError("--nodes must be at least 1 and --min-nodes from 1 to --nodes")
    if shutil.which("sbatch") is None:
        raise SlurmError("no 'sbatch' here: run deathstar slurm on a SLURM login node "
                         "(or install slurm-client and point SLURM_CONF at your cluster)")
    remote.check_free(cluster_dir(opts.name), prefix)
    job = _state(opts.name).get("job")
    if not job or job_state(job)[0] not in LIVE_STATES:
        job = submit(opts)  # (again, when the cluster's job has ended)
    try:
        return _wait(opts, job, on_state)
    except SlurmError as exc:
        if "still queued" not in str(exc):
            down(opts.name)
        raise
    except BaseException:
        down(opts.name)
        raise


def _state(name: str) -> dict[str, Any]:
    data = remote.read_json(cluster_dir(name) / STATE_FILE)
    return data if isinstance(data, dict) and data.get("provider") == prefix else {}


def nodes(name: str) -> list[NodeAddress]:
    """The daemons of cluster ``name`` that reported (``--cluster slurm:NAME``).
    ClusterSpecError when there is no such cluster or none has reported."""
    if not _state(name):
        raise ClusterSpecError(f"slurm:{name}: no such cluster (start it with "
                               f"'deathstar slurm up --name {name}')")
    found = reported(name)
    if not found:
        raise ClusterSpecError(f"slurm:{name}: job {_state(name)['job']} has no node up "
                               "(pending, or ended: see deathstar slurm list)")
    return found


#: What ``deathstar.deploy`` resolves ``slurm:NAME`` with.
cluster_nodes = nodes


def list_nodes(name: str | None = None) -> list[dict[str, Any]]:
    """One row per reported node (and one for a job without any): cluster, job, state,
    node, address, daemon, workers."""
    root = clusters_root()
    names = [name] if name else sorted(p.parent.name for p in root.glob(f"*/{STATE_FILE}"))
    rows: list[dict[str, Any]] = []
    for cluster in names:
        state = _state(cluster)
        if not state:
            continue
        job_st, reason = job_state(state["job"])
        found = reported(cluster)
        base = {"cluster": cluster, "job": state["job"], "state": job_st, "reason": reason}
        if not found:
            rows.append({**base, "node": "", "address": "", "daemon": "", "workers": 0})
        for node, status in zip(found, query_status(found, timeout=2.0) if found else []):
            rows.append({**base, "node": node.name, "address": f"{node.host}:{node.port}",
                         "daemon": "up" if not status["error"] else "down",
                         "workers": status.get("workers", 0)})
    return rows


def down(name: str) -> dict[str, Any]:
    """Cancel the cluster's job (its daemons end with it) and remove its folder.
    A cluster that does not exist: ``{"note": ...}``."""
    folder = cluster_dir(name)
    state = _state(name)
    if not state:
        return {"note": f"no slurm cluster named {name}: nothing to cancel", "cancelled": ""}
    job = state["job"]
    if job_state(job)[0] != "GONE":
        _run("scancel", job, what=f"scancel {job}")
    shutil.rmtree(folder, ignore_errors=True)
    return {"cancelled": job}


class SlurmProvider:
    """This module as a ``Provider``."""

    prefix = prefix

    def nodes(self, name: str) -> list[NodeAddress]:
        return nodes(name)

    def list(self, name: str | None = None) -> list[dict[str, Any]]:
        return list_nodes(name)

    def down(self, name: str) -> dict[str, Any]:
        return down(name)


PROVIDER: Provider = SlurmProvider()
