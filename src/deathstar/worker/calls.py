"""Running a task's calls in a worker: the function on each input, each outcome (a value,
or the error info of what it raised) captured, and the results pickled one by one so that
one that cannot be pickled, or unpickled at the client, fails only its own input.

Whatever user code raises, ``BaseException`` included (``SystemExit``,
``KeyboardInterrupt`` raised by the function), becomes that input's error; only
``Terminate`` (this worker's SIGTERM/SIGINT) ends the worker.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import itertools
import random
import sys
import time
import traceback
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable

import cloudpickle

from deathstar import protocol, serialize, shm
from deathstar.protocol import Message
from deathstar.shipping import Bundle


@dataclass
class Function:
    """A function blob unpickled: the function, its common arguments, the modules it came
    with, and its executor's initializer (token, initializer, initargs) or None."""

    fn: Callable[..., Any]
    common: dict[str, Any]
    bundle: Bundle | None
    init: tuple[str, Callable[..., Any], tuple[Any, ...]] | None


def format_user_traceback(exc: BaseException) -> str:
    """The traceback the user needs: without this module's own frame, and with the real
    file names of functions shipped by value (cloudpickle names their code
    ``<dynamic-code>``; their globals still carry ``__file__``)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    rendered = traceback.TracebackException(type(exc), exc, tb)
    _restore_file_names(rendered, exc, tb)
    return "".join(rendered.format())


def _restore_file_names(rendered: traceback.TracebackException, exc: BaseException | None,
                        tb: TracebackType | None, depth: int = 0) -> None:
    frames = [frame for frame, _ in traceback.walk_tb(tb)]
    for summary, frame in zip(rendered.stack, frames):
        if summary.filename == "<dynamic-code>":
            summary.filename = str(frame.f_globals.get("__file__", summary.filename))
            if hasattr(summary, "_line"):
                summary._line = None  # look the source line up again, by the real name
    if exc is None or depth > 20:
        return
    for chained, cause in ((rendered.__cause__, exc.__cause__),
                           (rendered.__context__, exc.__context__)):
        if chained is not None and cause is not None:
            _restore_file_names(chained, cause, cause.__traceback__, depth + 1)


def error_info(exc: BaseException) -> dict[str, Any]:
    """What travels back for an exception: plain fields, plus the exception pickled when
    it can be (so the client can re-raise the original type)."""
    info: dict[str, Any] = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
        "message": _text(exc),
        "traceback": format_user_traceback(exc),
    }
    try:
        info["pickled"] = cloudpickle.dumps(exc, protocol=5)
    except Terminate:
        raise
    except BaseException:  # noqa: B036 - an exception whose pickling raises SystemExit
        info["pickled"] = None
    return info


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Terminate:
        raise
    except BaseException:  # noqa: B036 - its __str__ is user code too
        return f"<{type(exc).__name__} whose str() failed>"


def task_seeds(env: dict[str, Any], n: int) -> list[int] | None:
    """Per-input seeds from a task's ``seed`` and ``ix`` (the inputs' indices)."""
    seed, indices = env.get(protocol.F_SEED), env.get(protocol.F_IX)
    if seed is None:
        return None
    if not isinstance(seed, int) or not isinstance(indices, list) or len(indices) != n or \
            not all(isinstance(i, int) for i in indices):
        raise ValueError("a seeded task needs an integer seed and one index per input")
    return [seed + i for i in indices]


def seed_generators(seed: int) -> None:
    """Seed Python's ``random`` and numpy's global generator (when numpy is installed)."""
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is None and importlib.util.find_spec("numpy") is not None:
        import numpy
    if numpy is not None:
        numpy.random.seed(seed % 2**32)


#: Inputs the client expects to run shorter than this each (its ``est`` of the message
#: over its inputs) run in one C-level loop, without a clock reading each; their records
#: share the message's time evenly (a clock reading would cost more than the input).
SWIFT_INPUT_S = 50e-6


class Capture:
    """Within ``with``: what the code prints to sys.stdout/sys.stderr is kept (and still
    goes to the worker's own output). Inactive when ``enabled`` is False."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.buffer = io.StringIO()

    def __enter__(self) -> Capture:
        if self.enabled:
            self.saved = sys.stdout, sys.stderr
            sys.stdout = _Tee(self.buffer, self.saved[0])
            sys.stderr = _Tee(self.buffer, self.saved[1])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            sys.stdout, sys.stderr = self.saved

    def text(self) -> str:
        return self.buffer.getvalue()


class _Tee(io.TextIOBase):
    def __init__(self, *streams: Any):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


class Terminate(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT: say goodbye and exit."""


def run_calls(function: Function, msg: Message, initialized: set[str],
              kept: list[shm.Kept] | None = None
              ) -> tuple[list[Any], bytearray, list[float], list[str] | None]:
    """Call the function on each input of the message: values (or error info), whether
    each succeeded (a byte each, nonzero if it did), each one's start and end time (flat:
    start0, end0, start1, ...; or one pair for the message, whose inputs share it:
    ``_run_swift``), and (when the task asks, ``cap``) what each printed. With ``seed``,
    Python's and numpy's generators are seeded with seed + the input's index (``ix``)
    before each input.
    The executor's initializer runs first, once per process (``initialized`` holds the
    tokens of those that ran); when it raises, every input of the message fails with it
    and it runs again before the next message. ``kept``: as for ``serialize.loads``."""
    n = msg.env["n"]
    capture = bool(msg.env.get(protocol.F_CAP))
    failure = None
    try:
        items = serialize.loads(msg.payload, protocol.shared_frames(msg), kept)
        seeds = task_seeds(msg.env, n)
    except Terminate:
        raise
    except BaseException as exc:  # noqa: B036 - unpickling the inputs runs user code
        failure = error_info(exc)
        failure["message"] = f"the task could not be read here: {failure['message']}"
    if failure is None:
        failure = _initialize(function, initialized)
    if failure is not None:
        now = time.time()
        return [failure] * n, bytearray(n), [now] * (2 * n), [""] * n if capture else None
    fn, common, plain = function.fn, function.common, bool(msg.env.get(protocol.F_PLAIN))
    if seeds is None and not capture:
        est = protocol.task_estimate(msg.env)
        call = _caller(fn, common, plain)
        if est is not None and est < SWIFT_INPUT_S * max(n, 1):
            return _run_swift(call, items)
        return _run_quick(call, items)
    values: list[Any] = []
    oks = bytearray()
    stamps: list[float] = []
    outputs: list[str] | None = [] if capture else None
    for k, item in enumerate(items):
        args, kwargs = ((item,), None) if plain else item
        if seeds is not None:
            seed_generators(seeds[k])
        start = time.time()
        with Capture(capture) as captured:
            try:
                if kwargs:
                    values.append(fn(*args, **{**common, **kwargs}))
                else:
                    values.append(fn(*args, **common))
                oks.append(1)
            except Terminate:
                raise
            except BaseException as exc:  # noqa: B036 - SystemExit, KeyboardInterrupt too
                values.append(error_info(exc))
                oks.append(0)
        stamps += (start, time.time())
        if outputs is not None:
            outputs.append(captured.text())
    return values, oks, stamps, outputs


def _caller(fn: Callable[..., Any], common: dict[str, Any], plain: bool
            ) -> Callable[[Any], Any]:
    """What runs one input: ``fn(item, **common)`` for a plain item (``fn`` itself
    without common arguments), else ``fn(*args, **common, **kwargs)``."""
    if plain:
        return functools.partial(fn, **common) if common else fn

    def call(item: Any) -> Any:
        args, kwargs = item
        return fn(*args, **{**common, **kwargs}) if kwargs else fn(*args, **common)

    return call


def _run_quick(call: Callable[[Any], Any], items: list[Any]
               ) -> tuple[list[Any], bytearray, list[float], None]:
    """``run_calls`` without seeds or captured output: the same outcomes, with no object
    made per input beyond its value and its start time (the loop a stream of tiny inputs
    spends its time in; an input ends when the next one starts)."""
    values: list[Any] = []
    starts: list[float] = []
    failed: list[int] = []
    now, put, stamp = time.time, values.append, starts.append
    for item in items:
        stamp(now())
        try:
            put(call(item))
        except Terminate:
            raise
        except BaseException as exc:  # noqa: B036 - SystemExit, KeyboardInterrupt too
            failed.append(len(values))
            put(error_info(exc))
    return values, _oks(len(values), failed), _flat_stamps(starts, now()), None


def _run_swift(call: Callable[[Any], Any], items: list[Any]
               ) -> tuple[list[Any], bytearray, list[float], None]:
    """``_run_quick`` for inputs the client expects to run under SWIFT_INPUT_S each:
    ``map`` runs them in C, with no clock reading per input, and they share the message's
    time evenly in their records (the stamps are one pair, the message's start and end).
    An input that raises stops ``map`` there; it gets its error and the next ones go
    on."""
    values: list[Any] = []
    failed: list[int] = []
    start = time.time()
    while len(values) < len(items):
        try:
            values.extend(map(call, itertools.islice(items, len(values), None)))
        except Terminate:
            raise
        except BaseException as exc:  # noqa: B036 - SystemExit, KeyboardInterrupt too
            failed.append(len(values))
            values.append(error_info(exc))
    return values, _oks(len(values), failed), [start, time.time()], None


def _oks(n: int, failed: list[int]) -> bytearray:
    oks = bytearray(b"\x01") * n
    for i in failed:
        oks[i] = 0
    return oks


def _flat_stamps(starts: list[float], end: float) -> list[float]:
    """start0, end0, start1, end1, ...: each input ends when the next one starts."""
    flat = [end] * (2 * len(starts))
    flat[0::2] = starts
    flat[1:-1:2] = starts[1:]
    return flat


def _initialize(function: Function, initialized: set[str]) -> dict[str, Any] | None:
    """Run the executor's initializer if it has not run in this process: None, or the
    error info of what it raised."""
    if function.init is None or function.init[0] in initialized:
        return None
    token, initializer, initargs = function.init
    try:
        initializer(*initargs)
    except Terminate:
        raise
    except BaseException as exc:  # noqa: B036 - user code
        return error_info(exc)
    initialized.add(token)
    return None


def dump_results(values: list[Any], oks: bytearray, outputs: list[str] | None
                 ) -> tuple[list[Any], bool]:
    """Pickle the results (with the captured outputs, when asked), each value whose
    unpickling could run user code on its own (``serialize.seal``); one that cannot be
    pickled becomes that input's error (its byte in ``oks`` 0). Also whether no value was
    sealed (the result's ``raw``: the client need not look for any)."""
    if 0 not in oks:
        try:
            return serialize.dumps_results(values, outputs)
        except Terminate:
            raise
        except BaseException:  # noqa: B036 - find the culprit below, value by value
            pass
    for i, value in enumerate(values):
        if not oks[i]:
            continue
        try:
            values[i] = serialize.seal(value)
        except Terminate:
            raise
        except BaseException as exc:  # noqa: B036 - a __reduce__ may raise anything
            # what pickling raised is that input's error, as with ProcessPoolExecutor
            exc.add_note(f"deathstar: the result ({type(value).__name__}) could not be "
                         "pickled on the worker")
            values[i], oks[i] = error_info(exc), 0
    return serialize.dumps_sealed(values, outputs), False
