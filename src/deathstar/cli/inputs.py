"""Reading a map's inputs from files, and importing the function a CLI map names.

An input file is JSONL (one input a line: a JSON array is the positional arguments, an
object the keyword arguments, anything else the single argument) or a pickle
(``.pkl``/``.pickle``: a list of the same shapes). JSONL is read lazily, so a file of a
million lines never sits in memory at once; a malformed line is an ``InputError`` naming
the file and line.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

Call = tuple[tuple[Any, ...], "dict[str, Any] | None"]


class InputError(ValueError):
    """Bad input to a map: names the file and line, or the module and function."""


def to_call(value: Any) -> Call:
    """The shapes of one input: list -> positional args, dict -> keyword args, else the
    single argument."""
    if isinstance(value, list):
        return tuple(value), None
    if isinstance(value, dict):
        return (), value
    return (value,), None


def read_calls(path: str | Path) -> tuple[Iterator[Call], int]:
    """Open an input file; returns the calls (read lazily for JSONL) and their count."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix.lower() in (".pkl", ".pickle"):
        with path.open("rb") as fh:
            try:
                values = pickle.load(fh)
            except Exception as exc:
                raise InputError(f"{path}: not a readable pickle ({exc})") from None
        if not isinstance(values, (list, tuple)):
            raise InputError(f"{path}: the pickle holds a {type(values).__name__}, "
                             "not a list of inputs")
        return (to_call(v) for v in values), len(values)
    return _jsonl_calls(path), _count_lines(path)


def _count_lines(path: Path) -> int:
    """Inputs in a JSONL file (its non-blank lines), checking that each is JSON, so a bad
    line stops the map before anything runs rather than half-way through."""
    count = 0
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                _parse_line(path, lineno, line)
                count += 1
    return count


_DECODER = json.JSONDecoder()


def _parse_line(path: Path, lineno: int, line: bytes) -> Any:
    """The one JSON value on a line (UTF-8); InputError naming file and line otherwise.
    (The decoder's raw_decode is a quarter of json.loads's cost per line.)"""
    try:
        text = line.decode("utf-8").strip()
        value, end = _DECODER.raw_decode(text)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InputError(f"{path}, line {lineno}: not valid JSON ({exc})") from None
    if end != len(text):
        raise InputError(f"{path}, line {lineno}: not valid JSON (extra data after the "
                         f"value, at column {end + 1})")
    return value


def _jsonl_calls(path: Path) -> Iterator[Call]:
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                yield to_call(_parse_line(path, lineno, line))


def load_function(spec: str) -> Callable[..., Any]:
    """Import ``MODULE:FUNC`` (or ``MODULE.FUNC``) with the current folder on the path."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
    else:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise InputError(f"{spec!r}: give the function as MODULE:FUNCTION, "
                         "e.g. examples.pi:estimate_pi")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise InputError(f"cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:
        raise InputError(f"importing module {module_name!r} failed: "
                         f"{type(exc).__name__}: {exc}") from None
    fn: Any = module
    for part in attr.split("."):
        try:
            fn = getattr(fn, part)
        except AttributeError:
            hint = "" if ":" in spec else " (give the function as MODULE:FUNCTION)"
            raise InputError(f"module {module_name!r} has no {attr!r}{hint}") from None
    if not callable(fn):
        raise InputError(f"{spec!r} is a {type(fn).__name__}, not a function")
    return fn  # type: ignore[no-any-return]


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """The ``--kwargs`` JSON object of common keyword arguments."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InputError(f"--kwargs is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InputError(f"--kwargs must be a JSON object, not {type(value).__name__}")
    return value
