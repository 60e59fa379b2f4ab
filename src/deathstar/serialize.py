"""Payloads: cloudpickle protocol 5 with large buffers out-of-band, content hashes, and
shipping the user's own modules by value.

A payload is a list of frames: the pickle stream first, then one frame per out-of-band
buffer (a numpy array's memory travels as its own ZeroMQ frame, never copied into the
pickle stream). To a node on this machine (the embedded one), a large buffer frame may be
replaced by the path of a file in a private /dev/shm folder holding it (``SharedFolder``):
one copy instead of four through the sockets; the worker maps it (``map_shared``).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import mmap
import os
import pickle
import shutil
import stat
import sys
import sysconfig
import tempfile
from types import ModuleType
from typing import Any, Iterable, Sequence

import cloudpickle

log = logging.getLogger("deathstar.client")

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


def loads(frames: list[Any], shared: Sequence[int] = ()) -> Any:
    """Deserialize payload frames made by ``dumps`` (``shared``: the indices of frames that
    are ``SharedFolder`` paths rather than buffers).

    Out-of-band buffers are copied into writable memory so that arrays the user receives
    can be modified in place, as they can with multiprocessing; shared ones are mapped
    copy-on-write, which gives the same without a copy.
    """
    if not frames:
        raise SerializationError("empty payload")
    buffers = [map_shared(f) if k in shared else bytearray(f)
               for k, f in enumerate(frames[1:], 1)]
    return pickle.loads(memoryview(frames[0]), buffers=buffers)


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
