"""Private scratch folders in the temporary directory (a daemon's slot files and its
workers' shipped modules, the embedded daemon's ipc sockets, a hand-started worker's
modules), and what removes them when their process could not: a process killed with
``kill -9``, a worker killed at its timeout. Each folder names its process in an
``owner`` file (a *stamp*: pid namespace, pid and start time, which names that process
for as long as it lives and never another one after it); the first folder a process
makes sweeps away this user's folders whose process is gone. The /dev/shm folders of
``shm`` carry the same stamp in their names."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
import threading
from typing import Callable

log = logging.getLogger("deathstar")

#: What every deathstar scratch folder's name starts with.
PREFIX = "deathstar-"
#: The file in a scratch folder that names its process.
OWNER = "owner"

_swept = False  # this process has swept once (``make_folder``)


def pid_namespace() -> str | None:
    """This process's pid namespace, as digits (None when /proc does not say)."""
    try:
        digits = "".join(c for c in os.readlink("/proc/self/ns/pid") if c.isdigit())
    except OSError:
        return None
    return digits or None


def process_stamp(pid: int, namespace: str) -> str | None:
    """The stamp of process ``pid`` of ``namespace`` (ours): ``ns-pid-start``; None when
    /proc does not say (or the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return f"{namespace}-{pid}-{int(fields[19])}" if len(fields) > 19 else None


def own_stamp() -> str | None:
    """This process's stamp (None where /proc does not say: nothing is swept then)."""
    namespace = pid_namespace()
    return None if namespace is None else process_stamp(os.getpid(), namespace)


def stamp_is_dead(stamp: str, namespace: str) -> bool:
    """Whether ``stamp`` names a process of ``namespace`` (ours) that is gone. A stamp of
    another namespace, or that is not one, is never judged dead."""
    parts = stamp.split("-")
    if len(parts) != 3 or parts[0] != namespace or not all(p.isdigit() for p in parts):
        return False
    return process_stamp(int(parts[1]), namespace) != stamp


def is_private_folder(path: str) -> bool:
    """A real folder (no symlink) this user owns and no one else may write."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def make_folder(prefix: str) -> str:
    """A new folder (mode 0700) in the temporary directory whose name starts with
    ``prefix`` (``PREFIX`` first), stamped with this process. The first call in a process
    also starts ``sweep_dead`` in a thread of its own (a temporary directory full of
    folders takes a while to look through; nothing waits for it). Raises OSError when
    the folder cannot be made."""
    global _swept
    if not _swept:
        _swept = True
        threading.Thread(target=sweep_dead, name="deathstar-sweep", daemon=True).start()
    folder = tempfile.mkdtemp(prefix=prefix)
    stamp = own_stamp()
    if stamp is not None:
        with open(os.path.join(folder, OWNER), "x") as fh:
            fh.write(stamp)
    return folder


def sweep_dead(root: str | None = None,
               stamp_of: Callable[[str, str], str | None] | None = None) -> list[str]:
    """Remove this user's deathstar folders in ``root`` (the temporary directory) whose
    process is gone; returns them. ``stamp_of(name, path)`` says which process a folder
    belongs to (default: its owner file). A folder of a live process, of another pid
    namespace, of another user, that others may write, or without a stamp is left
    alone."""
    namespace = pid_namespace()
    root = root or tempfile.gettempdir()
    try:
        names = os.listdir(root) if namespace is not None else []
    except OSError:
        return []
    removed = []
    for name in names:
        folder = os.path.join(root, name)
        if not name.startswith(PREFIX) or not is_private_folder(folder):
            continue
        stamp = (stamp_of or _owner_stamp)(name, folder)
        if stamp is not None and stamp_is_dead(stamp, namespace or ""):
            _remove(folder)
            removed.append(folder)
    if removed:
        log.info("removed %d folders of dead deathstar processes from %s", len(removed), root)
    return removed


def _remove(folder: str) -> None:
    """Remove a folder, its owner file last: cut short (this process ends), what is left
    is still stamped, and the next sweep finishes it."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name == OWNER:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    shutil.rmtree(folder, ignore_errors=True)


def _owner_stamp(name: str, folder: str) -> str | None:
    """The stamp in a folder's owner file (a small regular file), or None."""
    path = os.path.join(folder, OWNER)
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and st.st_size <= 64:
            with open(path) as fh:
                return fh.read().strip()
    return None
