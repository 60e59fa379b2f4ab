"""Virtual hosts for multi-host tests: Linux network namespaces on a private bridge.

``virtual_hosts(n)`` gives ``n`` hosts, each a network namespace with its own address on a
random, unused ``10.x.y.0/24``, joined by veth pairs to a bridge in the root namespace
(which holds ``.1``; the hosts get ``.2``, ``.3``, ...). Processes run "on" a host with
``Host.popen``/``Host.run`` (``ip netns exec``, plus a UTS namespace so that each host has
its own hostname). ``Host.link_down()`` pulls the host's cable silently (its processes live
on, no packet passes) and ``link_up()`` plugs it back in.

Nothing is routed anywhere else: the namespaces have no default route, the bridge has no
uplink, IPv6 is off on every interface the harness creates, and the only packets the
harness itself sends are ICMP echoes between the root address and the hosts' addresses.

Everything is removed on exit (processes started on the hosts, namespaces, veths, the
bridge), also from an atexit hook and on SIGTERM/SIGHUP if the process dies in between.
Leftovers of a run that was SIGKILLed are swept away by the next run: each run holds an
flock on ``$TMPDIR/deathstar-netns/<tag>.owner`` while its network exists, and a tag whose
owner file is unlocked is stale. Needs root; ``netns_available()`` says why not otherwise.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import ipaddress
import os
import random
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

#: Seconds setup may take to see every host answer a ping.
PING_DEADLINE_S = 10.0
#: Seconds between SIGTERM and SIGKILL for processes started on the hosts.
TERM_GRACE_S = 5.0

_CLONE_NEWNET = 0x40000000
_NETNS_DIR = "/run/netns"
#: All our names: "ds" + 4 random hex + the creating pid in hex + "-" + "b" (the bridge)
#: or the host's index (its namespace and its veth's root end).
_NAME_RE = re.compile(r"^(ds[0-9a-f]{4}[0-9a-f]+)-(b|\d+)$")
_LOCK_DIR = os.path.join(tempfile.gettempdir(), "deathstar-netns")
#: Held while choosing a subnet and making a bridge.
_LOCK_PATH = os.path.join(_LOCK_DIR, "setup.lock")


class NetnsError(RuntimeError):
    """Setting up the virtual hosts failed."""


# ---------------------------------------------------------------------------- commands


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (text output captured); raises NetnsError on failure with ``check``."""
    return _ip(*args, check=check)


def _write_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as fh:
            fh.write(value)
    except OSError:
        pass  # e.g. no IPv6 in this kernel: nothing to turn off


def netns_available() -> str | None:
    """None when network namespaces can be used here, else why not (for pytest.skip)."""
    if not hasattr(os, "geteuid") or os.uname().sysname != "Linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"the '{tool}' command is not installed"
    probe = f"ds{secrets.token_hex(2)}{os.getpid():x}-p"
    proc = _ip("netns", "add", probe, check=False)
    if proc.returncode != 0:
        return f"cannot create a network namespace: {proc.stderr.strip()}"
    try:
        up = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--uts", "true"],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if up.returncode != 0:
            return f"cannot run a process in a network namespace: {up.stderr.strip()}"
    finally:
        gone = _ip("netns", "del", probe, check=False)
    if gone.returncode != 0:
        return f"cannot delete a network namespace: {gone.stderr.strip()}"
    return None


# ---------------------------------------------------------------------------- hosts


@dataclass
class Host:
    """One virtual host: a network namespace with one interface (``eth0``) at ``address``."""

    name: str  # the network namespace
    address: str
    hostname: str  # what processes on it see as their hostname
    veth: str  # the root-namespace end of its cable, a port of the bridge
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run on this host (its namespace and its hostname)."""
        return ["ip", "netns", "exec", self.name, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostname, *argv]

    #: ``host.argv([])`` is the prefix that runs a command on this host (``wrap=``).
    argv = command

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` on this host, in a session of its own (so its group can be
        killed); it is stopped when the hosts are torn down. ``Popen.pid`` is argv's pid
        (the wrappers exec into it), but it enters the namespace only a moment after this
        returns: wait for what it does (``owns`` turns true), not for ``popen``."""
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.command(argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` on this host."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.command(argv), **kw)

    def link_down(self) -> None:
        """Pull the cable: no packet reaches or leaves the host, its processes go on and
        get no error (a node gone silent)."""
        _ip("link", "set", self.veth, "down")

    def link_up(self) -> None:
        """Plug the cable back in."""
        _ip("link", "set", self.veth, "up")

    def pids(self) -> list[int]:
        """The live processes in this host's namespace."""
        proc = _ip("netns", "pids", self.name, check=False)
        return [int(p) for p in proc.stdout.split() if p.isdigit()]

    def owns(self, pid: int) -> bool:
        """Whether process ``pid`` lives in this host's network namespace."""
        try:
            return os.stat(f"/proc/{pid}/ns/net").st_ino == \
                os.stat(f"{_NETNS_DIR}/{self.name}").st_ino
        except OSError:
            return False


# ---------------------------------------------------------------------------- the network


class _Network:
    """What one ``virtual_hosts`` created, and how to remove it. ``destroy`` is idempotent
    and never raises."""

    def __init__(self, tag: str):
        self.tag = tag
        self.bridge = f"{tag}-b"
        self.root_address = ""  # the bridge's address: the root namespace on this LAN
        self.hosts: list[Host] = []
        self.namespaces: list[str] = []
        self.links: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.destroyed = False
        self.lock = threading.Lock()
        self.owner_fd: int | None = None

    def destroy(self) -> None:
        with self.lock:
            if self.destroyed:
                return
            self.destroyed = True
        _stop_procs(self.procs)
        for ns in self.namespaces:
            _empty_namespace(ns)
            _ip("netns", "del", ns, check=False)
        for link in [*self.links, self.bridge]:
            if _ip("link", "show", link, check=False).returncode == 0:
                _ip("link", "del", link, check=False)
        if self.owner_fd is not None:
            try:
                os.unlink(os.path.join(_LOCK_DIR, f"{self.tag}.owner"))
            except OSError:
                pass
            os.close(self.owner_fd)
            self.owner_fd = None
        _ACTIVE.pop(id(self), None)


def _stop_procs(procs: list[subprocess.Popen[Any]]) -> None:
    """SIGTERM the groups of the processes still running, then SIGKILL what is left."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        _killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE_S
    for p in alive:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in alive:
        _killpg(p.pid, signal.SIGKILL)  # the leader lived until now: the group is ours
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _empty_namespace(ns: str) -> None:
    """SIGKILL every process left in namespace ``ns`` (all started by this harness) and
    wait until they are gone."""
    deadline = time.monotonic() + 5
    while True:
        proc = _ip("netns", "pids", ns, check=False)
        pids = [int(p) for p in proc.stdout.split() if p.isdigit()]
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Our own children stay zombies (and out of the list) until reaped.
        for pid in pids:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.01)


def _owner_lock(tag: str) -> int:
    """Open and lock ``tag``'s owner file: held (by this process) for as long as its
    network exists, so a run that died, even by SIGKILL, leaves it unlocked."""
    fd = os.open(os.path.join(_LOCK_DIR, f"{tag}.owner"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _is_stale(tag: str, cache: dict[str, bool]) -> bool:
    """Whether ``tag``'s owner is gone: its owner file exists and nobody holds it. A tag
    without an owner file (made elsewhere) is left alone."""
    if tag not in cache:
        path = os.path.join(_LOCK_DIR, f"{tag}.owner")
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            cache[tag] = False
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            cache[tag] = True
        except OSError:
            cache[tag] = False
        finally:
            os.close(fd)
    return cache[tag]


def _sweep_stale() -> None:
    """Remove the processes, namespaces and links that a run which died without cleaning
    up left (called under the setup lock)."""
    stale: dict[str, bool] = {}
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split(" ", 1)[0].strip()
        m = _NAME_RE.match(ns)
        if m and _is_stale(m.group(1), stale):
            _empty_namespace(ns)
            _ip("netns", "del", ns, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@", 1)[0]
        m = _NAME_RE.match(name)
        if m and _is_stale(m.group(1), stale):
            _ip("link", "del", name, check=False)
    for tag, gone in stale.items():
        if gone:
            try:
                os.unlink(os.path.join(_LOCK_DIR, f"{tag}.owner"))
            except OSError:
                pass


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the root namespace has an address in or a route to."""
    nets: list[ipaddress.IPv4Network] = []
    for line in _ip("-4", "-o", "addr", "show").stdout.splitlines():
        words = line.split()
        if "inet" in words:
            nets.append(ipaddress.IPv4Interface(words[words.index("inet") + 1]).network)
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        words = line.split()
        if words and words[0] in ("broadcast", "local", "unicast", "anycast", "multicast",
                                  "blackhole", "unreachable", "prohibit", "throw"):
            words = words[1:]
        if not words or words[0] == "default":
            continue
        try:
            nets.append(ipaddress.IPv4Network(words[0], strict=False))
        except ValueError:
            continue
    return nets


def _pick_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    rng = random.SystemRandom()
    for _ in range(1000):
        net = ipaddress.IPv4Network(f"10.{rng.randrange(256)}.{rng.randrange(256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetnsError("no free 10.x.y.0/24 subnet")


@contextmanager
def _setup_lock() -> Iterator[None]:
    """Serialises subnet choice and bridge creation between concurrent runs."""
    os.makedirs(_LOCK_DIR, mode=0o700, exist_ok=True)
    with open(_LOCK_PATH, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(net: _Network, n: int) -> None:
    with _setup_lock():
        _sweep_stale()
        net.owner_fd = _owner_lock(net.tag)  # before anything is made under its tag
        subnet = _pick_subnet()
        prefix = subnet.prefixlen
        addrs = list(subnet.hosts())
        _ip("link", "add", net.bridge, "type", "bridge", "forward_delay", "0")
        net.links.append(net.bridge)
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{net.bridge}/disable_ipv6", "1")
        _ip("addr", "add", f"{addrs[0]}/{prefix}", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
    net.root_address = str(addrs[0])
    for i in range(n):
        name = f"{net.tag}-{i}"
        _ip("netns", "add", name)
        net.namespaces.append(name)
        # IPv6 off inside (the namespace's lo and eth0 come after this), so that no router
        # solicitation or other autoconfiguration packet is ever sent.
        subprocess.run(["ip", "netns", "exec", name, "sh", "-c",
                        "for k in all default; do echo 1 > "
                        "/proc/sys/net/ipv6/conf/$k/disable_ipv6; done 2>/dev/null; true"],
                       check=True, stdin=subprocess.DEVNULL, capture_output=True)
        _ip("-n", name, "link", "set", "lo", "up")
        veth = name  # its root end; the other end is eth0 inside the namespace
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        net.links.append(veth)
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{veth}/disable_ipv6", "1")
        _ip("link", "set", veth, "master", net.bridge)
        _ip("link", "set", veth, "up")
        address = str(addrs[i + 1])
        _ip("-n", name, "addr", "add", f"{address}/{prefix}", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        net.hosts.append(Host(name, address, hostname=name, veth=veth, _procs=net.procs))


# ---------------------------------------------------------------------------- ping


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _icmp_socket(netns: str | None) -> socket.socket:
    """A raw ICMP socket in the root namespace, or in ``netns`` (made by a short-lived
    thread that enters the namespace: a socket stays in the namespace it was made in)."""
    if netns is None:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    out: list[Any] = []

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"{_NETNS_DIR}/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns}")
            finally:
                os.close(fd)
            out.append(socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
        except BaseException as exc:  # handed to the caller
            out.append(exc)

    t = threading.Thread(target=make, name=f"netns-{netns}")
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def ping(targets: Sequence[str], deadline_s: float = PING_DEADLINE_S,
         netns: str | None = None) -> set[str]:
    """ICMP echo each of ``targets`` from the root namespace (or from ``netns``) until all
    answer or the deadline passes; returns those that did not answer."""
    waiting = set(targets)
    ident = random.randrange(1, 0xFFFF)
    seq = 0
    deadline = time.monotonic() + deadline_s
    with _icmp_socket(netns) as sock:
        next_send = 0.0
        while waiting:
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_send:
                seq = (seq + 1) & 0xFFFF
                for target in waiting:
                    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
                    payload = b"deathstar-netns"
                    packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload),
                                         ident, seq) + payload
                    try:
                        sock.sendto(packet, (target, 0))
                    except OSError:
                        pass  # e.g. no route yet: try again
                next_send = now + 0.05
            ready, _, _ = select.select([sock], [], [],
                                        max(0.0, min(next_send, deadline) - time.monotonic()))
            if not ready:
                continue
            data, (src, _) = sock.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            if len(data) < ihl + 8:
                continue
            kind, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if kind == 0 and rid == ident:
                waiting.discard(src)
    return waiting


# ---------------------------------------------------------------------------- entry point

_ACTIVE: dict[int, _Network] = {}
_HOOKS_INSTALLED = False
_HOOKS_LOCK = threading.Lock()


def _cleanup_all() -> None:
    for net in list(_ACTIVE.values()):
        net.destroy()


def _on_fatal_signal(signum: int, frame: Any) -> None:
    _cleanup_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    global _HOOKS_INSTALLED
    with _HOOKS_LOCK:
        if _HOOKS_INSTALLED:
            return
        _HOOKS_INSTALLED = True
        atexit.register(_cleanup_all)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) is signal.SIG_DFL:
                    signal.signal(sig, _on_fatal_signal)


@contextmanager
def virtual_hosts(n: int, mesh: bool = True) -> Iterator[list[Host]]:
    """``n`` virtual hosts on a private bridge; everything is removed on exit.

    Setup returns only once the root namespace (at ``hosts[0]``'s subnet's ``.1``) and
    every host answer each other's pings, and, with ``mesh``, the first host reaches every
    other one across the bridge (bridged traffic can meet the root namespace's firewall
    when bridge-nf-call-iptables is on)."""
    if not 1 <= n <= 99:
        raise ValueError("1 to 99 hosts")
    tag = f"ds{secrets.token_hex(2)}{os.getpid():x}"
    assert len(f"{tag}-{n - 1}") <= 15, tag  # interface names are at most 15 characters
    net = _Network(tag)
    _install_hooks()
    _ACTIVE[id(net)] = net
    try:
        _build(net, n)
        root = net.root_address
        silent = ping([h.address for h in net.hosts])
        if silent:
            raise NetnsError(f"no ping answer from {sorted(silent)} to the root namespace "
                             f"({_bridge_nf_note()})")
        for h in net.hosts:
            if ping([root], netns=h.name):
                raise NetnsError(f"host {h.name} cannot ping the root namespace at {root}")
        if mesh and n > 1:
            silent = ping([h.address for h in net.hosts[1:]], netns=net.hosts[0].name)
            if silent:
                raise NetnsError(f"host {net.hosts[0].address} cannot reach {sorted(silent)} "
                                 f"across the bridge ({_bridge_nf_note()})")
        yield list(net.hosts)
    finally:
        net.destroy()


def _bridge_nf_note() -> str:
    try:
        with open("/proc/sys/net/bridge/bridge-nf-call-iptables") as fh:
            value = fh.read().strip()
    except OSError:
        return "br_netfilter not loaded"
    return f"bridge-nf-call-iptables={value}: check the root namespace's FORWARD/INPUT rules"


__all__ = ["Host", "NetnsError", "ip", "netns_available", "ping", "virtual_hosts"]
