"""A real SLURM cluster on namespace hosts: ``slurmctld`` in the root namespace, one
``slurmd`` per host (its own NodeName, address and hostname), one ``munged`` for all (its
socket is on the shared file system), everything from the OS packages.

``slurm_cluster(hosts, folder, daemons=K)`` declares every host a node but starts
``slurmd`` on the first K only, so a job asking for more nodes than run stays pending.
Names resolve through lines added to ``/etc/hosts`` (removed exactly on exit) and, per
namespace, an ``/etc/netns/NS/hosts``. The caller sets ``SLURM_CONF`` for its commands.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.conftest import wait_for
from tests.netns.hosts import Host

BINARIES = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged", "sbatch",
            "squeue", "scancel", "srun", "sinfo")


def slurm_missing() -> str | None:
    """Why a SLURM cluster cannot run here, or None."""
    for binary in BINARIES:
        if not shutil.which(binary):
            return (f"{binary} is not installed (slurmctld slurmd slurm-client munge; "
                    ".ci/run installs them)")
    return None


@dataclass
class Slurm:
    conf: Path
    ctl_name: str
    hosts: list[Host]  # every declared node
    running: list[Host]  # those with a slurmd

    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, env=self.env(),
                              stdin=subprocess.DEVNULL, timeout=30)

    def queue(self) -> list[str]:
        """Job ids in squeue (any state)."""
        return self.run("squeue", "-h", "-o", "%i").stdout.split()


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _conf(folder: Path, ctl: str, ctl_address: str, hosts: list[Host], sock: Path) -> str:
    nodes = "\n".join(f"NodeName={h.hostname} NodeAddr={h.address} CPUs=2 State=UNKNOWN"
                      for h in hosts)
    return f"""ClusterName=dstest
SlurmctldHost={ctl}({ctl_address})
SlurmctldPort={_free_port(ctl_address)}
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
PlugStackConfig={folder / "plugstack.conf"}
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool-%n"}
SlurmctldPidFile={folder / "slurmctld.pid"}
SlurmdPidFile={folder / "slurmd-%n.pid"}
SlurmctldLogFile={folder / "slurmctld.log"}
SlurmdLogFile={folder / "slurmd-%n.log"}
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=2
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@contextmanager
def _etc_hosts(lines: list[str]) -> Iterator[None]:
    """Append ``lines`` to /etc/hosts; remove exactly those lines on exit."""
    with open("/etc/hosts", "a") as fh:
        fh.write("".join(f"{line}\n" for line in lines))
    try:
        yield
    finally:
        with open("/etc/hosts") as fh:
            kept = [ln for ln in fh.read().splitlines() if ln not in lines]
        with open("/etc/hosts", "w") as fh:
            fh.write("".join(f"{ln}\n" for ln in kept))


@contextmanager
def slurm_cluster(hosts: list[Host], folder: Path, root_address: str,
                  daemons: int | None = None) -> Iterator[Slurm]:
    """slurmctld (root namespace, at ``root_address``) and a slurmd on the first
    ``daemons`` hosts; munged for all. Everything is stopped and removed on exit."""
    running = hosts[:daemons]
    tag = hosts[0].name.rsplit("-", 1)[0]
    ctl = f"{tag}-ctl"
    (folder / "state").mkdir()
    (folder / "plugstack.conf").write_text("")
    sock_dir = folder / "munge"
    sock_dir.mkdir(mode=0o755)
    folder.chmod(0o755)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = sock_dir / "munge.sock"
    conf = folder / "slurm.conf"
    conf.write_text(_conf(folder, ctl, root_address, hosts, sock))
    (folder / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
    lines = [f"{root_address} {ctl}"] + [f"{h.address} {h.hostname}" for h in hosts]
    procs: list[subprocess.Popen[bytes]] = []
    netns_dirs = [Path("/etc/netns") / h.name for h in hosts]
    with _etc_hosts(lines):
        try:
            base = Path("/etc/hosts").read_text()
            for d in netns_dirs:  # the submit host's name is the bridge address there
                d.mkdir(parents=True)  # (first: the file may name it as loopback too)
                (d / "hosts").write_text(f"{root_address} {socket.gethostname()}\n" + base)
            procs.append(subprocess.Popen(
                ["/usr/sbin/munged", "-F", "-f", f"--socket={sock}", f"--key-file={key}",
                 f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}",
                 f"--seed-file={folder / 'munged.seed'}"], stdin=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True))
            wait_for(sock.exists, 10, "munged's socket")
            env = dict(os.environ, SLURM_CONF=str(conf))
            procs.append(subprocess.Popen(
                ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', ctl,
                 "/usr/sbin/slurmctld", "-D", "-f", str(conf)], env=env,
                stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
            for h in running:
                procs.append(h.popen(["/usr/sbin/slurmd", "-D", "-N", h.hostname, "-f",
                                      str(conf)], env=env, stderr=subprocess.DEVNULL))
            slurm = Slurm(conf, ctl, list(hosts), list(running))

            def idle() -> bool:
                out = slurm.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split("\n")
                states = dict(ln.split() for ln in out if ln.strip())
                return all(states.get(h.hostname) == "idle" for h in running)
            wait_for(idle, 30, "every slurmd to be idle")
            yield slurm
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for d in netns_dirs:
                shutil.rmtree(d, ignore_errors=True)
