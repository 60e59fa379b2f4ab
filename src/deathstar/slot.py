"""A daemon-started worker's slot file: the id of the task message it last started,
``SLOT_BYTES`` little-endian, written by the worker through a shared mapping (no system
call per task) and read by the daemon when the worker dies, so that the death is charged
to the message it was running. All of its format is here, for both sides.
"""

from __future__ import annotations

import os

__all__ = ["SLOT_BYTES", "make_slot", "read_slot", "slot_value"]

SLOT_BYTES = 8


def slot_value(send_id: int) -> int:
    """How a task message's id is written in a slot (ids are the client's to choose)."""
    return send_id & ((1 << 8 * SLOT_BYTES) - 1)


def make_slot(path: str) -> None:
    """Create an empty slot file (nothing started yet)."""
    with open(path, "wb") as fh:
        fh.write(bytes(SLOT_BYTES))


def read_slot(path: str) -> int | None:
    """The slot value a worker left in ``path`` (None: it started nothing, or the file is
    unreadable); the file is removed."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(SLOT_BYTES)
        os.unlink(path)
    except OSError:
        return None
    if len(raw) != SLOT_BYTES:
        return None
    return int.from_bytes(raw, "little") or None
