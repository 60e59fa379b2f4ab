"""Payloads: cloudpickle protocol 5 with large buffers out-of-band, content hashes, and
function blobs that carry the user's own modules as source.

A payload is a list of frames: the pickle stream first, then one frame per out-of-band
buffer (a numpy array's memory travels as its own ZeroMQ frame, never copied into the
pickle stream). To a node on this machine (the embedded one), a large buffer frame may be
replaced by the path of a file in a private /dev/shm folder holding it (``shm``): one
copy instead of four through the sockets; the worker maps it (``shm.map_shared``).

A frame larger than one message may be (``config.MAX_MESSAGE_BYTES``, the size a ZeroMQ
socket here accepts per frame) is cut into pieces under it (``CHUNK_BYTES``); the payload
then starts with a small header frame saying how the pieces join (``_CHUNKED``), so it
needs no envelope field and the daemon routes the pieces as any other frames. A payload
of any size the machines can hold travels this way.

A function blob is ``(Bundle | None, Deferred((fn, common)))``: the source files of the
local modules the function needs (``deathstar.shipping``), then the function itself,
pickled by reference to those modules and unpickled only once they are importable.
"""

from __future__ import annotations

import hashlib
import io
import logging
import mmap
import pickle
import sys
from types import FunctionType, ModuleType
from typing import Any, Iterable, Sequence

import cloudpickle

from deathstar import config
from deathstar.errors import SerializationError
from deathstar.shipping import Bundle, ShippingError, bundle_for
from deathstar.shm import Kept, map_kept, map_shared

__all__ = ["Bundle", "Deferred", "SerializationError", "ShippingError",
           "bundle_for", "chunk", "content_hash", "dumps", "dumps_results", "dumps_sealed",
           "dumps_function", "function_blob", "loads", "loads_function", "payload_size",
           "pickle_function", "pickles_by_name", "seal", "unseal"]

log = logging.getLogger("deathstar.client")

#: Buffers smaller than this stay inside the pickle stream: a frame of their own costs more.
OUT_OF_BAND_MIN_BYTES = 64 * 1024


class _Recorder(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle's pickler that also notes the modules the pickle refers to (modules,
    and the modules of functions and classes), so that the local ones can be shipped.
    Scoped to one ``dumps``: cloudpickle's process-wide settings are left alone."""

    def __init__(self, file: Any, modules: set[str], **kw: Any):
        super().__init__(file, **kw)
        self.modules = modules

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, ModuleType):
            self.modules.add(obj.__name__)
        elif isinstance(obj, (FunctionType, type)):
            owner = getattr(obj, "__module__", None)
            if isinstance(owner, str):
                self.modules.add(owner)
        return super().reducer_override(obj)


#: Frames are cut into pieces of at most this many bytes (under the per-frame cap of
#: every deathstar socket, ``config.MAX_MESSAGE_BYTES``).
CHUNK_BYTES = min(config.MAX_MESSAGE_BYTES, 64 * 1024 * 1024)
#: The first bytes of a chunked payload's header frame (a pickle stream never starts so).
_CHUNKED = b"DSCHUNK1"


def dumps(obj: Any, modules: set[str] | None = None) -> list[Any]:
    """Serialize ``obj`` into payload frames (pickle stream + out-of-band buffers), each
    at most ``CHUNK_BYTES`` (larger ones are cut: see the module docstring).
    ``modules``: a set to which the names of the modules the pickle refers to are added.
    Builtin scalars and containers (most inputs) refer to no module: the C pickler takes
    them alone (``_BuiltinsOnly``), without cloudpickle's pickler to set up; anything else
    starts again with cloudpickle."""
    try:
        return chunk(_dumps(obj, pickler=_BuiltinsOnly))
    except _NotBuiltin:
        return chunk(_dumps(obj, modules))


def dumps_sealed(values: list[Any], outputs: list[str] | None = None) -> list[Any]:
    """A worker's results as payload frames, once each value is ``seal``'s output (with
    what each input printed, when captured): everything in them pickles by reference,
    so the standard pickler does, without cloudpickle's Python-level hook on every
    object."""
    return chunk(_dumps(_results(values, outputs), pickler=pickle.Pickler))


def dumps_results(values: list[Any], outputs: list[str] | None = None
                  ) -> tuple[list[Any], bool]:
    """A worker's results (with what each input printed, when captured) as payload
    frames, and whether nothing in them was sealed (the result's ``raw``). Results made
    of builtin scalars and containers only are pickled as they are, in one pass of the C
    pickler (``_BuiltinsOnly``); any other object sends them through ``seal_all`` and
    ``dumps_sealed``. Raises what pickling a value raises."""
    try:
        return chunk(_dumps(_results(values, outputs), pickler=_BuiltinsOnly)), True
    except _NotBuiltin:
        return dumps_sealed(seal_all(values)[0], outputs), False


def _results(values: list[Any], outputs: list[str] | None) -> Any:
    """What a result's payload holds: the values, or the values and their outputs."""
    return values if outputs is None else (values, outputs)


class _NotBuiltin(Exception):
    """``_BuiltinsOnly`` met an object that is not a builtin scalar or container."""


class _BuiltinsOnly(pickle.Pickler):
    """The C pickler, stopped (``_NotBuiltin``) by the first object its own fast paths do
    not take: those are None, bool, int, float, str, bytes, bytearray, and lists,
    tuples, dicts, sets and frozensets, whose unpickling runs no code. It asks
    ``reducer_override`` for everything else, and for nothing of those: a list of 10,000
    ints costs no Python call per item."""

    def reducer_override(self, obj: Any) -> Any:
        raise _NotBuiltin


def _dumps(obj: Any, modules: set[str] | None = None,
           pickler: type[pickle.Pickler] | None = None) -> list[Any]:
    """The pickle stream and out-of-band buffers of ``obj``: by cloudpickle (noting the
    modules it refers to in ``modules``), or by ``pickler``, a standard pickler class."""
    buffers: list[Any] = []

    def keep_large(buf: pickle.PickleBuffer) -> bool:
        view = buf.raw()
        if view.nbytes < OUT_OF_BAND_MIN_BYTES:
            return True  # true means: serialize this one in-band
        buffers.append(view)
        return False

    if pickler is not None:
        out = io.BytesIO()
        pickler(out, protocol=5, buffer_callback=keep_large).dump(obj)
        stream = out.getvalue()
    elif modules is None:
        stream = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep_large)
    else:
        out = io.BytesIO()
        _Recorder(out, modules, protocol=5, buffer_callback=keep_large).dump(obj)
        stream = out.getvalue()
    return [stream, *buffers]


def loads(frames: list[Any], shared: Sequence[int] = (),
          kept: list[Kept] | None = None) -> Any:
    """Deserialize payload frames made by ``dumps`` (``shared``: the indices of frames that
    are ``SharedFolder`` paths rather than buffers; with ``kept``, their files stay and
    their maps are added to it, for ``shm.give_back``, else the files are removed).

    Out-of-band buffers are copied into writable memory so that arrays the user receives
    can be modified in place, as they can with multiprocessing; shared ones are mapped
    copy-on-write, which gives the same without a copy.
    """
    if not frames:
        raise SerializationError("empty payload")
    if shared and kept is not None:
        frames = list(frames)
        for k in shared:
            path, frames[k] = map_kept(frames[k])
            kept.append((k, path, frames[k]))
    elif shared:
        frames = [map_shared(f) if k in shared else f for k, f in enumerate(frames)]
    if bytes(memoryview(frames[0])[:len(_CHUNKED)]) == _CHUNKED:
        frames = _join(frames)  # copies into writable memory, as below
    else:
        frames = [frames[0], *(f if isinstance(f, (bytearray, mmap.mmap)) else bytearray(f)
                               for f in frames[1:])]
    return pickle.loads(memoryview(frames[0]), buffers=frames[1:])


def chunk(frames: list[Any], limit: int | None = None) -> list[Any]:
    """``frames`` as they are when none is over ``limit`` (default ``CHUNK_BYTES``); else a
    header frame (``_CHUNKED`` + how many pieces make each frame) and the pieces."""
    limit = limit or CHUNK_BYTES
    views = [memoryview(f).cast("B") for f in frames]
    if all(v.nbytes <= limit for v in views):
        return frames
    counts: list[int] = []
    pieces: list[Any] = []
    for view in views:
        cut = [view[i:i + limit] for i in range(0, view.nbytes, limit)] or [view]
        counts.append(len(cut))
        pieces += cut
    return [_CHUNKED + pickle.dumps(counts, protocol=5), *pieces]


def _join(frames: list[Any]) -> list[Any]:
    """The frames a chunked payload was cut from, each joined into one bytearray."""
    counts = pickle.loads(memoryview(frames[0])[len(_CHUNKED):])
    if not isinstance(counts, list) or not all(isinstance(c, int) and c > 0 for c in counts) \
            or sum(counts) != len(frames) - 1:
        raise SerializationError("a chunked payload whose header does not match its frames")
    joined: list[Any] = []
    k = 1
    for count in counts:
        parts = [memoryview(f).cast("B") for f in frames[k:k + count]]
        size = sum(p.nbytes for p in parts)
        # anonymous memory: not zeroed first (the OS gives zero pages as they are touched)
        whole: Any = mmap.mmap(-1, size) if size else bytearray()
        at = 0
        for part in parts:
            for i in range(0, part.nbytes, _COPY_STEP):  # the GIL is let go between steps
                piece = part[i:i + _COPY_STEP]
                whole[at:at + piece.nbytes] = piece
                at += piece.nbytes
        joined.append(whole)
        k += count
    return joined


#: Bytes copied at a time when joining pieces: other threads (a worker's heartbeats, the
#: client's I/O thread) run between two copies.
_COPY_STEP = 8 * 1024 * 1024


class Deferred:
    """An object pickled on its own, inside another pickle, and unpickled only when
    ``load`` is called: what unpickling it runs (imports of shipped modules, a class's
    ``__setstate__`` raising ``SystemExit``) happens then, where the caller can catch it.
    Its large buffers stay out-of-band in the enclosing pickle."""

    __slots__ = ("frames",)

    def __init__(self, frames: list[Any]):
        self.frames = frames  # the inner pickle stream, then its buffers (never chunked)

    def __reduce__(self) -> Any:
        stream, *buffers = self.frames
        return (_deferred, (stream, *[pickle.PickleBuffer(b) for b in buffers]))

    def load(self) -> Any:
        """The object (raises whatever its unpickling raises)."""
        stream, *buffers = self.frames
        return pickle.loads(stream, buffers=buffers)


def _deferred(stream: bytes, *buffers: Any) -> Deferred:
    return Deferred([stream, *buffers])


def seal(value: Any) -> Any:
    """``value`` ready to go in a list of results whose items are unpickled one by one
    (``unseal``): a value whose unpickling runs no code of the user's (``_bare``) as it
    is, anything else as a ``Deferred``. Raises what pickling ``value`` raises."""
    return value if _bare(value) else Deferred(_dumps(value))


def unseal(value: Any) -> Any:
    """The value ``seal`` wrapped (raises what its unpickling raises)."""
    return value.load() if isinstance(value, Deferred) else value


def seal_all(values: list[Any]) -> tuple[list[Any], bool]:
    """``seal`` of every value, in one pass, and whether every value is a plain scalar
    (then the list is ``values`` itself, and ``unseal_all`` need not look at it). Raises
    what the first value that fails raises."""
    types = set(map(type, values))
    if types <= _PLAIN_OR_NONE:
        return values, True
    if all(map(_bare_type, types)):  # numpy's scalars, say: nothing to seal
        return values, False
    return [v if _bare(v) else Deferred(_dumps(v)) for v in values], False


def unseal_all(values: list[Any]) -> list[Any]:
    """``unseal`` of every value, in one pass; raises what the first that fails raises."""
    return [v.load() if type(v) is Deferred else v for v in values]


_PLAIN = frozenset({int, float, bool, str, bytes, complex})
_PLAIN_OR_NONE = _PLAIN | {type(None)}
#: Whether a type's values unpickle without running user code (``_bare_type``), by type.
_BARE_TYPES: dict[type, bool] = {}
_BARE_TYPES_KEPT = 1024  # a program that makes classes on the fly does not grow it


def _bare(value: Any) -> bool:
    """Whether ``value`` may travel inside its message's one pickle instead of sealed on
    its own: unpickling it at the client runs no code of the user's, so it cannot fail
    by itself (and a value that does runs, when sealed, where its own input can take the
    blame). So: plain scalars and None, numpy's numeric scalars, numpy arrays (not
    subclasses) of a dtype without objects, and tuples, lists and dicts whose items are
    such scalars. Costs a type lookup per item of a container (a set of their types)."""
    kind = type(value)
    if kind in _PLAIN_OR_NONE:
        return True
    if kind is tuple or kind is list:
        return all(map(_bare_type, set(map(type, value))))
    if kind is dict:
        return all(map(_bare_type, {*map(type, value), *map(type, value.values())}))
    numpy = sys.modules.get("numpy")
    if numpy is not None and kind is numpy.ndarray:
        return not value.dtype.hasobject
    return _bare_type(kind)


def _bare_type(kind: type) -> bool:
    """A plain scalar's type, None's, or one of numpy's numeric scalar types (numpy is
    imported wherever one of its values exists)."""
    known = _BARE_TYPES.get(kind)
    if known is None:
        numpy = sys.modules.get("numpy")
        known = kind in _PLAIN_OR_NONE or (
            numpy is not None and kind.__module__ == "numpy"
            and issubclass(kind, (numpy.number, numpy.bool_)))
        if len(_BARE_TYPES) < _BARE_TYPES_KEPT:
            _BARE_TYPES[kind] = known
    return known


def payload_size(frames: Iterable[Any]) -> int:
    """Total bytes of payload frames."""
    total = 0
    for f in frames:  # (a loop: this runs for every message)
        total += len(f) if type(f) is bytes else memoryview(f).nbytes
    return total


def content_hash(frames: Iterable[Any]) -> str:
    """A short, collision-resistant name for a payload's content."""
    digest = hashlib.blake2b(digest_size=16)
    for frame in frames:
        view = memoryview(frame if isinstance(frame, bytes) else frame).cast("B")
        digest.update(len(view).to_bytes(8, "little"))
        digest.update(view)
    return digest.hexdigest()


def dumps_function(fn: Any, common: dict[str, Any], modules: Iterable[str] = (),
                   init: tuple[str, Any, tuple[Any, ...]] | None = None) -> list[Any]:
    """Serialize a map's function with its common keyword arguments into a function blob:
    the local modules they refer to (plus ``modules``) as source, then ``(fn, common,
    init)``; ``init`` is an executor's (token, initializer, initargs), run once per worker
    process before the first call.

    Raises ``SerializationError`` naming the function or the common argument that cannot
    be pickled, and why, or the module that cannot be shipped.
    """
    inner, bundle, _ = pickle_function(fn, common, modules, init)
    return function_blob(inner, bundle)


def pickle_function(fn: Any, common: dict[str, Any], modules: Iterable[str] = (),
                    init: tuple[str, Any, tuple[Any, ...]] | None = None
                    ) -> tuple[list[Any], Bundle | None, set[str]]:
    """The halves of ``dumps_function``: ``(fn, common, init)`` pickled, and the bundle
    of the modules it needs (a caller that sees both unchanged may keep its blob); and
    the names of every module the pickle refers to (with ``modules``)."""
    names = set(modules)
    try:
        inner = _dumps((fn, common, init), names)
    except Exception as exc:
        raise _culprit(fn, common, exc) from exc
    try:
        return inner, bundle_for(names), names
    except ShippingError as exc:
        raise SerializationError(str(exc)) from None


def pickles_by_name(fn: Any) -> bool:
    """Whether ``fn`` is a plain function that pickles as a reference (``by_reference``),
    the same bytes every time."""
    return isinstance(fn, FunctionType) and by_reference(fn)


def by_reference(obj: Any) -> bool:
    """Whether a function or class pickles as a reference (module, name): its module, not
    ``__main__`` nor registered with cloudpickle to go by value, holds it under its own
    qualified name."""
    name = getattr(obj, "__qualname__", None)
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    if not isinstance(name, str) or "<locals>" in name or module is None \
            or module.__name__ == "__main__" or registered_by_value(module):
        return False
    found: Any = module
    for part in name.split("."):
        found = getattr(found, part, None)
    return found is obj


def registered_by_value(module: ModuleType) -> bool:
    """Whether cloudpickle was told to pickle ``module`` by value (where it cannot say,
    yes: nothing is taken for a reference then)."""
    try:  # (private)
        return bool(cloudpickle.cloudpickle._is_registered_pickle_by_value(module))
    except AttributeError:
        return True


def function_blob(inner: list[Any], bundle: Bundle | None) -> list[Any]:
    """A function blob from ``pickle_function``'s halves."""
    return dumps((bundle, Deferred(inner)))


def loads_function(frames: list[Any]) -> tuple[Bundle | None, Deferred]:
    """A function blob's modules and its still-pickled ``(fn, common)``."""
    bundle, deferred = loads(frames)
    if not isinstance(deferred, Deferred) or not (bundle is None or isinstance(bundle, Bundle)):
        raise SerializationError("not a function blob")
    return bundle, deferred


def _culprit(fn: Any, common: dict[str, Any], first: BaseException) -> SerializationError:
    name = getattr(fn, "__qualname__", None) or repr(fn)
    culprits: list[tuple[str, Any]] = [(f"the function {name}", fn)]
    culprits += [(f"the common argument {key!r} ({type(v).__name__})", v)
                 for key, v in common.items()]
    for what, obj in culprits:
        try:
            dumps(obj)
        except Exception as exc:
            return SerializationError(f"{what} cannot be pickled: {type(exc).__name__}: {exc}")
    return SerializationError(f"the function {name} and its common arguments cannot be "
                              f"pickled: {type(first).__name__}: {first}")
