"""Keys, CurveZMQ, and the canary: nobody runs code on a node without an authorized key."""

from __future__ import annotations

import os
import pathlib
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
import zmq

import deathstar
from deathstar import keys as keymod
from deathstar import protocol
from deathstar.client import Cluster, query_status
from tests import jobs
from tests.conftest import Daemon, wait_for, worker_pids

pytestmark = pytest.mark.timeout(120)

EXE = str(Path(sys.executable).with_name("deathstar"))


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    out = subprocess.run([EXE, "keygen", str(folder)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return folder


@pytest.fixture
def secure(daemons: Callable[..., Daemon], keydir: Path) -> Daemon:
    return daemons(2, keys=str(keydir))


def test_keygen_makes_private_files_and_refuses_to_overwrite(keydir: Path) -> None:
    assert stat.S_IMODE(keydir.stat().st_mode) == 0o700
    for name in ("node.key_secret", "client.key_secret"):
        assert stat.S_IMODE((keydir / name).stat().st_mode) == 0o600
    assert (keydir / "authorized" / "client.key").read_bytes() == \
        (keydir / "client.key").read_bytes()
    before = (keydir / "node.key_secret").read_bytes()
    again = subprocess.run([EXE, "keygen", str(keydir)], capture_output=True, text=True)
    assert again.returncode == 2 and "--force" in again.stderr
    assert (keydir / "node.key_secret").read_bytes() == before
    forced = subprocess.run([EXE, "keygen", str(keydir), "--force"], capture_output=True)
    assert forced.returncode == 0
    assert (keydir / "node.key_secret").read_bytes() != before


@pytest.mark.parametrize("target, mode", [
    ("node.key_secret", 0o644),
    ("authorized", 0o777),
    (".", 0o755),
])
def test_loose_permissions_stop_the_daemon_naming_the_file(keydir: Path, target: str,
                                                           mode: int) -> None:
    path = keydir / target
    path.chmod(mode)
    res = subprocess.run([EXE, "daemon", "--host", "127.0.0.1", "--port", "0", "--workers",
                          "0", "--keys", str(keydir)], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2
    assert str(path.resolve() if target == "." else path).rstrip("/.") in res.stderr
    assert "loose permissions" in res.stderr


def test_public_bind_without_keys_refuses_and_with_insecure_warns() -> None:
    res = subprocess.run([EXE, "daemon", "--host", "0.0.0.0", "--port", "0", "--workers", "0",
                          "--keys", "none"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "deathstar keygen" in res.stderr


def test_authorized_client_maps_and_reads_status(secure: Daemon, keydir: Path) -> None:
    res = deathstar.map(jobs.square, range(50), cluster=[secure.address], keys=keydir)
    assert list(res) == [x * x for x in range(50)]
    row = query_status([secure.address], timeout=3, keys=keydir)[0]
    assert row["error"] == "" and row["workers"] == 2


def test_without_the_right_keys_nothing_answers(secure: Daemon, tmp_path: Path) -> None:
    other = tmp_path / "other"
    subprocess.run([EXE, "keygen", str(other)], check=True, capture_output=True)
    for keys in ("none", str(other)):
        with pytest.raises(deathstar.NoNodesError):
            Cluster([secure.address], connect_timeout=1.0, keys=keys)
        assert query_status([secure.address], timeout=1.0, keys=keys)[0]["error"]
    assert secure.status()["tasks_done"] == 0


class _Touch:
    """Unpickling this creates the file: if it ever exists, someone unpickled it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self) -> Any:
        return (pathlib.Path.touch, (self.path,))


def _canary_messages(path: Path) -> list[list[bytes]]:
    """A hello, a function blob whose unpickling creates ``path``, and a task using it."""
    canary = pickle.dumps(_Touch(path))
    fn_hash = "c" * 32
    return [
        protocol.pack(protocol.HELLO, versions=protocol.local_versions(), hb=1.0),
        protocol.pack(protocol.BLOB, [canary], h=fn_hash),
        protocol.pack(protocol.TASK, [canary], id=1, fn=fn_hash, n=1, timeout=None),
        protocol.pack(protocol.STATUS),
    ]


def _attack(endpoint: str, messages: list[list[bytes]], rounds: int,
            curve: tuple[bytes, bytes, bytes] | None) -> None:
    ctx = zmq.Context.instance()
    for _ in range(rounds):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100000)
        # A refused handshake drops the pipe, and a DEALER without one blocks in send.
        sock.setsockopt(zmq.SNDTIMEO, 1000)
        if curve is not None:
            keymod.connect_with(sock, *curve)
        sock.connect(endpoint)
        try:
            for _ in range(20):
                for frames in messages:
                    sock.send_multipart(frames)
        except zmq.Again:
            pass
        sock.poll(50)  # give the handshake a chance; any answer is read and ignored
        sock.close()


@pytest.mark.parametrize("zap", [True, False], ids=["authenticator", "no-authenticator"])
def test_canary_never_runs_without_an_authorized_key(daemons: Callable[..., Daemon],
                                                     keydir: Path, tmp_path: Path,
                                                     zap: bool) -> None:
    """(a) no CURVE, (b) a valid keypair that is not authorized, (c) a random keypair
    knowing only the node's public key; with the ZAP handler, and without it (as if it
    were gone: CURVE then lets anyone with the node key in, and the per-message User-Id
    check must stop them, failing closed)."""
    d = daemons(1, *([] if zap else ["--no-zap"]), keys=str(keydir),
                stderr=None if zap else subprocess.PIPE, wait_workers=zap)
    canary = tmp_path / "canary"
    messages = _canary_messages(canary)
    node_public = keymod.load_client_keys(keydir).server_key(
        keymod.NodeAddress(d.address, "127.0.0.1", d.port))
    stranger = tmp_path / "stranger"
    subprocess.run([EXE, "keygen", str(stranger)], check=True, capture_output=True)
    s_keys = keymod.load_client_keys(stranger)
    r_public, r_secret = zmq.curve_keypair()
    attackers: list[tuple[bytes, bytes, bytes] | None] = [
        None,                                          # (a)
        (s_keys.public, s_keys.secret, node_public),   # (b)
        (r_public, r_secret, node_public),             # (c)
    ]
    out: dict[str, Any] = {}

    def authorized_map() -> None:
        try:
            out["res"] = deathstar.map(jobs.square, range(300), cluster=[d.address],
                                       keys=keydir, chunksize=1, connect_timeout=2.0)
        except deathstar.NoNodesError as exc:
            out["error"] = exc

    t = threading.Thread(target=authorized_map)
    t.start()
    rounds = 25
    for port in (d.port, d.port + 1, d.port + 2):  # exec, status, workers
        for curve in attackers:
            _attack(f"tcp://127.0.0.1:{port}", messages, rounds=rounds, curve=curve)
    t.join(60)
    assert not canary.exists()
    assert d.proc.poll() is None
    if zap:
        assert list(out["res"]) == [x * x for x in range(300)]
        status = d.status()
        assert status["tasks_done"] == 300 and status["workers"] == 1
        # every CURVE attacker's handshake was refused (2 of 3 attackers use CURVE)
        assert status["refused_handshakes"] >= 2 * 3 * rounds
    else:
        # Fail closed: without the handler nobody has a User-Id, so nothing is served
        # (not even the daemon's own workers), and every stranger's message - thousands -
        # was dropped before anything looked inside it.
        assert isinstance(out.get("error"), deathstar.NoNodesError)
        bad = _bad_messages(d)
        assert bad >= 2 * 3 * rounds * 20 * len(messages)


def _bad_messages(d: Daemon) -> int:
    """The daemon's dropped-message count from its last log line: without the ZAP
    handler its status port, like every port, serves nobody."""
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(20) == 0
    assert d.proc.stderr is not None
    log = d.proc.stderr.read().decode()
    match = re.search(r"(\d+) bad messages dropped", log)
    assert match, log[-2000:]
    return int(match.group(1))


def _authorize_worker(keydir: Path, public: Path) -> None:
    workers = keydir / keymod.AUTHORIZED_WORKERS
    workers.mkdir(mode=0o700, exist_ok=True)
    shutil.copyfile(public, workers / public.name)


def test_hand_started_worker_needs_an_authorized_key(daemons: Callable[..., Daemon],
                                                     keydir: Path) -> None:
    _authorize_worker(keydir, keydir / "client.key")
    d = daemons(0, keys=str(keydir))
    endpoint = f"tcp://127.0.0.1:{d.port + 2}"
    rogue = subprocess.Popen([EXE, "worker", "--connect", endpoint, "--keys", "none"],
                             stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    good = subprocess.Popen([EXE, "worker", "--connect", endpoint, "--keys", str(keydir)],
                            stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: d.status()["workers"] >= 1, 20, "the authorized worker")
        res = deathstar.map(jobs.whoami, range(30), cluster=[d.address], keys=keydir)
        assert {r.rpartition(":")[2] for r in res} == {str(good.pid)}
        assert d.status()["workers"] == 1
    finally:
        for p in (rogue, good):
            p.terminate()
            p.wait(10)


def test_a_client_key_cannot_serve_as_a_worker(daemons: Callable[..., Daemon],
                                               keydir: Path, tmp_path: Path) -> None:
    """A colleague's key in authorized/ may submit work, but signing up as a worker would
    hand it the victim's tasks and let its results run code in the victim's client."""
    colleague = tmp_path / "colleague"
    subprocess.run([EXE, "keygen", str(colleague)], check=True, capture_output=True)
    shutil.copyfile(colleague / "client.key", keydir / "authorized" / "colleague.key")
    shutil.copyfile(keydir / "node.key", colleague / "node.key")  # it knows the node
    d = daemons(1, keys=str(keydir))
    endpoint = f"tcp://127.0.0.1:{d.port + 2}"
    rogue = subprocess.Popen([EXE, "worker", "--connect", endpoint, "--keys", str(colleague)],
                             stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the colleague's key is a client key: it maps fine...
        res = deathstar.map(jobs.whoami, range(20), cluster=[d.address], keys=colleague)
        assert len(res) == 20
        # ...but its worker is never admitted, and every task ran on the daemon's own
        wait_for(lambda: d.status()["refused_handshakes"] >= 1, 20,
                 "the colleague's worker handshake to be refused")
        assert d.status()["workers"] == 1
        res = deathstar.map(jobs.whoami, range(30), cluster=[d.address], keys=keydir)
        assert str(rogue.pid) not in {r.rpartition(":")[2] for r in res}
    finally:
        rogue.terminate()
        rogue.wait(10)


def test_client_refuses_a_loosely_permitted_secret(keydir: Path) -> None:
    (keydir / "client.key_secret").chmod(0o640)
    with pytest.raises(keymod.KeyFileError, match="client.key_secret"):
        Cluster(["127.0.0.1:9"], keys=keydir, connect_timeout=0.5)


def test_key_folder_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DEATHSTAR_KEYS")
    assert keymod.resolve_dir(None, keymod.CLIENT) is None  # nothing in the default folder
    keymod.keygen(keymod.default_dir())
    assert keymod.resolve_dir(None, keymod.CLIENT) == keymod.default_dir()
    monkeypatch.setenv("DEATHSTAR_KEYS", "none")
    assert keymod.resolve_dir(None, keymod.CLIENT) is None
    assert keymod.resolve_dir(tmp_path, keymod.CLIENT) == tmp_path


def test_the_daemons_own_workers_hold_no_key_and_talk_over_inherited_pipes(
        daemons: Callable[..., Daemon], keydir: Path) -> None:
    """A daemon's own workers are reached through two pipes they inherited, not a socket:
    no key of any kind is in their command line or environment, and the workers' port
    admits only the keys in authorized_workers/ (none here)."""
    d = daemons(2, keys=str(keydir))
    pids = worker_pids(d)
    assert len(pids) == 2
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"CURVE" not in environ and b"curve" not in environ
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        spec = cmdline[cmdline.index(b"--connect") + 1].decode()
        assert spec.startswith("pipe:") and not any(b"curve" in a for a in cmdline)
        for fd in spec.removeprefix("pipe:").split(","):
            assert os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
    gate = keymod.Gatekeeper(zmq.Context.instance(), keymod.load_server_keys(keydir))
    assert gate.allowed[keymod.WORKERS] == set()
    assert d.status()["tasks_done"] == 0 and d.status()["workers"] == 2


def test_a_session_belongs_to_the_key_that_opened_it(daemons: Callable[..., Daemon],
                                                     keydir: Path, tmp_path: Path) -> None:
    """A second authorized key that connects with the first client's routing id (the
    daemon hands the identity over) cannot act in that client's session."""
    other = tmp_path / "other"
    subprocess.run([EXE, "keygen", str(other)], check=True, capture_output=True)
    shutil.copyfile(other / "client.key", keydir / "authorized" / "other.key")
    d = daemons(1, keys=str(keydir))
    node_key = keymod._load_public(keydir / "node.key")

    def dealer(folder: Path) -> zmq.Socket[bytes]:
        keys = keymod.load_client_keys(folder)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, b"victim")
        keymod.connect_with(sock, keys.public, keys.secret, node_key)
        sock.connect(f"tcp://127.0.0.1:{d.port}")
        return sock

    victim = dealer(keydir)
    victim.send_multipart(protocol.hello(1.0))
    assert victim.poll(10_000) and protocol.decode(victim.recv_multipart()).type == "welcome"
    before = d.status()["bad_messages"]
    intruder = dealer(other)  # same routing id, another key
    try:
        intruder.send_multipart(protocol.cancel([]))
        wait_for(lambda: d.status()["bad_messages"] > before, 10,
                 "the intruder's message to be dropped")
    finally:
        victim.close()
        intruder.close()
