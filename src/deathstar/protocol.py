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
                                   -> result;  fetch -> blob | missing;  heartbeat;  stop;
                                   recall (daemon -> worker) -> lost "unstarted"
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
little-endian float64 pairs, or one pair for the whole message: its inputs (too short to
time one by one) then share its time evenly.

Every envelope is validated against ``SCHEMA`` before use; a message that fails is a
``ProtocolError`` for the receiver to log and drop. Nothing here unpickles.
"""

from __future__ import annotations

import functools
import platform
import sys
from array import array
from dataclasses import dataclass
from typing import Any, Callable, Final, Iterable, Sequence, overload

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
RECALL: Final = "recall"  # daemon -> worker: give these back if you have not started them

# LOST codes: why a node will not answer a task message (the client's reaction differs).
LOST_CRASH: Final = "crash"  # its worker died running it: costs the input an attempt
LOST_TIMEOUT: Final = "timeout"  # it ran past its timeout and its worker was killed
LOST_BLOB: Final = "blob"  # the node lacks its function: send the blob again, no charge
LOST_STOPPING: Final = "stopping"  # the node is draining: send it elsewhere, no charge
LOST_UNSTARTED: Final = "unstarted"  # it waited behind a message whose worker died
LOST_BUSY: Final = "busy"  # the client's queue there is full: back off, no charge
LOST_CODES: Final = frozenset({LOST_CRASH, LOST_TIMEOUT, LOST_BLOB, LOST_STOPPING,
                               LOST_UNSTARTED, LOST_BUSY})

# REFUSED codes (absent: a final refusal, such as a version mismatch).
REFUSED_HELLO: Final = "hello"  # the daemon does not know this peer: say hello/ready first
REFUSED_CODES: Final = frozenset({REFUSED_HELLO})

# Optional envelope fields.
F_CODE: Final = "code"  # lost, refused: one of the codes above
F_SIG: Final = "sig"  # lost: the signal that killed the worker (0: none)
F_SEED: Final = "seed"  # task: workers seed random and numpy with seed + input index
F_IX: Final = "ix"  # task: the inputs' indices (for the seed)
F_CAP: Final = "cap"  # task: capture what each input prints
F_PLAIN: Final = "plain"  # task: the payload lists each input's one argument, not (args, kwargs)
F_EST: Final = "est"  # task: the client's estimate of the seconds the message runs
F_RAW: Final = "raw"  # result: every value is a plain scalar, none pickled on its own
F_SHM: Final = "shm"  # task, result: payload frames that name shared-memory files
F_RSHM: Final = "rshm"  # task: the client's shared-memory folder for large results
F_FREE: Final = "free"  # result: the task's shm frames whose files the worker gave back
F_WORKERS: Final = "workers"  # heartbeat (daemon -> client): the node's capacity now
F_PROBE: Final = "probe"  # hello: a file in the client's shared-memory folder
F_PROOF: Final = "proof"  # welcome: the hash of that file, read here: memory is shared

#: Bounds of envelope values: a field past them makes the message invalid.
MAX_IDS: Final = 1 << 16  # ids in one lost or cancel message
MAX_INT: Final = (1 << 63) - 1
MAX_TEXT: Final = 1 << 12  # reasons, names
_MAX_HASH_LEN: Final = 128


# The checks see what msgpack decodes (exactly int, bool, float, str, bytes, list, dict,
# None): a type test is exact, and cheaper than isinstance (a bool is no int here).

def _int(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_INT


def _num(value: Any) -> bool:
    return (type(value) is float or type(value) is int) and 0 <= value < 1e12


def _opt_num(value: Any) -> bool:
    return value is None or _num(value)


def _text(value: Any) -> bool:
    return type(value) is str and len(value) <= MAX_TEXT


def _hash(value: Any) -> bool:
    return type(value) is str and 0 < len(value) <= _MAX_HASH_LEN


def _bytes(value: Any) -> bool:
    return type(value) is bytes


def _ids(value: Any) -> bool:
    return type(value) is list and len(value) <= MAX_IDS and all(
        type(v) is int and 0 <= v <= MAX_INT for v in value)


def _versions(value: Any) -> bool:
    return (isinstance(value, dict) and len(value) <= 32
            and all(_text(k) and _text(v) for k, v in value.items()))


def _flag(value: Any) -> bool:
    return type(value) is bool


def _in(codes: frozenset[str]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and value in codes


_ANY: Final[dict[str, Callable[[Any], bool]]] = {}

#: Per message type, the required fields and a check each value must pass. Fields not
#: listed here or in ``OPTIONAL`` are allowed (a newer minor peer may add some) but never
#: read.
SCHEMA: Final[dict[str, dict[str, Callable[[Any], bool]]]] = {
    HELLO: {"versions": _versions, "hb": _num},
    WELCOME: {"versions": _versions, "hb": _num, "node": _text, "workers": _int},
    REFUSED: {"reason": _text},
    READY: {"versions": _versions, "hb": _num, "worker": _text, "pid": _int},
    BLOB: {"h": _hash, "nb": _int},
    FETCH: {"h": _hash},
    MISSING: {"h": _hash},
    TASK: {"id": _int, "fn": _hash, "n": lambda v: _int(v) and 0 < v <= 1 << 20, "nb": _int,
           "timeout": _opt_num},
    RESULT: {"id": _int, "worker": _text, "ok": _bytes, "ts": _bytes, "nb": _int},
    LOST: {"ids": _ids, "reason": _text, "worker": _text},
    CANCEL: {"ids": _ids},
    RECALL: {"ids": _ids},
    HEARTBEAT: _ANY,
    BYE: _ANY,
    STOP: _ANY,
    STATUS: _ANY,
}

#: Optional fields that are read, with their checks (absent is fine; present must pass).
OPTIONAL: Final[dict[str, dict[str, Callable[[Any], bool]]]] = {
    REFUSED: {F_CODE: _in(REFUSED_CODES)},
    LOST: {F_CODE: _in(LOST_CODES), F_SIG: _int},
    TASK: {F_SEED: lambda v: isinstance(v, int) and not isinstance(v, bool)
           and abs(v) <= MAX_INT, F_IX: _ids, F_CAP: _flag, F_PLAIN: _flag, F_EST: _num,
           F_SHM: _ids, F_RSHM: _text},
    RESULT: {F_SHM: _ids, F_RAW: _flag, F_FREE: _ids},
    HEARTBEAT: {F_WORKERS: _int},
    HELLO: {F_PROBE: _text},
    WELCOME: {F_PROOF: _text},
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
    size: int = -1  # the payload's bytes, once a daemon's queue has weighed it

    @property
    def type(self) -> str:
        return str(self.env["t"])


class Packed(list):  # type: ignore[type-arg]
    """The frames of a message made in this process, with its envelope as a map
    (``env``): a peer in the same process (a client hosted in its daemon's loop) takes
    the message as it is, without decoding it again (``in_memory``). Frames read off a
    socket or a pipe are plain lists, never this."""

    __slots__ = ("env",)

    def __init__(self, frames: Iterable[Any], env: dict[str, Any]):
        super().__init__(frames)
        self.env = env


def pack(msg_type: str, payload: Sequence[Any] = (), **fields: Any) -> Packed:
    """Build the frames of one message: the envelope, then the payload frames."""
    env = {"v": PROTOCOL_VERSION, "t": msg_type, **fields}
    if msg_type in _WITH_PAYLOAD:
        env["nb"] = len(payload)
    return Packed((msgpack.packb(env, use_bin_type=True), *payload), env)


def in_memory(frames: list[Any]) -> Message | None:
    """The message of frames handed over in this process (``Packed``: made here, or
    decoded here once already), else None: frames from a peer must be ``decode``d."""
    if type(frames) is not Packed:
        return None
    return Message(frames.env, frames[1:], frames[0])


# ---------------------------------------------------------------- builders
# Every message a peer sends is made here, so its fields are named in one place.


def hello(hb: float, probe: str | None = None) -> list[Any]:
    """A client's first message to a daemon: our versions and heartbeat interval, and
    ``probe``, a file of the client's shared-memory folder the daemon answers for when it
    can read it."""
    return pack(HELLO, versions=local_versions(), hb=hb, **({F_PROBE: probe} if probe else {}))


def ready(hb: float, worker: str, pid: int) -> list[Any]:
    """A worker's first message to its daemon."""
    return pack(READY, versions=local_versions(), hb=hb, worker=worker, pid=pid)


def welcome(hb: float, node: str, workers: int, proof: str | None = None) -> list[Any]:
    """A daemon's answer to hello or ready: our versions, heartbeat and capacity, and
    ``proof`` that it read the client's probe (it shares the client's memory)."""
    return pack(WELCOME, versions=local_versions(), hb=hb, node=node, workers=workers,
                **({F_PROOF: proof} if proof else {}))


def refused(reason: str, code: str | None = None) -> list[Any]:
    """A refusal; ``code`` ``REFUSED_HELLO`` asks the peer to introduce itself first."""
    return pack(REFUSED, reason=reason, **({F_CODE: code} if code else {}))


def lost(ids: list[int], reason: str, worker: str, code: str = LOST_CRASH,
         sig: int = 0) -> list[Any]:
    """Task messages that will not be answered, and why (one of ``LOST_CODES``)."""
    return pack(LOST, ids=ids, reason=reason, worker=worker, code=code, sig=sig)


def recall(ids: list[int]) -> list[Any]:
    """Ask a worker for task messages it holds but has not started; it answers ``lost``
    with ``LOST_UNSTARTED`` for each it gives back (and nothing for one it started)."""
    return pack(RECALL, ids=ids)


def cancel(ids: list[int]) -> list[Any]:
    """Drop these task messages (every one of this client's when ``ids`` is empty)."""
    return pack(CANCEL, ids=ids)


def heartbeat(workers: int | None = None) -> list[Any]:
    """A beat; a daemon's beat to a client carries its capacity."""
    return pack(HEARTBEAT) if workers is None else pack(HEARTBEAT, workers=workers)


def shared_frames(msg: Message) -> list[int]:
    """A task's or result's optional ``shm``: the payload frames (1-based: 0 is the pickle
    stream) that are paths of shared-memory files rather than buffers. ProtocolError if
    malformed."""
    shared: list[int] = msg.env.get(F_SHM, [])
    if not all(0 < k < len(msg.payload) for k in shared):
        raise ProtocolError(f"{msg.type} message: 'shm' names a frame it does not carry")
    return shared


def outcome_fields(oks: Sequence[int], stamps: Sequence[float]) -> dict[str, bytes]:
    """A result's ``ok`` and ``ts`` fields from each input's success and the flat list
    start0, end0, start1, end1, ... of their times."""
    times = array("d", stamps)
    if sys.byteorder == "big":
        times.byteswap()
    return {"ok": bytes(oks), "ts": times.tobytes()}


def result_outcomes(msg: Message) -> tuple[bytes, Sequence[float], Sequence[float]]:
    """A result's outcomes: one byte per input (nonzero: it ran), the inputs' start times
    and their end times (spread evenly over the message's time when it has one pair)."""
    oks: bytes = msg.env["ok"]
    times = array("d", msg.env["ts"])
    if sys.byteorder == "big":
        times.byteswap()
    if len(times) == 2 and len(oks) != 1:
        step = (times[1] - times[0]) / max(len(oks), 1)
        return oks, Spread(times[0], step, len(oks)), Spread(times[0] + step, step, len(oks))
    return oks, times[0::2], times[1::2]


class Spread(Sequence[float]):
    """``n`` instants ``step`` apart from ``first``: the starts (or ends) of inputs that
    shared their message's time, made one by one only when read."""

    def __init__(self, first: float, step: float, n: int):
        self.first, self.step, self.n = first, step, n

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> float: ...
    @overload
    def __getitem__(self, i: slice) -> list[float]: ...

    def __getitem__(self, i: int | slice) -> float | list[float]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError("Spread index out of range")
        return self.first + i * self.step


def task_estimate(env: dict[str, Any]) -> float | None:
    """A task envelope's optional ``est``: the client's estimate of the seconds the message
    will run (None when absent or not a sane number)."""
    est = env.get(F_EST)
    return None if est is None else float(est)


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
    if type(env) is not dict:
        raise ProtocolError(f"envelope is a {type(env).__name__}, not a map")
    version = env.get("v")
    if type(version) is not int:
        raise ProtocolError("envelope has no protocol version")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"protocol version mismatch: peer speaks {version}, we speak {PROTOCOL_VERSION}"
        )
    msg_type = env.get("t")
    schema = SCHEMA.get(msg_type) if type(msg_type) is str else None
    if schema is None:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    assert isinstance(msg_type, str)
    for field, valid in schema.items():
        value = env.get(field, _MISSING)
        if value is _MISSING or not valid(value):
            raise ProtocolError(f"{msg_type} message: field {field!r} missing or invalid")
    for field, valid in OPTIONAL.get(msg_type, _ANY).items():
        if field in env and not valid(env[field]):
            raise ProtocolError(f"{msg_type} message: optional field {field!r} invalid")
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
    if env["t"] == RESULT and len(env["ts"]) not in (16, 16 * len(env["ok"])):
        raise ProtocolError("result message: 'ts' is neither a pair per input nor one pair")
    return Message(env, payload, frames[0])


# ---------------------------------------------------------------- versions


@functools.cache
def local_versions() -> dict[str, str]:
    """The versions a peer announces in its first message."""
    return {
        "protocol": str(PROTOCOL_VERSION),
        "deathstar": __version__,
        "python": platform.python_version(),
        "cloudpickle": cloudpickle.__version__,
        "msgpack": ".".join(str(p) for p in msgpack.version),
    }


def handshake(theirs: dict[str, Any], peer: str) -> list[str]:
    """The version check every first message gets (hello, ready, welcome), on both sides:
    ``compare_versions`` of ``peer``'s announced versions against ours. Returns warnings;
    raises ``VersionMismatch`` naming both sides."""
    return compare_versions(local_versions(), theirs, peer)


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
