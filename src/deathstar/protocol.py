"""The wire format: the one place that knows what a message looks like.

Every message is a ZeroMQ multipart message::

    frame 0      envelope: a msgpack map {"v": protocol version, "t": type, ...fields}
    frame 1..n   payload: opaque bytes (cloudpickle protocol 5 and its out-of-band
                 buffers); the envelope's "nb" says how many there are

A ROUTER socket adds the peer's identity frame in front; ``split_identity`` takes it off.
Brokers and clients read envelopes only; payload frames pass through them untouched.

Links and their messages (request -> reply):

    client -> daemon exec port     hello -> welcome | refused;  blob;  task -> result | lost
                                   heartbeat (both ways);  cancel;  bye
    worker -> daemon worker port   ready -> welcome | refused;  task (daemon -> worker)
                                   -> result;  fetch -> blob | missing;  heartbeat;  stop
    anyone -> daemon status port   status -> status

A task envelope may carry ``est``, the client's estimate of the seconds the message will
run: the daemon lets a worker hold a second message behind a short one; ``shm``, the
payload frames that name shared-memory files (the embedded daemon's workers only); and
``rshm``, the client's shared-memory folder, where the worker may put large results (a
result's ``shm`` then names them).

A result says how each of its inputs went in two byte strings (built and read by
``outcome_fields`` and ``result_outcomes``), so that a result of thousands of inputs is
two fields to decode, not thousands of list items: ``ok``, one byte per input (1 ran, 0
raised), and ``ts``, each input's start and end (seconds since the epoch) as
little-endian float64 pairs.

Every envelope is validated against ``SCHEMA`` before use; a message that fails is a
``ProtocolError`` for the receiver to log and drop. Nothing here unpickles.
"""

from __future__ import annotations

import platform
import sys
from array import array
from dataclasses import dataclass
from typing import Any, Final, Sequence

import cloudpickle
import msgpack

from deathstar._version import __version__

PROTOCOL_VERSION: Final = 2

# Message types.
HELLO: Final = "hello"
WELCOME: Final = "welcome"
REFUSED: Final = "refused"
READY: Final = "ready"
BLOB: Final = "blob"
FETCH: Final = "fetch"
MISSING: Final = "missing"
TASK: Final = "task"
RESULT: Final = "result"
LOST: Final = "lost"
CANCEL: Final = "cancel"
HEARTBEAT: Final = "hb"
BYE: Final = "bye"
STOP: Final = "stop"
STATUS: Final = "status"

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_LIST = (list,)

#: Required fields per message type with the types they must have. Fields not listed are
#: allowed (a newer minor peer may add some) but never read.
SCHEMA: Final[dict[str, dict[str, tuple[type, ...]]]] = {
    HELLO: {"versions": (dict,), "hb": _NUM},
    WELCOME: {"versions": (dict,), "hb": _NUM, "node": (str,), "workers": (int,)},
    REFUSED: {"reason": (str,)},
    READY: {"versions": (dict,), "hb": _NUM, "worker": (str,), "pid": (int,)},
    BLOB: {"h": (str,), "nb": (int,)},
    FETCH: {"h": (str,)},
    MISSING: {"h": (str,)},
    TASK: {"id": (int,), "fn": (str,), "n": (int,), "nb": (int,), "timeout": _OPT_NUM},
    RESULT: {"id": (int,), "worker": (str,), "ok": (bytes,), "ts": (bytes,), "nb": (int,)},
    LOST: {"ids": _LIST, "reason": (str,), "worker": (str,)},
    CANCEL: {"ids": _LIST},
    HEARTBEAT: {},
    BYE: {},
    STOP: {},
    STATUS: {},
}

#: Message types that carry payload frames ("nb" of them).
_WITH_PAYLOAD: Final = frozenset({BLOB, TASK, RESULT})

#: Bounds for decoding an envelope: it is small, so anything large is hostile.
MAX_ENVELOPE_BYTES: Final = 1 << 20
_UNPACK_LIMITS: Final = dict(
    max_str_len=1 << 16,
    max_bin_len=1 << 16,
    max_array_len=1 << 17,
    max_map_len=1 << 10,
    max_ext_len=0,
)
_MAX_HASH_LEN: Final = 128


class ProtocolError(Exception):
    """A message that is not a valid deathstar message; the receiver logs and drops it."""


class VersionMismatch(ProtocolError):
    """A peer speaks another protocol (or runs another Python minor version)."""


@dataclass(slots=True)
class Message:
    """A decoded message: its validated envelope and its payload frames, untouched."""

    env: dict[str, Any]
    payload: list[Any]
    raw: Any = None  # the envelope frame as received, to forward without re-encoding

    @property
    def type(self) -> str:
        return str(self.env["t"])


def pack(msg_type: str, payload: Sequence[Any] = (), **fields: Any) -> list[Any]:
    """Build the frames of one message: the envelope, then the payload frames."""
    env = {"v": PROTOCOL_VERSION, "t": msg_type, **fields}
    if msg_type in _WITH_PAYLOAD:
        env["nb"] = len(payload)
    return [msgpack.packb(env, use_bin_type=True), *payload]


def shared_frames(msg: Message) -> list[int]:
    """A task's or result's optional ``shm``: the payload frames (1-based: 0 is the pickle
    stream) that are paths of shared-memory files rather than buffers. ProtocolError if
    malformed."""
    shared = msg.env.get("shm", [])
    if not isinstance(shared, list) or not all(
            isinstance(k, int) and not isinstance(k, bool) and 0 < k < len(msg.payload)
            for k in shared):
        raise ProtocolError("task message: bad 'shm' frame list")
    return shared


def outcome_fields(oks: Sequence[bool], stamps: Sequence[float]) -> dict[str, bytes]:
    """A result's ``ok`` and ``ts`` fields from each input's success and the flat list
    start0, end0, start1, end1, ... of their times."""
    times = array("d", stamps)
    if sys.byteorder == "big":
        times.byteswap()
    return {"ok": bytes(oks), "ts": times.tobytes()}


def result_outcomes(msg: Message) -> tuple[bytes, Sequence[float], Sequence[float]]:
    """A result's outcomes: one byte per input (nonzero: it ran), the inputs' start times
    and their end times."""
    times = array("d", msg.env["ts"])
    if sys.byteorder == "big":
        times.byteswap()
    return msg.env["ok"], times[0::2], times[1::2]


def task_estimate(env: dict[str, Any]) -> float | None:
    """A task envelope's optional ``est``: the client's estimate of the seconds the message
    will run (None when absent or not a sane number)."""
    est = env.get("est")
    if isinstance(est, (int, float)) and not isinstance(est, bool) and 0 <= est < 1e9:
        return float(est)
    return None


def frame_bytes(frame: Any) -> bytes:
    """The bytes of a frame received with or without ``copy=False``."""
    return frame if isinstance(frame, bytes) else frame.bytes


def split_identity(frames: list[Any]) -> tuple[bytes, list[Any]]:
    """Take the identity frame a ROUTER socket puts first off a message."""
    if len(frames) < 2:
        raise ProtocolError(f"expected an identity and a message, got {len(frames)} frame(s)")
    return frame_bytes(frames[0]), frames[1:]


def decode_envelope(frame: Any) -> dict[str, Any]:
    """Decode and validate an envelope; raise ProtocolError on anything unexpected.

    A peer with another protocol version gets ``VersionMismatch`` naming both versions.
    """
    raw = frame_bytes(frame)
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise ProtocolError(f"envelope of {len(raw)} bytes exceeds {MAX_ENVELOPE_BYTES}")
    try:
        env = msgpack.unpackb(raw, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable envelope ({type(exc).__name__}: {exc})") from None
    if not isinstance(env, dict):
        raise ProtocolError(f"envelope is a {type(env).__name__}, not a map")
    version = env.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError("envelope has no protocol version")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"protocol version mismatch: peer speaks {version}, we speak {PROTOCOL_VERSION}"
        )
    msg_type = env.get("t")
    schema = SCHEMA.get(msg_type) if isinstance(msg_type, str) else None
    if schema is None:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    for field, types in schema.items():
        value = env.get(field, _MISSING)
        if value is _MISSING or not isinstance(value, types) or isinstance(value, bool):
            raise ProtocolError(f"{msg_type} message: field {field!r} missing or mistyped")
    return env


_MISSING: Final = object()


def decode(frames: list[Any]) -> Message:
    """Decode a whole message (identity already split off) and check its frame count."""
    if not frames:
        raise ProtocolError("empty message")
    env = decode_envelope(frames[0])
    payload = frames[1:]
    expected = env.get("nb", 0) if env["t"] in _WITH_PAYLOAD else 0
    if expected < 0 or len(payload) != expected:
        raise ProtocolError(
            f"{env['t']} message declares {expected} payload frame(s), carries {len(payload)}"
        )
    if env["t"] in (BLOB, FETCH, MISSING) and not 0 < len(env["h"]) <= _MAX_HASH_LEN:
        raise ProtocolError(f"{env['t']} message: bad content hash")
    if env["t"] == TASK and not 0 < env["n"] <= 1 << 20:
        raise ProtocolError("task message: bad item count")
    if env["t"] == RESULT and 16 * len(env["ok"]) != len(env["ts"]):
        raise ProtocolError("result message: 'ok' and 'ts' differ in length")
    return Message(env, payload, frames[0])


# ---------------------------------------------------------------- versions


def local_versions() -> dict[str, str]:
    """The versions a peer announces in its first message."""
    return {
        "protocol": str(PROTOCOL_VERSION),
        "deathstar": __version__,
        "python": platform.python_version(),
        "cloudpickle": cloudpickle.__version__,
        "msgpack": ".".join(str(p) for p in msgpack.version),
    }


def compare_versions(ours: dict[str, Any], theirs: dict[str, Any], peer: str) -> list[str]:
    """Check a peer's announced versions against ours.

    Returns warnings (a Python patch or library difference). Raises ``VersionMismatch``,
    naming both sides, when the protocol or the Python minor version differs: pickles are
    not portable across Python minor versions.
    """
    if str(theirs.get("protocol")) != str(ours["protocol"]):
        raise VersionMismatch(
            f"protocol version mismatch: {peer} speaks {theirs.get('protocol')}, "
            f"we speak {ours['protocol']}"
        )
    py_ours, py_theirs = str(ours["python"]), str(theirs.get("python"))
    if py_ours.split(".")[:2] != py_theirs.split(".")[:2]:
        raise VersionMismatch(
            f"Python version mismatch: {peer} runs Python {py_theirs}, we run {py_ours} "
            "(pickles do not move between Python minor versions)"
        )
    warnings = []
    for key in ("python", "deathstar", "cloudpickle", "msgpack"):
        if str(theirs.get(key)) != str(ours[key]):
            warnings.append(f"{peer} runs {key} {theirs.get(key)}, we run {ours[key]}")
    return warnings
