"""What the EC2 tests share: an environment pointing boto3 and the `deathstar ec2`
commands at a moto server, and running those commands as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXE = str(Path(sys.executable).with_name("deathstar"))


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
