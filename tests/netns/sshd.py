"""Real OpenSSH servers on namespace hosts, for the ``deathstar ssh`` tests.

``sshd_lab(hosts, folder)`` starts one ``/usr/sbin/sshd`` per host on the host's own
address (root login by a key made here, no password), and gives the ssh client arguments
that reach them (``-F`` a config naming that key and a known_hosts file in ``folder``:
the client reads the passwd home, not ``$HOME``). Every host logs in with ``HOME`` set to
one folder under ``folder``: one home shared by all hosts, as in many labs, and nothing
written to the real home. The servers stop with the hosts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import wait_for
from tests.netns.hosts import Host

SSHD = "/usr/sbin/sshd"


def sshd_missing() -> str | None:
    """Why real sshd hosts cannot run here, or None."""
    for binary in (SSHD, shutil.which("ssh"), shutil.which("ssh-keygen")):
        if not binary or not os.access(binary, os.X_OK):
            return "OpenSSH (openssh-server, openssh-client) is not installed"
    return None


@dataclass
class Lab:
    """The sshd hosts and how the client reaches them."""

    folder: Path
    home: Path  # the shared home the hosts log in with
    config: Path  # ssh client config (-F)
    hosts: list[Host] = field(default_factory=list)

    @property
    def ssh_args(self) -> str:
        """For ``DEATHSTAR_SSH_ARGS``."""
        return f"-F {self.config}"

    def ssh(self, host: Host, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ssh", "-F", str(self.config), host.address, command],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=30)


def deathstar(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess (this environment), its output captured."""
    return subprocess.run([sys.executable, "-m", "deathstar", *args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=timeout)


def daemons_on(host: Host) -> list[str]:
    """Command lines of the deathstar processes in ``host``'s namespace."""
    found = []
    for pid in host.pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "deathstar" in cmdline:
            found.append(cmdline)
    return found


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)


def start_sshd(host: Host, folder: Path, authorized: Path, env: dict[str, str]) -> None:
    """One sshd on ``host``'s address, in the foreground of a process the host owns."""
    options = {
        "ListenAddress": host.address, "HostKey": str(folder / "host_key"),
        "PidFile": "none", "AuthorizedKeysFile": str(authorized),
        "PermitRootLogin": "prohibit-password", "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no", "UsePAM": "no", "StrictModes": "no",
        "PrintMotd": "no", "SetEnv": " ".join(f"{k}={v}" for k, v in env.items()),
    }
    argv = [SSHD, "-D", "-f", "/dev/null", "-E", str(folder / f"sshd-{host.name}.log")]
    for key, value in options.items():
        argv += ["-o", f"{key}={value}"]
    host.popen(argv)


def sshd_lab(hosts: list[Host], folder: Path, *, refuse: tuple[Host, ...] = (),
             other_path: dict[str, str] | None = None) -> Lab:
    """sshd on every host of ``hosts``; those in ``refuse`` accept no key of ours.
    ``other_path`` maps a host name to a PATH its logins get instead of the default."""
    os.makedirs("/run/sshd", exist_ok=True)
    _keygen(folder / "host_key")
    _keygen(folder / "client_id")
    authorized = folder / "authorized_keys"
    shutil.copyfile(folder / "client_id.pub", authorized)
    (folder / "nobody_keys").write_text("")
    home = folder / "home"
    home.mkdir(mode=0o700)
    config = folder / "ssh_config"
    config.write_text(f"Host *\n  User root\n  IdentityFile {folder / 'client_id'}\n"
                      f"  IdentitiesOnly yes\n  UserKnownHostsFile {folder / 'known_hosts'}\n"
                      "  StrictHostKeyChecking accept-new\n  LogLevel ERROR\n"
                      "  ConnectTimeout 5\n")
    lab = Lab(folder, home, config, list(hosts))
    for host in hosts:
        env = {"HOME": str(home)}
        if other_path and host.name in other_path:
            env["PATH"] = other_path[host.name]
        start_sshd(host, folder, folder / "nobody_keys" if host in refuse else authorized,
                   env)
    for host in hosts:
        if host in refuse:
            wait_for(lambda: "Permission denied" in lab.ssh(host, "true").stderr, 20,
                     f"sshd on {host.address} to refuse our key")
        else:
            wait_for(lambda: lab.ssh(host, "true").returncode == 0, 20,
                     f"sshd on {host.address} to let us in")
    return lab
