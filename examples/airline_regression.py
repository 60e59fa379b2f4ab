"""The original talk's third example: a regression over airline data kept in S3.

Synthetic airline-like CSV chunks (departure time, distance, departure delay) are written
to an S3 bucket; a map reads each chunk from S3 with boto3 and returns its XᵀX and Xᵀy;
the client sums them and solves the normal equations for

    delay = b0 + b1 * departure_hour + b2 * distance_1000_miles

    python -m examples.airline_regression --bucket my-bucket [--chunks 40] [--rows 50000]
        [--cluster node1,node2]            # needs boto3 and AWS credentials (or moto)
"""

from __future__ import annotations

import argparse
import io
from typing import Any

import numpy as np

#: The coefficients the synthetic data are made with (intercept, per hour, per 1000 mi).
TRUE_COEFFICIENTS = (2.0, 0.75, -1.5)
COLUMNS = "dep_hour,distance,dep_delay"


def make_chunk(seed: int, rows: int) -> str:
    """One CSV chunk: departure hour (0-24), distance (miles), departure delay (minutes)."""
    rng = np.random.default_rng(seed)
    hour = rng.uniform(0, 24, rows)
    distance = rng.uniform(100, 3000, rows)
    b0, b1, b2 = TRUE_COEFFICIENTS
    delay = b0 + b1 * hour + b2 * distance / 1000 + rng.normal(0, 5, rows)
    out = io.StringIO()
    out.write(COLUMNS + "\n")
    np.savetxt(out, np.column_stack([hour, distance, delay]), delimiter=",", fmt="%.6f")
    return out.getvalue()


def upload_chunks(bucket: str, chunks: int, rows: int, prefix: str = "airline/") -> list[str]:
    """Write ``chunks`` CSV chunks to ``s3://bucket/prefix``; returns their keys."""
    import boto3

    s3 = boto3.client("s3")
    keys = []
    for i in range(chunks):
        key = f"{prefix}chunk-{i:04d}.csv"
        s3.put_object(Bucket=bucket, Key=key, Body=make_chunk(i, rows).encode())
        keys.append(key)
    return keys


def design(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """X (intercept, hour, distance in 1000 miles) and y (delay) of parsed rows."""
    hour, distance, delay = table[:, 0], table[:, 1], table[:, 2]
    x = np.column_stack([np.ones(len(table)), hour, distance / 1000])
    return x, delay


def chunk_moments(key: str, bucket: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Runs on a worker: read one chunk from S3, return XᵀX, Xᵀy and its row count."""
    import boto3

    body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    table = np.loadtxt(io.BytesIO(body), delimiter=",", skiprows=1, ndmin=2)
    x, y = design(table)
    return x.T @ x, x.T @ y, len(table)


def solve(moments: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, int]:
    """Sum the chunks' moments and solve the normal equations; returns (b, rows)."""
    xtx = sum(m[0] for m in moments)
    xty = sum(m[1] for m in moments)
    rows = sum(m[2] for m in moments)
    return np.linalg.solve(xtx, xty), rows


def main(argv: list[str] | None = None) -> Any:
    import deathstar

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--cluster", default=None)
    parser.add_argument("--upload", action="store_true", help="write the chunks first")
    args = parser.parse_args(argv)
    if args.upload:
        keys = upload_chunks(args.bucket, args.chunks, args.rows)
    else:
        keys = [f"airline/chunk-{i:04d}.csv" for i in range(args.chunks)]
    res = deathstar.map(chunk_moments, keys, cluster=args.cluster, bucket=args.bucket)
    b, rows = solve(list(res))
    print(f"delay = {b[0]:.3f} + {b[1]:.3f} * hour + {b[2]:.3f} * distance/1000 "
          f"({rows} rows, {len(keys)} chunks)")
    for row in deathstar.node_summary(res.report):
        print(f"  {row.node}: {row.jobs_completed} chunks")
    return b


if __name__ == "__main__":
    main()
