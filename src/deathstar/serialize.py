"""Payloads: cloudpickle protocol 5 with large buffers out-of-band, content hashes, and
shipping the user's own modules by value.

A payload is a list of frames: the pickle stream first, then one frame per out-of-band
buffer (a numpy array's memory travels as its own ZeroMQ frame, never copied into the
pickle stream).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import sysconfig
from types import ModuleType
from typing import Any, Iterable

import cloudpickle

#: Buffers smaller than this stay inside the pickle stream: a frame of their own costs more.
OUT_OF_BAND_MIN_BYTES = 64 * 1024


class SerializationError(Exception):
    """Something the user handed over cannot be pickled; the message names it."""


def dumps(obj: Any) -> list[Any]:
    """Serialize ``obj`` into payload frames (pickle stream + out-of-band buffers)."""
    buffers: list[Any] = []

    def keep_large(buf: pickle.PickleBuffer) -> bool:
        view = buf.raw()
        if view.nbytes < OUT_OF_BAND_MIN_BYTES:
            return True  # true means: serialize this one in-band
        buffers.append(view)
        return False

    stream = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep_large)
    return [stream, *buffers]


def loads(frames: list[Any]) -> Any:
    """Deserialize payload frames made by ``dumps``.

    Out-of-band buffers are copied into writable memory so that arrays the user receives
    can be modified in place, as they can with multiprocessing.
    """
    if not frames:
        raise SerializationError("empty payload")
    buffers = [bytearray(f) for f in frames[1:]]
    return pickle.loads(memoryview(frames[0]), buffers=buffers)


def payload_size(frames: Iterable[Any]) -> int:
    """Total bytes of payload frames."""
    return sum(len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in frames)


def content_hash(frames: Iterable[Any]) -> str:
    """A short, collision-resistant name for a payload's content."""
    digest = hashlib.blake2b(digest_size=16)
    for frame in frames:
        view = memoryview(frame if isinstance(frame, bytes) else frame).cast("B")
        digest.update(len(view).to_bytes(8, "little"))
        digest.update(view)
    return digest.hexdigest()


def dumps_function(fn: Any, common: dict[str, Any]) -> list[Any]:
    """Serialize a map's function with its common keyword arguments.

    Raises ``SerializationError`` naming the function or the common argument that cannot
    be pickled, and why.
    """
    try:
        return dumps((fn, common))
    except Exception as exc:
        first = exc
    name = getattr(fn, "__qualname__", None) or repr(fn)
    culprits: list[tuple[str, Any]] = [(f"the function {name}", fn)]
    culprits += [(f"the common argument {key!r} ({type(v).__name__})", v)
                 for key, v in common.items()]
    for what, obj in culprits:
        try:
            dumps(obj)
        except Exception as exc:
            raise SerializationError(
                f"{what} cannot be pickled: {type(exc).__name__}: {exc}") from exc
    raise SerializationError(f"the function {name} and its common arguments cannot be "
                             f"pickled: {type(first).__name__}: {first}") from first


# ------------------------------------------------------------------ by-value modules


def _installed_roots() -> tuple[str, ...]:
    roots = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(os.path.realpath(path))
    for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix):
        roots.add(os.path.realpath(os.path.join(prefix, "lib")))
    return tuple(sorted(roots))


_INSTALLED = _installed_roots()
_SHIPPED: set[str] = set()
_CHECKED: set[str] = set()  # every module looked at once: the scan is per new module
_modules_seen = 0  # len(sys.modules) at the last scan


def _is_local(module: ModuleType) -> bool:
    """A module the user wrote and workers may not have: not installed, not ours."""
    name = module.__name__
    if name == "__main__" or name.split(".")[0] in ("deathstar",):
        return False
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return False
    real = os.path.realpath(path)
    return not any(real.startswith(root + os.sep) for root in _INSTALLED)


def ship_local_modules() -> None:
    """Make cloudpickle send the user's own modules by value.

    A function from ``mymod.py`` in the current folder would otherwise be pickled as a
    reference to ``mymod``, which a worker on another machine cannot import. Every loaded
    module that lives outside the installed locations (stdlib, site-packages) is registered
    to travel by value, so helpers it imports travel with it.
    """
    global _modules_seen
    if len(sys.modules) == _modules_seen:
        return  # nothing imported since the last look (the common case: every map)
    _modules_seen = len(sys.modules)
    for name, module in list(sys.modules.items()):
        if name in _CHECKED:
            continue
        _CHECKED.add(name)
        if not isinstance(module, ModuleType):
            continue
        if _is_local(module):
            try:
                cloudpickle.register_pickle_by_value(module)
            except ValueError:
                continue  # not importable by that name (a test file loaded by path)
            _SHIPPED.add(name)
