"""The examples, run for real: the airline regression reads its chunks from moto's S3
server (a real HTTP endpoint on loopback) inside real worker processes."""

from __future__ import annotations

import io
import os
import socket
from typing import Iterator

import numpy as np
import pytest

pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

import boto3  # noqa: E402

from examples import airline_regression as airline  # noqa: E402
from tests.conftest import Daemon, start_daemon  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_daemon(s3_env: dict[str, str]) -> Iterator[Daemon]:
    d = start_daemon(2, env={**os.environ, **s3_env})  # its workers reach the same S3
    try:
        yield d
    finally:
        d.stop()


def test_airline_regression_matches_a_single_machine_fit(s3_daemon: Daemon) -> None:
    boto3.client("s3").create_bucket(Bucket="flights")
    chunks, rows = 12, 3000
    b = airline.main(["--bucket", "flights", "--chunks", str(chunks), "--rows", str(rows),
                      "--cluster", s3_daemon.address, "--upload"])
    every_row = np.vstack([np.loadtxt(io.StringIO(airline.make_chunk(i, rows)), delimiter=",",
                                      skiprows=1) for i in range(chunks)])
    x, y = airline.design(every_row)
    expected = np.linalg.lstsq(x, y, rcond=None)[0]
    assert np.allclose(b, expected, rtol=1e-9, atol=1e-9)
    assert np.allclose(b, airline.TRUE_COEFFICIENTS, atol=0.2)
    assert s3_daemon.status()["tasks_done"] == chunks
