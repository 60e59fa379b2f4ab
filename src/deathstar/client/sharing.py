"""The client's side of shared memory with its nodes (``MemoryLink``): its private
``/dev/shm`` folder, the probe every node is asked to read (a node that can, as its own,
shares this machine's memory with us), the files of each sent task until its worker
took them, and those workers gave back, to write again (until the client is idle). Used
from the client's I/O thread only."""

from __future__ import annotations

import time
from typing import Any, Iterable

from deathstar import protocol, shm


class MemoryLink:
    """Large buffers to and from the nodes that proved they read our ``/dev/shm``.

    ``folder`` is None where /dev/shm cannot be used: then every buffer goes through the
    sockets and no node is asked for a proof."""

    def __init__(self) -> None:
        self.folder = shm.SharedFolder() if shm.SharedFolder.available() else None
        self.probe: tuple[str, str] | None = None  # (the file, the proof that answers it)
        if self.folder is not None:
            try:
                self.probe = self.folder.probe()
            except OSError:
                self.folder = None  # /dev/shm cannot take a file: sockets carry everything
        # send id -> the frames of its payload that are files, and those files
        self.files: dict[int, tuple[list[int], list[str]]] = {}
        self.last_write = 0.0  # when a task last had a buffer written (time.monotonic)

    def probe_path(self) -> str | None:
        """What a hello names for the node to read."""
        return None if self.probe is None else self.probe[0]

    def proved_by(self, welcome: protocol.Message) -> bool:
        """Whether a node's welcome answers our probe: it shares our memory."""
        return self.probe is not None and welcome.env.get(protocol.F_PROOF) == self.probe[1]

    def share(self, send_id: int, payload: list[Any]) -> tuple[list[Any], dict[str, Any]]:
        """A task's payload with its large buffers written to files, and the envelope
        fields that say so (``shm``; ``rshm``, the folder its worker may write large
        results into). Kept until ``release``."""
        assert self.folder is not None
        payload, indices, paths = self.folder.share(payload)
        if paths:
            self.files[send_id] = (indices, paths)
            self.last_write = time.monotonic()
        return payload, {protocol.F_SHM: indices, protocol.F_RSHM: self.folder.folder()}

    def release(self, send_id: int, given_back: Iterable[int] = ()) -> None:
        """A sent task is answered, lost or dropped: the files of its frames that its
        worker gave back (``given_back``, a result's ``free``) are kept to write again,
        the others are removed (if the worker did not)."""
        files = self.files.pop(send_id, None)
        if not files:
            return
        assert self.folder is not None
        back = set(given_back)
        self.folder.recycle(p for k, p in zip(*files) if k in back)
        shm.SharedFolder.release(p for k, p in zip(*files) if k not in back)

    def trim(self, now: float) -> None:
        """With no job running: remove the files workers gave back once none was written
        for ``shm.FREE_IDLE_S`` (an idle client holds no /dev/shm memory)."""
        if self.folder is not None and self.folder.free and \
                now - self.last_write >= shm.FREE_IDLE_S:
            self.folder.drop_free()

    def close(self) -> None:
        if self.folder is not None:
            self.folder.close()
