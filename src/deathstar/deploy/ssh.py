"""SSH hosts: install this very deathstar (the node bundle) on machines the user can log
into, start a keyed daemon on each, and stop exactly those daemons again.

Everything goes through the system's OpenSSH client (``ssh``, with ``BatchMode=yes``: no
prompt, ever), so the user's ``~/.ssh/config``, agent, ``ProxyJump`` and known_hosts
apply. Extra client arguments come from ``ssh_options`` (each one ``-o OPTION``) and from
``$DEATHSTAR_SSH_ARGS`` (shell words, e.g. ``-F ~/lab/ssh_config``).

On each host (``~`` is that login's home, which several hosts may share):

- ``~/.local/share/deathstar/BUNDLE_SHA256/venv``: the bundle, installed into a temporary
  folder beside it and renamed into place, so concurrent installs are safe;
- ``~/.local/state/deathstar/ssh/CLUSTER/HOST/``: that host's node keys (its own keypair,
  the client's public key in ``authorized/``), ``daemon.pid``, ``daemon.log`` and worker
  logs; named by host, because a shared home holds every host's files.

The daemon runs detached: ``systemd-run --user`` when the host has a user manager, else
``setsid`` with the pid file. ``down`` stops a daemon only when the pid file's process
still has this cluster's key folder on its command line.

The client keeps ``<config>/clusters/NAME/cluster.json`` (hosts, addresses, ports, bundle)
and ``nodes/HOST.key`` (each node's public key).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import zmq
import zmq.auth

from deathstar import config
from deathstar.client.status import query_status
from deathstar.deploy import bundle as bundles
from deathstar.deploy import remote
from deathstar.deploy.wheels import BundleError
from deathstar.deploy.provider import Provider, cluster_dir, clusters_root
from deathstar.nodes import ClusterSpecError, NodeAddress

prefix = "ssh"

#: Seconds one ssh command may take (an install of the bundle is the longest).
SSH_TIMEOUT_S = config._env_float("SSH_TIMEOUT", 600.0)
#: Extra arguments for every ssh command (shell words).
ARGS_ENV = "DEATHSTAR_SSH_ARGS"
#: Set to ``setsid`` to never use ``systemd-run --user`` on hosts.
DETACH_ENV = "DEATHSTAR_SSH_DETACH"
STATE_FILE = "cluster.json"

#: Called with (host as named, what happens now) while ``up`` and ``down`` work.
OnEvent = Callable[[str, str], None]


class SshError(Exception):
    """A host that could not be used; the message names it and says why."""

    def __init__(self, host: str, message: str):
        super().__init__(f"{host}: {message}")
        self.host = host


class NoHostUp(Exception):
    """``up`` brought up no host at all; ``failures`` says why for each."""

    def __init__(self, failures: dict[str, str]):
        super().__init__("no host came up: " + "; ".join(failures.values()))
        self.failures = failures


@dataclass(frozen=True)
class Target:
    """A host as the user named it: ``[user@]host[:port]`` (``[v6addr]:port`` too)."""

    spec: str
    host: str
    user: str | None = None
    ssh_port: int | None = None

    @property
    def id(self) -> str:
        return remote.host_id(self.spec)


def parse_target(spec: str, user: str | None = None) -> Target:
    """Parse ``[user@]host[:port]``; ``user`` applies when the spec names none."""
    text = spec.strip()
    login, _, rest = text.rpartition("@")
    host, port = rest, None
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", rest)
    if not match:
        raise SshError(spec, "not a host: give [user@]host[:port]")
    host = match.group(1) or match.group(3)
    port_text = match.group(2) or match.group(4)
    if port_text:
        port = int(port_text)
        if not 0 < port < 65536:
            raise SshError(spec, "the SSH port must be 1 to 65535")
    return Target(text, host, login or user, port)


@dataclass
class UpOptions:
    """What ``ssh up`` starts on each host."""

    hosts: list[str]
    name: str = "ssh"
    user: str | None = None
    workers: int | None = None  # per host; None: one per core
    pip: list[str] = field(default_factory=list)
    port: int = config.DEFAULT_PORT
    idle_shutdown_s: float = 30 * 60
    max_lifetime_s: float = 12 * 3600
    ssh_options: list[str] = field(default_factory=list)  # each passed as -o OPTION
    keys: str | None = None  # the user's key folder
    wait_s: float = 60.0  # for each daemon to answer the client


# ------------------------------------------------------------------------ running ssh


def ssh_command(target: Target, ssh_options: Sequence[str], remote_command: str
                ) -> list[str]:
    """The ``ssh`` argv that runs ``remote_command`` on ``target`` (never prompting)."""
    argv = ["ssh", "-o", "BatchMode=yes"]
    argv += shlex.split(os.environ.get(ARGS_ENV, ""))
    for option in ssh_options:
        argv += ["-o", option]
    argv += ["-o", "ConnectTimeout=10"]
    if target.user:
        argv += ["-l", target.user]
    if target.ssh_port:
        argv += ["-p", str(target.ssh_port)]
    return argv + ["--", target.host, remote_command]


def _sh(script: str, *args: str) -> str:
    """A remote command line that runs ``script`` with ``args`` under ``sh``."""
    return " ".join(shlex.quote(w) for w in ("sh", "-c", script, "sh", *args))


def run_ssh(target: Target, ssh_options: Sequence[str], remote_command: str, *,
            stdin: Any = subprocess.DEVNULL, input: str | None = None,
            what: str) -> str:
    """Run ``remote_command`` on ``target``; its stdout. Raises SshError naming the host:
    a refused login or an unreachable host by ssh's own words, a failed command by the
    last lines it wrote to stderr."""
    argv = ssh_command(target, ssh_options, remote_command)
    try:
        proc = subprocess.run(argv, stdin=stdin if input is None else None, input=input,
                              capture_output=True, text=True, timeout=SSH_TIMEOUT_S)
    except FileNotFoundError:
        raise SshError(target.spec, "no 'ssh' command here: install the OpenSSH client") \
            from None
    except subprocess.TimeoutExpired:
        raise SshError(target.spec, f"{what}: no answer within {SSH_TIMEOUT_S:g} s") from None
    if proc.returncode == 255:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise SshError(target.spec, "cannot log in: " + (lines[-1] if lines else "ssh failed"))
    if proc.returncode != 0:
        tail = " / ".join(proc.stderr.strip().splitlines()[-5:])
        raise SshError(target.spec, f"{what} failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def resolve_address(target: Target, ssh_options: Sequence[str]) -> str:
    """The address ssh connects to for ``target`` (``HostName`` from the user's ssh
    config, by ``ssh -G``), which is where the client reaches the daemon too."""
    argv = ssh_command(target, ssh_options, "")[:-2] + ["-G", target.host]
    argv.remove("--")
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=30)
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key == "hostname" and value:
            return value.strip()
    return target.host


# ------------------------------------------------------------------------ one host


def _minor() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def probe(target: Target, ssh_options: Sequence[str]) -> dict[str, str]:
    """Log in once and learn the host's Python (of the client's minor), platform, home,
    installed bundles and whether it has a user systemd. SshError when it has no Python of
    the client's minor, naming both versions."""
    facts = remote.parse_lines(run_ssh(target, ssh_options, _sh(remote.PROBE_SH, f"python{_minor()}"),
                                       what="probing"))
    if not facts.get("python"):
        other = facts.get("python3") or "no python3 either"
        client = ".".join(map(str, sys.version_info[:3]))
        raise SshError(target.spec, f"no Python {_minor()} (python{_minor()}) there; its "
                       f"python3 is {other}, the client runs {client}: install Python "
                       f"{_minor()} on it (pickles do not cross Python minors)")
    return facts


def host_platform(facts: dict[str, str]) -> str:
    """The wheel platform tag of a probed host (as ``bundle.local_platform`` computes it)."""
    plat = facts.get("platform", "").replace("-", "_").replace(".", "_")
    libc, _, version = facts.get("libc", "").partition(" ")
    match = re.match(r"(\d+)\.(\d+)", version)
    if plat.startswith("linux_") and libc == "glibc" and match:
        return f"manylinux_{match.group(1)}_{match.group(2)}_{plat[len('linux_'):]}"
    return plat


def install(target: Target, ssh_options: Sequence[str], bundle: bundles.Bundle,
            facts: dict[str, str]) -> str:
    """Put ``bundle`` on the host (unless it is there already): streamed over ssh into a
    temporary folder, installed offline, renamed into place. Returns what happened."""
    if bundle.sha256 in facts.get("installed", "").split():
        return "present"
    with open(bundle.archive, "rb") as tar:
        out = run_ssh(target, ssh_options, _sh(remote.INSTALL_SH, bundle.sha256,
                                                facts["python"]),
                      stdin=tar, what="installing the bundle")
    return out.strip().splitlines()[-1] if out.strip() else "installed"


def daemon_args(opts: UpOptions) -> list[str]:
    """The daemon's options on a host (besides its keys and logs): the timers of EC2
    nodes, so a forgotten cluster stops by itself."""
    args = ["--host", "0.0.0.0", "--port", str(opts.port),
            "--idle-shutdown", f"{opts.idle_shutdown_s:g}",
            "--max-lifetime", f"{opts.max_lifetime_s:g}"]
    if opts.workers is not None:
        args += ["--workers", str(opts.workers)]
    return args


def start(target: Target, opts: UpOptions, bundle_sha: str, facts: dict[str, str],
          client_public: bytes) -> tuple[bytes, int]:
    """Give the host a fresh node keypair and start its daemon detached (stopping one this
    cluster started there before). Returns (node public key, daemon pid). The keys travel
    in the script on stdin, never on a command line."""
    public, secret = zmq.curve_keypair()
    method = "systemd" if facts.get("systemd") == "yes" and \
        os.environ.get(DETACH_ENV) != "setsid" else "setsid"
    command = " ".join(shlex.quote(w) for w in (
        "sh", "-s", "--", opts.name, target.id, bundle_sha, method, *daemon_args(opts)))
    out = run_ssh(target, opts.ssh_options, command,
                  input=remote.start_script(public, secret, client_public),
                  what="starting the daemon")
    pid = remote.parse_lines(out).get("pid", "0")
    return public, int(pid) if pid.isdigit() else 0


# ------------------------------------------------------------------------ state


def _state(name: str) -> dict[str, Any]:
    data = remote.read_json(cluster_dir(name) / STATE_FILE)
    return data if isinstance(data, dict) and data.get("provider") == prefix else {}


def _save_host(name: str, lock: threading.Lock, ssh_options: Sequence[str],
               row: dict[str, Any], public: bytes) -> None:
    """Record one started host at once, so an interrupted ``up`` leaves nothing that
    ``down`` cannot find."""
    folder = cluster_dir(name)
    with lock:
        (folder / "nodes").mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        (folder / "nodes" / f"{row['id']}.key").write_text(remote.certificate(public))
        state = _state(name) or {"provider": prefix, "name": name, "hosts": {}}
        state["ssh_options"] = list(ssh_options)
        state["hosts"][row["id"]] = row
        remote.write_json(folder / STATE_FILE, state)


def _node(row: dict[str, Any], public: bytes | None) -> NodeAddress:
    return NodeAddress(row["host"], row["address"], int(row["port"]), public)


def _public_key(name: str, host_id: str) -> bytes | None:
    path = cluster_dir(name) / "nodes" / f"{host_id}.key"
    return zmq.auth.load_certificate(str(path))[0] if path.exists() else None


# ------------------------------------------------------------------------ the provider


class _Bundles:
    """One bundle per host platform, built once however many hosts need it."""

    def __init__(self, pip: Sequence[str]):
        self.pip = list(pip)
        self.lock = threading.Lock()
        self.built: dict[str, bundles.Bundle] = {}

    def get(self, platform: str) -> bundles.Bundle:
        with self.lock:
            if platform not in self.built:
                self.built[platform] = bundles.build_bundle(platform, _minor(), pip=self.pip)
            return self.built[platform]


def _up_one(target: Target, opts: UpOptions, made: _Bundles, client_public: bytes,
            lock: threading.Lock, on_event: OnEvent) -> NodeAddress:
    on_event(target.spec, "probing")
    facts = probe(target, opts.ssh_options)
    try:
        bundle = made.get(host_platform(facts))
    except BundleError as exc:
        raise SshError(target.spec, f"no bundle for it: {exc}") from None
    on_event(target.spec, f"installing bundle {bundle.sha256[:12]}")
    how = install(target, opts.ssh_options, bundle, facts)
    on_event(target.spec, f"bundle {how}; starting the daemon")
    public, pid = start(target, opts, bundle.sha256, facts, client_public)
    row = {"id": target.id, "spec": target.spec, "host": target.host,
           "user": target.user, "ssh_port": target.ssh_port,
           "address": resolve_address(target, opts.ssh_options), "port": opts.port,
           "bundle": bundle.sha256, "pid": pid, "home": facts.get("home", ""),
           "python": facts.get("version", ""), "started": time.time()}
    _save_host(opts.name, lock, opts.ssh_options, row, public)
    return _node(row, public)


def up(hosts: Sequence[str], name: str = "ssh", *, on_event: OnEvent | None = None,
       **options: Any) -> dict[str, Any]:
    """``up_with(UpOptions(hosts, name, **options))``: e.g. ``up(["krypton", "xenon"],
    name="lab", workers=4, pip=["numpy"])``."""
    return up_with(UpOptions(hosts=list(hosts), name=name, **options),
                   on_event or (lambda host, what: None))


def up_with(opts: UpOptions, on_event: OnEvent = lambda host, what: None) -> dict[str, Any]:
    """Bring up a daemon on every host of ``opts`` at once and wait until each answers.

    Returns ``{"nodes": [NodeAddress...], "failures": {host: why}}``: a host that cannot
    be reached, refuses the login, lacks the Python of the client's minor, or whose daemon
    does not answer is named in ``failures`` and the others go on. Raises ``NoHostUp``
    when no host came up, KeyFileError (before any login) when the user's keys cannot
    be had. Running ``up`` again for a name restarts its daemons with fresh
    keys (and adds new hosts)."""
    remote.check_free(cluster_dir(opts.name), prefix)  # before any login
    targets = [parse_target(h, opts.user) for h in opts.hosts]
    client_public = remote.client_public_key(opts.keys)
    made, lock = _Bundles(opts.pip), threading.Lock()
    failures: dict[str, str] = {}
    started: list[NodeAddress] = []
    with ThreadPoolExecutor(max_workers=min(16, len(targets)) or 1) as pool:
        futures = {t.spec: pool.submit(_up_one, t, opts, made, client_public, lock, on_event)
                   for t in targets}
        for spec, future in futures.items():
            try:
                started.append(future.result())
            except SshError as exc:
                failures[spec] = str(exc)
                on_event(spec, f"failed: {exc}")
    answers = remote.wait_answering(started, opts.wait_s, opts.keys) if started else {}
    nodes = []
    for spec, node in zip([t.spec for t in targets if t.spec not in failures], started):
        answer = answers.get(node.name, {})
        error = answer.get("error") or ("" if answer.get("workers") else "no worker yet")
        if error:
            failures[spec] = f"{spec}: the daemon started but does not answer: {error}"
            on_event(spec, f"failed: {failures[spec]}")
        else:
            nodes.append(node)
            on_event(spec, "up")
    if not nodes:
        raise NoHostUp(failures)
    return {"nodes": nodes, "failures": failures}


def nodes(name: str) -> list[NodeAddress]:
    """The nodes ``ssh up`` started for ``name`` (what ``--cluster ssh:NAME`` means), each
    with its own public key. ClusterSpecError when there are none."""
    hosts = _state(name).get("hosts") or {}
    if not hosts:
        raise ClusterSpecError(f"ssh:{name}: no such cluster (start it with "
                               f"'deathstar ssh up HOST... --name {name}')")
    return [_node(row, _public_key(name, hid)) for hid, row in sorted(hosts.items())]


#: What ``deathstar.deploy`` resolves ``ssh:NAME`` with.
cluster_nodes = nodes


def _names(name: str | None) -> list[str]:
    if name is not None:
        return [name]
    root = clusters_root()
    found = sorted(p.parent.name for p in root.glob(f"*/{STATE_FILE}")) if root.is_dir() else []
    return [n for n in found if _state(n).get("provider") == prefix]


def list_hosts(name: str | None = None) -> list[dict[str, Any]]:
    """One row per host of cluster ``name`` (every ssh cluster when None): cluster, host,
    address, port, daemon (up or why not), version, workers, uptime in seconds."""
    rows: list[dict[str, Any]] = []
    for cluster in _names(name):
        try:
            found = nodes(cluster)
        except ClusterSpecError:
            continue
        hosts = sorted((_state(cluster).get("hosts") or {}).items())
        statuses = query_status(found, timeout=2.0)
        for (_, row), status in zip(hosts, statuses):
            rows.append({
                "cluster": cluster, "host": row["spec"], "address": row["address"],
                "port": row["port"], "daemon": "up" if not status["error"] else "down",
                "version": (status.get("versions") or {}).get("deathstar", ""),
                "workers": status.get("workers", 0),
                "uptime_s": round(status.get("uptime_s", 0)), "error": status["error"]})
    return rows


def down(name: str, purge: bool = False,
         on_event: OnEvent = lambda host, what: None) -> dict[str, Any]:
    """Stop the daemons ``up`` started for ``name`` (only those: each pid file is checked
    against its process) and remove their keys and logs on the hosts; ``purge`` removes
    the install each host's daemon ran from too, unless a process there still runs from
    it. Hosts that cannot be reached are named in ``failures`` and kept in
    the state, so ``down`` can be run again; the state folder goes when all are done.
    A cluster that does not exist: ``{"note": ...}``, nothing else."""
    folder = cluster_dir(name)
    state = _state(name)
    hosts = state.get("hosts") or {}
    if not hosts:
        if folder.is_dir() and not (folder / STATE_FILE).exists():
            return {"note": f"ssh:{name} is not an ssh cluster; left alone", "stopped": []}
        return {"note": f"no ssh cluster named {name}: nothing to stop", "stopped": []}
    options = state.get("ssh_options") or []

    def one(row: dict[str, Any]) -> str:
        target = Target(row["spec"], row["host"], row.get("user"), row.get("ssh_port"))
        on_event(target.spec, "stopping")
        return run_ssh(target, options, _sh(remote.DOWN_SH, name, row["id"],
                                            row["bundle"] if purge else ""), what="stopping")

    stopped, failures = [], {}
    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        futures = {hid: pool.submit(one, row) for hid, row in hosts.items()}
        for hid, future in futures.items():
            try:
                future.result()
                stopped.append(hosts[hid]["spec"])
                on_event(hosts[hid]["spec"], "stopped")
            except SshError as exc:
                failures[hosts[hid]["spec"]] = str(exc)
                on_event(hosts[hid]["spec"], f"failed: {exc}")
    if failures:
        state["hosts"] = {hid: row for hid, row in hosts.items() if row["spec"] in failures}
        remote.write_json(folder / STATE_FILE, state)
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return {"stopped": stopped, "failures": failures}


class SshProvider:
    """This module as a ``Provider`` (``list`` is a method name there, not here)."""

    prefix = prefix

    def nodes(self, name: str) -> list[NodeAddress]:
        return nodes(name)

    def list(self, name: str | None = None) -> list[dict[str, Any]]:
        return list_hosts(name)

    def down(self, name: str) -> dict[str, Any]:
        return down(name)


PROVIDER: Provider = SshProvider()
