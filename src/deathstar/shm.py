"""Large buffers through shared memory, to and from a process on this machine: each
buffer a file in a private /dev/shm folder (``SharedFolder``), written once by the sender
and mapped copy-on-write by the receiver (``map_shared``), which removes it. A worker
instead keeps the files of a task's inputs while it runs (``map_kept``) and gives back
those it no longer maps (``give_back``): the client writes its next inputs into them,
over pages /dev/shm already holds, which is much faster than into new files. A peer may
name only files in a deathstar folder of /dev/shm that this user owns and no one else may
write; a node proves it shares this memory by reading a probe file (``prove_shared``)."""

from __future__ import annotations

import hashlib
import itertools
import logging
import mmap
import os
import shutil
import stat
import tempfile
from typing import Any, Iterable, Sequence

from deathstar import scratch
from deathstar.errors import SerializationError

log = logging.getLogger("deathstar.client")

#: Out-of-band buffers at least this large go to a node on this machine through a file in
#: /dev/shm: written once by the client, mapped by the worker.
SHARED_MIN_BYTES = 1 << 20
SHARED_ROOT = "/dev/shm"
#: Files a client keeps to write again once their worker gave them back, at most (their
#: bytes and their number); past either, a file given back is removed.
FREE_MAX_BYTES = 256 << 20
FREE_MAX_FILES = 64
#: Seconds without a buffer written after which an idle client removes those files.
FREE_IDLE_S = 10.0
_SHARED_PREFIX = scratch.PREFIX
_FILE_NUMBERS = itertools.count()


class SharedFolder:
    """A private folder (0700) in /dev/shm for large buffers sent to a process on this
    machine: each buffer one file, which the receiver unlinks once it has mapped it, or
    (a worker's inputs) gives back when it maps it no more: ``recycle`` keeps those, and
    the next buffer of the same size is written into one of them. A client makes one for
    its inputs to workers; its workers write their large results into the same folder
    (``into``), so every file lives no longer than the client. ``release`` removes files
    (a task answered, cancelled or lost), ``close`` the folder if this object made it.
    Used from one thread."""

    def __init__(self, into: str | None = None) -> None:
        self.path: str | None = into
        self.owned = into is None
        self.count = 0  # buffers written
        self.reused = 0  # of them, into a file a worker gave back
        self.warned = False
        self.free: dict[int, list[str]] = {}  # files given back, by size
        self.free_bytes = 0

    def folder(self) -> str:
        """The folder's path, made on first use (after removing the folders of this
        user's processes that died without removing theirs: ``sweep_dead``)."""
        if self.path is None:
            stamp = scratch.own_stamp()
            if stamp is not None:
                sweep_dead()
            self.path = tempfile.mkdtemp(
                prefix=_SHARED_PREFIX if stamp is None else f"{_SHARED_PREFIX}{stamp}-",
                dir=SHARED_ROOT)
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
        self.count += 1
        path = self._reopen(view.nbytes)
        if path is not None:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
                self.reused += 1
            except OSError:
                self.release([path])
                path = None
        if path is None:
            # unique across the processes that write into one folder
            path = os.path.join(self.folder(), f"{os.getpid()}-{next(_FILE_NUMBERS)}")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            done = 0
            while done < view.nbytes:
                done += os.pwrite(fd, view[done:], done)
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return path

    def _reopen(self, size: int) -> str | None:
        """A file given back of exactly ``size`` bytes (still this user's regular file),
        taken off the free list; None when there is none."""
        files = self.free.get(size)
        while files:
            path = files.pop()
            self.free_bytes -= size
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_size == size:
                return path
            self.release([path])
        return None

    def free_files(self) -> list[str]:
        """The files given back and kept to be written again."""
        return [path for files in self.free.values() for path in files]

    def drop_free(self) -> None:
        """Remove the files given back (the client is idle: /dev/shm is memory)."""
        self.release(self.free_files())
        self.free.clear()
        self.free_bytes = 0

    def recycle(self, paths: Iterable[str]) -> None:
        """Files of ours a worker has given back (it maps them no more): kept to write
        again, within FREE_MAX_BYTES and FREE_MAX_FILES; the others are removed."""
        for path in paths:
            try:
                size = os.lstat(path).st_size
            except OSError:
                continue
            kept = sum(len(files) for files in self.free.values())
            if size and self.free_bytes + size <= FREE_MAX_BYTES and kept < FREE_MAX_FILES:
                self.free.setdefault(size, []).append(path)
                self.free_bytes += size
            else:
                self.release([path])

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


def sweep_dead() -> list[str]:
    """Remove this user's deathstar folders of /dev/shm whose process (named in the
    folder's stamp, in this pid namespace) is gone: a client killed with ``kill -9``
    leaves its buffers there, and /dev/shm is memory. A folder of a live process, of
    another pid namespace, of another user or without a stamp is left alone. Returns
    the folders removed."""
    return scratch.sweep_dead(SHARED_ROOT, _stamp_in_name)


def _stamp_in_name(name: str, folder: str) -> str | None:
    """The stamp a /dev/shm folder's name carries (``deathstar-NS-PID-START-xxxx``)."""
    parts = name[len(_SHARED_PREFIX):].split("-")  # ns, pid, start, mkdtemp's letters
    return "-".join(parts[:3]) if len(parts) == 4 else None


def _is_shared_folder(folder: str) -> bool:
    """Whether a real path is a deathstar folder of /dev/shm that this user owns and no one
    else may write: the only place a peer may make us open, write or remove files."""
    if os.path.dirname(folder) != SHARED_ROOT or \
            not os.path.basename(folder).startswith(_SHARED_PREFIX):
        return False
    return scratch.is_private_folder(folder)


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
    path, mapped = map_kept(frame)
    try:
        os.unlink(path)
    except OSError:
        pass
    return mapped


#: A task's input file a worker maps: the payload frame that named it, its path, the map.
Kept = tuple[int, str, Any]


def map_kept(frame: Any) -> tuple[str, Any]:
    """``map_shared`` without removing the file: its path and the map (see
    ``give_back``)."""
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
    return path, mapped


def give_back(kept: Sequence[Kept]) -> list[int]:
    """After a task: close the maps of its input files that nothing refers to any more,
    and return their frames' indices (their files stay, for the client to write again);
    a file whose buffer is still in use (an input kept by the function, a result that is
    a view of it) is removed instead, its map living on as long as it is used."""
    given: list[int] = []
    for index, path, mapped in kept:
        if isinstance(mapped, mmap.mmap):
            try:
                mapped.close()
            except BufferError:  # still viewed: the file must never be written again
                try:
                    os.unlink(path)
                except OSError:
                    pass
                continue
        given.append(index)
    return given
