"""Another unprivileged user on the same machine, made by the test (``useradd``), attacks
a daemon and its files. The attacker is a forked child of this test that has dropped to
that user's uid and gids before it touches anything (the interpreter and pyzmq are loaded
already: the user cannot read the root-owned Python this suite runs on).

Covers issue 14's attacks 2 (a keyless loopback daemon), 6 (``--ipc`` folders) and 8
(owners of key folders, ``authorized/`` and ``config.toml``; the config folder's mode)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import zmq

import deathstar
from deathstar import protocol
from tests import jobs
from tests.conftest import Daemon, daemon_command, wait_for

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                                 reason="needs root and useradd to make a second local user")]

EXE = str(Path(sys.executable).with_name("deathstar"))


@pytest.fixture(scope="module")
def attacker() -> Iterator[pwd.struct_passwd]:
    name = f"dsatk{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def as_user(user: pwd.struct_passwd, fn: Callable[[], Any], timeout: float = 30) -> Any:
    """Run ``fn`` in a forked child that is ``user`` (uid, gid, no supplementary groups);
    returns what it returned, or the repr of what it raised."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()

    def run() -> None:
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
        try:
            child.send(("ok", fn()))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            child.send(("raised", f"{type(exc).__name__}: {exc}"))

    proc = ctx.Process(target=run)
    proc.start()
    try:
        assert parent.poll(timeout), "the attacker process did not report"
        kind, value = parent.recv()
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    return value if kind == "ok" else f"raised {value}"


def knock(endpoint: str, frames: list[bytes], wait_s: float = 2.0) -> str:
    """Plaintext ZeroMQ from the attacker: send one message, say what came back."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        if not sock.poll(int(wait_s * 1000)):
            return "no answer"
        return protocol.decode(sock.recv_multipart()).type
    finally:
        sock.close(0)
        ctx.term()


def _start(cmd: list[str], env: dict[str, str], log: Path) -> Daemon:
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line:
        raise AssertionError(f"daemon exited: {proc.wait(10)} {log.read_text()}")
    return Daemon(proc, int(json.loads(line)["exec"]))


@pytest.fixture
def fresh_home(tmp_path: Path) -> dict[str, str]:
    """An environment with no keys anywhere: its own empty config folder."""
    env = {k: v for k, v in os.environ.items() if k != "DEATHSTAR_KEYS"}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    return env


def test_a_keyless_loopback_daemon_is_no_door_for_another_user(
        attacker: pwd.struct_passwd, fresh_home: dict[str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``deathstar daemon --host 127.0.0.1`` with no keys: it makes keys and serves CURVE
    only, so another user's plaintext hello, status request and worker sign-up get
    nothing; the owner's client, with no keys named, finds the made ones and maps."""
    d = _start(daemon_command("--host", "127.0.0.1", "--port", "0", "--workers", "1",
                              "--ready-json", "--heartbeat", "0.2"), fresh_home,
               tmp_path / "daemon.log")
    try:
        keys = Path(fresh_home["XDG_CONFIG_HOME"]) / "deathstar" / "keys"
        assert (keys / "node.key_secret").exists()
        assert f"made keys in {keys}" in (tmp_path / "daemon.log").read_text()
        for folder in (keys.parent, keys):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        tries = {
            "exec": (f"tcp://127.0.0.1:{d.port}", protocol.hello(1.0)),
            "status": (f"tcp://127.0.0.1:{d.port + 1}", protocol.pack(protocol.STATUS)),
            "workers": (f"tcp://127.0.0.1:{d.port + 2}", protocol.ready(1.0, "evil", 1)),
        }
        for port, (endpoint, frames) in tries.items():
            answer = as_user(attacker, lambda: knock(endpoint, frames))
            assert answer == "no answer", f"{port} port answered another user: {answer}"
        monkeypatch.setenv("XDG_CONFIG_HOME", fresh_home["XDG_CONFIG_HOME"])
        monkeypatch.delenv("DEATHSTAR_KEYS")
        res = deathstar.map(jobs.square, range(8), cluster=[f"127.0.0.1:{d.port}"])
        assert list(res) == [x * x for x in range(8)]
    finally:
        d.stop()


def test_plaintext_tcp_needs_insecure_and_the_client_asks_for_it(
        fresh_home: dict[str, str], tmp_path: Path) -> None:
    res = subprocess.run(daemon_command("--host", "127.0.0.1", "--port", "0", "--workers",
                                        "0", "--keys", "none"),
                         env=fresh_home, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "--insecure" in res.stderr
    d = _start(daemon_command("--host", "127.0.0.1", "--port", "0", "--workers", "1",
                              "--ready-json", "--insecure"), fresh_home,
               tmp_path / "daemon.log")
    try:
        assert "no authentication" in (tmp_path / "daemon.log").read_text()
        # a client with no keys named makes keys and refuses plaintext: nothing answers
        env = {**fresh_home, "XDG_CONFIG_HOME": fresh_home["XDG_CONFIG_HOME"] + "-client"}
        run = subprocess.run([sys.executable, "-c", (
            "import deathstar, sys\n"
            "try:\n"
            f"    deathstar.map(abs, [1], cluster=['127.0.0.1:{d.port}'], connect_timeout=1)\n"
            "except deathstar.NoNodesError as e:\n"
            "    print('refused:', e); sys.exit(7)\n")],
            env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 7, run.stdout + run.stderr
        made = Path(env["XDG_CONFIG_HOME"]) / "deathstar" / "keys" / "client.key_secret"
        assert made.exists()
        assert deathstar.map(abs, [-3], cluster=[f"127.0.0.1:{d.port}"], keys="none") == [3]
    finally:
        d.stop()


def test_an_ipc_folder_others_can_write_is_refused(tmp_path: Path,
                                                   attacker: pwd.struct_passwd) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    res = subprocess.run(daemon_command("--ipc", str(shared), "--workers", "0"),
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and str(shared) in res.stderr
    assert "loose permissions" in res.stderr
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, attacker.pw_uid, attacker.pw_gid)
    res = subprocess.run(daemon_command("--ipc", str(theirs), "--workers", "0"),
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and f"uid {attacker.pw_uid}" in res.stderr


def test_a_private_ipc_daemon_is_out_of_another_users_reach(
        tmp_path: Path, attacker: pwd.struct_passwd) -> None:
    tmp_path.chmod(0o755)
    folder = tmp_path / "ipc"
    folder.mkdir(mode=0o700)
    d = _start(daemon_command("--ipc", str(folder), "--workers", "1", "--ready-json"),
               dict(os.environ), tmp_path / "daemon.log")
    try:
        wait_for(lambda: (folder / "exec").exists(), 10, "the exec socket")
        assert stat.S_IMODE((folder / "exec").stat().st_mode) & 0o077 == 0
        answer = as_user(attacker, lambda: knock(f"ipc://{folder}/exec",
                                                 protocol.hello(1.0)))
        assert answer == "no answer"
    finally:
        d.stop()


def test_key_folders_and_config_must_be_the_users(
        tmp_path: Path, attacker: pwd.struct_passwd, fresh_home: dict[str, str]) -> None:
    keys = tmp_path / "keys"
    subprocess.run([EXE, "keygen", str(keys)], check=True, capture_output=True)
    os.chown(keys, attacker.pw_uid, attacker.pw_gid)  # still 0700: but not ours
    res = subprocess.run(daemon_command("--host", "127.0.0.1", "--port", "0", "--workers",
                                        "0", "--keys", str(keys)),
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and f"uid {attacker.pw_uid}" in res.stderr
    os.chown(keys, 0, 0)
    theirs = tmp_path / "their-authorized"
    theirs.mkdir(mode=0o755)
    shutil.copyfile(keys / "authorized" / "client.key", theirs / "client.key")
    os.chown(theirs, attacker.pw_uid, attacker.pw_gid)
    shutil.rmtree(keys / "authorized")
    (keys / "authorized").symlink_to(theirs)
    res = subprocess.run(daemon_command("--host", "127.0.0.1", "--port", "0", "--workers",
                                        "0", "--keys", str(keys)),
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "symbolic link" in res.stderr
    # a config file another user can write could say keys = "none": not used
    config = Path(fresh_home["XDG_CONFIG_HOME"]) / "deathstar" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[defaults]\nkeys = "none"\n')
    os.chown(config, attacker.pw_uid, attacker.pw_gid)
    res = subprocess.run([EXE, "config", "show"], env=fresh_home, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2 and "config file not used" in res.stderr


def test_keygen_under_umask_000_makes_private_folders(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "XDG_CONFIG_HOME": str(home / ".config")}
    env.pop("DEATHSTAR_KEYS")
    res = subprocess.run(["sh", "-c", f"umask 000 && exec {EXE} keygen"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    for folder in (home / ".config", home / ".config" / "deathstar",
                   home / ".config" / "deathstar" / "keys"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_another_user_cannot_prove_our_shared_memory(attacker: pwd.struct_passwd) -> None:
    """A daemon of another user on this machine is not given our large buffers through
    /dev/shm: it cannot read our probe (a 0600 file in a 0700 folder), so it cannot
    answer it, and our client sends it everything through the socket."""
    from deathstar import shm

    if not shm.SharedFolder.available():
        pytest.skip("no writable /dev/shm")
    ours = shm.SharedFolder()
    try:
        path, proof = ours.probe()
        assert shm.prove_shared(path) == proof  # we can
        assert as_user(attacker, lambda: shm.prove_shared(path)) is None
    finally:
        ours.close()
