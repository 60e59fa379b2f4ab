"""Payloads: cloudpickle protocol 5 with large buffers out-of-band, content hashes, and
function blobs that carry the user's own modules as source.

A payload is a list of frames: the pickle stream first, then one frame per out-of-band
buffer (a numpy array's memory travels as its own ZeroMQ frame, never copied into the
pickle stream). To a node on this machine (the embedded one), a large buffer frame may be
replaced by the path of a file in a private /dev/shm folder holding it (``SharedFolder``):
one copy instead of four through the sockets; the worker maps it (``map_shared``).

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
import itertools
import logging
import mmap
import os
import pickle
import shutil
import stat
import sys
import tempfile
from types import FunctionType, ModuleType
from typing import Any, Iterable, Sequence

import cloudpickle

from deathstar import config
from deathstar.shipping import Bundle, ShippingError, bundle_for

__all__ = ["Bundle", "Deferred", "SerializationError", "SharedFolder", "ShippingError",
           "bundle_for", "chunk", "content_hash", "dumps", "dumps_function",
           "function_blob", "loads", "loads_function", "payload_size", "pickle_function",
           "pickles_by_name", "seal", "unseal"]

log = logging.getLogger("deathstar.client")

#: Buffers smaller than this stay inside the pickle stream: a frame of their own costs more.
OUT_OF_BAND_MIN_BYTES = 64 * 1024


class SerializationError(pickle.PicklingError):
    """Something the user handed over cannot be pickled (or unpickled); the message names
    it. A ``pickle.PicklingError``, as the stdlib's executors raise."""


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
    ``modules``: a set to which the names of the modules the pickle refers to are added."""
    return chunk(_dumps(obj, modules))


def _dumps(obj: Any, modules: set[str] | None = None) -> list[Any]:
    buffers: list[Any] = []

    def keep_large(buf: pickle.PickleBuffer) -> bool:
        view = buf.raw()
        if view.nbytes < OUT_OF_BAND_MIN_BYTES:
            return True  # true means: serialize this one in-band
        buffers.append(view)
        return False

    if modules is None:
        stream = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep_large)
    else:
        out = io.BytesIO()
        _Recorder(out, modules, protocol=5, buffer_callback=keep_large).dump(obj)
        stream = out.getvalue()
    return [stream, *buffers]


def loads(frames: list[Any], shared: Sequence[int] = ()) -> Any:
    """Deserialize payload frames made by ``dumps`` (``shared``: the indices of frames that
    are ``SharedFolder`` paths rather than buffers).

    Out-of-band buffers are copied into writable memory so that arrays the user receives
    can be modified in place, as they can with multiprocessing; shared ones are mapped
    copy-on-write, which gives the same without a copy.
    """
    if not frames:
        raise SerializationError("empty payload")
    if shared:
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
    (``unseal``): plain scalars as they are, anything else as a ``Deferred``. Raises
    what pickling ``value`` raises."""
    if value is None or type(value) in _PLAIN:
        return value
    return Deferred(_dumps(value))


def unseal(value: Any) -> Any:
    """The value ``seal`` wrapped (raises what its unpickling raises)."""
    return value.load() if isinstance(value, Deferred) else value


def seal_all(values: list[Any]) -> tuple[list[Any], bool]:
    """``seal`` of every value, in one pass, and whether every value is a plain scalar
    (then the list is ``values`` itself, and ``unseal_all`` need not look at it). Raises
    what the first value that fails raises."""
    if set(map(type, values)) <= _PLAIN_OR_NONE:
        return values, True
    plain = _PLAIN
    return [v if v is None or type(v) in plain else Deferred(_dumps(v)) for v in values], False


def unseal_all(values: list[Any]) -> list[Any]:
    """``unseal`` of every value, in one pass; raises what the first that fails raises."""
    return [v.load() if type(v) is Deferred else v for v in values]


_PLAIN = frozenset({int, float, bool, str, bytes, complex})
_PLAIN_OR_NONE = _PLAIN | {type(None)}


# ------------------------------------------------------------------ shared memory

#: Out-of-band buffers at least this large go to a node on this machine through a file in
#: /dev/shm: written once by the client, mapped by the worker.
SHARED_MIN_BYTES = 1 << 20
SHARED_ROOT = "/dev/shm"
_SHARED_PREFIX = "deathstar-"
_FILE_NUMBERS = itertools.count()


class SharedFolder:
    """A private folder (0700) in /dev/shm for large buffers sent to a process on this
    machine: each buffer one file, which the receiver unlinks once it has mapped it.
    A client makes one for its inputs to workers; its workers write their large results
    into the same folder (``into``), so every file lives no longer than the client.
    ``release`` removes files never taken (the task was cancelled or lost), ``close`` the
    folder if this object made it. Used from one thread."""

    def __init__(self, into: str | None = None) -> None:
        self.path: str | None = into
        self.owned = into is None
        self.count = 0  # files written
        self.warned = False

    def folder(self) -> str:
        """The folder's path, made on first use."""
        if self.path is None:
            self.path = tempfile.mkdtemp(prefix=_SHARED_PREFIX, dir=SHARED_ROOT)
        return self.path

    @staticmethod
    def available() -> bool:
        return os.path.isdir(SHARED_ROOT) and os.access(SHARED_ROOT, os.W_OK)

    def share(self, frames: list[Any]) -> tuple[list[Any], list[int], list[str]]:
        """``frames`` with each large buffer written to a file and replaced by its path:
        (the frames to send, the indices replaced, the files made). When /dev/shm cannot
        take them (full, gone), ``frames`` as they are: they go through the socket."""
        out: list[Any] = [frames[0]]
        indices: list[int] = []
        paths: list[str] = []
        try:
            for k, frame in enumerate(frames[1:], 1):
                view = memoryview(frame).cast("B")
                if view.nbytes < SHARED_MIN_BYTES:
                    out.append(frame)
                    continue
                path = self._write(view)
                out.append(path.encode())
                indices.append(k)
                paths.append(path)
        except OSError as exc:
            self.release(paths)
            if not self.warned:
                self.warned = True
                log.warning("shared memory unavailable (%s): large buffers go through the "
                            "sockets", exc)
            return frames, [], []
        return out, indices, paths

    def _write(self, view: memoryview) -> str:
        # unique across the processes that write into one folder
        path = os.path.join(self.folder(), f"{os.getpid()}-{next(_FILE_NUMBERS)}")
        self.count += 1
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            done = 0
            while done < view.nbytes:
                done += os.write(fd, view[done:])
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return path

    def probe(self) -> tuple[str, str]:
        """A file in the folder with a random token, and the proof a process that can read
        it answers with (``prove_shared``): a node that answers it shares this machine's
        /dev/shm with us, whatever its address says."""
        token = os.urandom(16)
        path = self._write(memoryview(token))
        return path, hashlib.blake2b(token, digest_size=16).hexdigest()

    @staticmethod
    def release(paths: Iterable[str]) -> None:
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass  # the worker took it

    def close(self) -> None:
        if self.path is not None and self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


def _is_shared_folder(folder: str) -> bool:
    """Whether a real path is a deathstar folder of /dev/shm that this user owns and no one
    else may write: the only place a peer may make us open, write or remove files."""
    if os.path.dirname(folder) != SHARED_ROOT or \
            not os.path.basename(folder).startswith(_SHARED_PREFIX):
        return False
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def shared_folder(path: Any) -> str | None:
    """``path`` if it names an existing deathstar folder of /dev/shm, else None."""
    if not isinstance(path, str) or "\0" in path:
        return None
    real = os.path.realpath(path)
    return real if _is_shared_folder(real) else None


def _shared_path(frame: Any) -> str:
    """The file a shared frame names; SerializationError unless it is in a deathstar
    folder of /dev/shm."""
    name = bytes(frame).decode(errors="replace")
    if "\0" in name:
        raise SerializationError(f"{name!r} is not a file name")
    # the folder resolved, the file itself not: it is opened with O_NOFOLLOW
    path = os.path.join(os.path.realpath(os.path.dirname(name)), os.path.basename(name))
    if not _is_shared_folder(os.path.dirname(path)):
        raise SerializationError(f"{path!r} is not a deathstar shared-memory file")
    return path


def prove_shared(probe: Any) -> str | None:
    """The proof for a client's ``SharedFolder.probe`` file, when this process can read
    it as its own (same /dev/shm, same user); else None. Only a small regular file in a
    deathstar folder of /dev/shm is read."""
    try:
        path = _shared_path(str(probe).encode())
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except (SerializationError, OSError):
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode) or st.st_size > 64:
            return None
        return hashlib.blake2b(os.read(fd, 64), digest_size=16).hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


def discard_shared(frames: list[Any], shared: Sequence[int]) -> None:
    """Remove the files of a payload that will not be read (a late or cancelled result)."""
    for k in shared:
        try:
            os.unlink(_shared_path(frames[k]))
        except (SerializationError, OSError):
            pass


def map_shared(frame: Any) -> Any:
    """Map a ``SharedFolder`` file named by ``frame`` copy-on-write (writes stay in this
    process) and unlink it. Only files in a deathstar folder of /dev/shm are opened;
    anything else raises SerializationError."""
    path = _shared_path(frame)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SerializationError(f"shared buffer {path} cannot be opened: {exc}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
            raise SerializationError(f"shared buffer {path} is not this user's file")
        size = st.st_size
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else bytearray()
    finally:
        os.close(fd)
    try:
        os.unlink(path)
    except OSError:
        pass
    return mapped


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
    """Whether ``fn`` is a plain function its module holds under its own name, outside
    ``__main__``, in a module not registered with cloudpickle to go by value: it pickles
    as a reference (module, name), the same bytes every time."""
    if not isinstance(fn, FunctionType) or "<locals>" in fn.__qualname__:
        return False
    module = sys.modules.get(fn.__module__)
    if module is None or fn.__module__ == "__main__":
        return False
    found: Any = module
    for part in fn.__qualname__.split("."):
        found = getattr(found, part, None)
    if found is not fn:
        return False
    try:  # (private; where it is missing, nothing is taken for a reference)
        by_value: bool = cloudpickle.cloudpickle._is_registered_pickle_by_value(
            module)
    except AttributeError:
        return False
    return not by_value


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
