"""Where ``deathstar map`` puts results: JSONL lines written as results arrive (fsync'd in
batches, so a crash of the client loses at most the last batch), or one pickle at the end;
and what a previous, interrupted run already wrote, for ``--resume``.

A JSONL line is ``{"index": i, "result": value}`` or ``{"index": i, "error": {...}}``
(the error's type, message, remote traceback, node, worker, attempts, outcome).

An output file is held with an exclusive lock (``flock``) while a map writes it: a
second map on the same file stops at once (``OutputError``) and leaves it as it was.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable

from deathstar.errors import describe
from deathstar.report import TaskRecord

#: A JSONL output file is flushed and fsync'd at least this often, and every this many
#: lines, whichever comes first.
FSYNC_INTERVAL_S = 1.0
FSYNC_LINES = 10_000


class OutputError(Exception):
    """A result that the output format cannot hold, or an output file that can't be used."""


def is_pickle(path: Path | None) -> bool:
    return path is not None and path.suffix.lower() in (".pkl", ".pickle")


def lock_output(path: Path) -> int:
    """Open ``path`` (made if missing, never truncated here) and take an exclusive lock on
    it; the open descriptor holds the lock. OutputError at once when another process
    holds it, or when it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise OutputError(f"--out {path} cannot be opened: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutputError(f"--out {path} is being written by another deathstar map (it "
                          "holds the file's lock); wait for it or choose another file"
                          ) from None
    return fd


class ResultWriter:
    """Writes one line (or pickle entry) per input. ``append`` continues a previous
    file (``--resume``). The file is locked from here to ``close`` (``lock_output``:
    OutputError if another map holds it) and emptied only when the first result is
    written (or at ``close``), so a run that stops before has changed nothing.
    Not thread-safe."""

    def __init__(self, path: Path | None, append: bool = False):
        self.path = path
        self.pickled = is_pickle(path)
        self.values: list[Any] = []
        self.fh: IO[str] | None = None
        self.empty_first = not append
        if path is None:
            self.fh = sys.stdout
        else:
            self.fh = os.fdopen(lock_output(path), "r+")
            self.fh.seek(0, os.SEEK_END)
        self.unsynced = 0
        self.next_sync = time.monotonic() + FSYNC_INTERVAL_S

    def write(self, index: int, ok: bool, value: Any, record: TaskRecord) -> None:
        if self.pickled:
            self.values.append(value)
            return
        assert self.fh is not None
        self._empty_once()
        self.fh.write(result_line(index, ok, value, record) + "\n")
        self.unsynced += 1
        if self.unsynced >= FSYNC_LINES or time.monotonic() >= self.next_sync:
            self.sync()

    def write_batch(self, indices: Iterable[int], values: list[Any]) -> None:
        """``write`` for inputs that all succeeded, in one go."""
        if self.pickled:
            self.values.extend(values)
            return
        assert self.fh is not None
        self._empty_once()
        if set(map(type, values)) == {int}:  # the common case, without a call per value
            lines = [f'{{"index": {i}, "result": {v}}}\n' for i, v in zip(indices, values)]
        else:
            lines = [ok_line(i, v) + "\n" for i, v in zip(indices, values)]
        self.fh.write("".join(lines))
        self.unsynced += len(values)
        if self.unsynced >= FSYNC_LINES or time.monotonic() >= self.next_sync:
            self.sync()

    def sync(self) -> None:
        """Make what was written durable (a no-op for stdout and pickles)."""
        if self.fh is None:
            return
        self.fh.flush()
        if self.fh is not sys.stdout:
            os.fsync(self.fh.fileno())
        self.unsynced = 0
        self.next_sync = time.monotonic() + FSYNC_INTERVAL_S

    def _empty_once(self) -> None:
        if self.empty_first and self.fh is not None and self.fh is not sys.stdout:
            self.fh.seek(0)
            self.fh.truncate()
            self.empty_first = False

    def close(self) -> None:
        if self.fh is None:
            return
        self._empty_once()
        if self.pickled:
            self.fh.flush()
            with open(self.fh.fileno(), "wb", closefd=False) as fh:
                pickle.dump(self.values, fh, protocol=5)
        self.sync()
        if self.fh is not sys.stdout:
            self.fh.close()  # releases the lock
        self.fh = None


def result_line(index: int, ok: bool, value: Any, record: TaskRecord) -> str:
    """One JSONL line; raises OutputError (pointing at .pkl) when JSON can't hold it."""
    if ok:
        return ok_line(index, value)
    try:
        info = describe(value)
        return _ENCODER.encode({"index": index, "error": {
            "type": info["type"], "message": info["message"],
            "traceback": info["traceback"], "node": record.node, "worker": record.worker,
            "attempts": record.attempts, "outcome": record.outcome}})
    except (TypeError, ValueError) as exc:
        raise OutputError(
            f"the result of input {index} ({type(value).__name__}) cannot be written as "
            f"JSON ({exc}); write a pickle instead: --out results.pkl") from None


def ok_line(index: int, value: Any) -> str:
    """The JSONL line of a result, without building a dict (ints without the encoder);
    raises OutputError (pointing at .pkl) when JSON can't hold it."""
    try:
        text = str(value) if type(value) is int else _ENCODER.encode(value)
    except (TypeError, ValueError) as exc:
        raise OutputError(
            f"the result of input {index} ({type(value).__name__}) cannot be written as "
            f"JSON ({exc}); write a pickle instead: --out results.pkl") from None
    return f'{{"index": {index}, "result": {text}}}'


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


_ENCODER = json.JSONEncoder(default=_json_default)  # json.dumps's settings, built once


@dataclass
class Previous:
    """What an earlier run wrote: the inputs that succeeded and those that failed."""

    succeeded: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)


def read_previous(path: Path, retry_failed: bool) -> Previous:
    """Scan a JSONL output of an interrupted run. A torn last line (the crash cut it) is
    dropped from the file. With ``retry_failed`` the failed inputs' lines are removed from
    the file too, so that they can be run again and appear once. The file is rewritten
    (atomically) only when something has to go."""
    if is_pickle(path):
        raise OutputError(f"--resume needs a .jsonl --out; {path} is a pickle, written only "
                          "at the end of a run")
    previous = Previous()
    if not path.exists():
        return previous
    lock = lock_output(path)  # not while another map writes it
    try:
        return _scan(path, previous, retry_failed)
    finally:
        os.close(lock)


def _scan(path: Path, previous: Previous, retry_failed: bool) -> Previous:
    keep: list[bytes] = []
    dropped = False
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = json.loads(raw)
                index = int(line["index"])
                failed = "error" in line
            except (ValueError, KeyError, TypeError):
                if raw.endswith(b"\n"):
                    raise OutputError(f"{path}, line {lineno}: not a deathstar result line; "
                                      "is this the right --out file?") from None
                dropped = True  # the torn last line of a crash
                continue
            if index in previous.succeeded or index in previous.failed:
                dropped = True  # written twice by a crash between write and fsync: keep one
                continue
            if failed and retry_failed:
                dropped = True
                continue
            (previous.failed if failed else previous.succeeded).add(index)
            keep.append(raw)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as fh:
            fh.writelines(keep)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    return previous
