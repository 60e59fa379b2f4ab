"""What the EC2 tests share: a moto server, an environment pointing boto3 and the
`deathstar ec2` commands at it, and running those commands as a user would."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

EXE = str(Path(sys.executable).with_name("deathstar"))


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port free on ``address`` now."""
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_server_on(address: str) -> Iterator[str]:
    """A moto server (a real HTTP endpoint) listening on ``address``; yields its URL."""
    from moto import server

    moto = server.ThreadedMotoServer(ip_address=address, port=free_port(address))
    moto.start()
    host, port = moto.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        moto.stop()


def moto_environment(moto: str, cache: Path, tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment pointing boto3 at ``moto``, with a config folder of its own, the
    bundle cache ``cache``, and the caller-address lookup pointed at a closed loopback
    port (nothing leaves this host). Set in this process too; returned for children."""
    env = {"AWS_ENDPOINT_URL": moto, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "DEATHSTAR_CACHE_DIR": str(cache),
           "DEATHSTAR_CHECKIP_URL": "http://127.0.0.1:9/"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("DEATHSTAR_KEYS", raising=False)
    return {**{k: v for k, v in os.environ.items() if k != "DEATHSTAR_KEYS"}, **env}


def ec2_cli(env: dict[str, str], *args: str, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
    """``deathstar ec2 ARGS`` through the console script, no standard input."""
    return subprocess.run([EXE, "ec2", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
