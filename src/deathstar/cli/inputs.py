"""Reading a map's inputs from files, and importing the function a CLI map names.

An input file is JSONL (one input a line: a JSON array is the positional arguments, an
object the keyword arguments, anything else the single argument) or a pickle
(``.pkl``/``.pickle``: a list of the same shapes). Every line of a JSONL file is checked
when it is opened, so a malformed one (an ``InputError`` naming the file and line) stops
the map before anything runs. A file whose lines are all numbers of one kind (integers,
or floats) is kept from that pass as a typed array, 8 bytes an input, and sliced into
messages as a list would be; any other is read again lazily as the map goes, so a file of
a million lines never sits in memory as Python objects.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

Call = tuple[tuple[Any, ...], "dict[str, Any] | None"]

#: Numbers a JSONL file may hold to be kept as an array (8 bytes each) rather than read
#: again lazily.
KEPT_MAX_INPUTS = 4_000_000


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


@dataclass
class Inputs:
    """A map's inputs: the calls (read lazily), how many, and, when every input is one
    argument held here already (``plain``), those arguments, which a map slices into
    messages without a call per input (``calls`` then comes from them)."""

    calls: Iterator[Call]
    total: int
    plain: Sequence[Any] | None = None


def read_inputs(path: str | Path) -> Inputs:
    """Open an input file and check every input in it (``InputError`` names the file and
    the line)."""
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
        if any(isinstance(v, (list, dict)) for v in values):
            return Inputs((to_call(v) for v in values), len(values))
        return _plain(values)
    total, numbers = _check_lines(path)
    return Inputs(_jsonl_calls(path), total) if numbers is None else _plain(numbers)


def _plain(values: Sequence[Any]) -> Inputs:
    return Inputs((((v,), None) for v in values), len(values), values)


def _check_lines(path: Path) -> tuple[int, array[Any] | None]:
    """The inputs in a JSONL file (its non-blank lines), checking that each is JSON, so a
    bad line stops the map before anything runs rather than half-way through; and, when
    every line is a number of the first one's kind (an integer of 64 bits, or a float),
    at most ``KEPT_MAX_INPUTS`` of them, those numbers."""
    count = 0
    kept: array[Any] | None = None
    kind: type = type(None)
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            value = _parse_line(path, lineno, line)
            count += 1
            if count == 1 and type(value) in (int, float):
                kind, kept = type(value), array("q" if type(value) is int else "d")
            if kept is not None:
                if type(value) is not kind or count > KEPT_MAX_INPUTS:
                    kept = None  # (a bool is no int here: True must stay True)
                    continue
                try:
                    kept.append(value)
                except OverflowError:  # an integer past 64 bits
                    kept = None
    return count, kept


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
