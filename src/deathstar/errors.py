"""Exceptions a map can hand back for one input. Each names the input, node and worker.

An exception the user's function raised comes back as itself (``remote_exception``), as
``concurrent.futures.ProcessPoolExecutor`` gives it: the original object, unpickled here,
with a ``RemoteTraceback`` as its ``__cause__`` (so ``traceback.format_exception`` shows
the remote frames) and ``index``, ``node``, ``worker`` set on it. ``RemoteError`` stands
in only for one that cannot be rebuilt here (its class does not exist, or it does not
unpickle).
"""

from __future__ import annotations

import pickle
from concurrent.futures.process import BrokenProcessPool
from typing import Any


class SerializationError(pickle.PicklingError):
    """Something the user handed over cannot be pickled (or unpickled); the message names
    it. A ``pickle.PicklingError``, as the stdlib's executors raise."""


class TaskFailed(Exception):
    """One input did not produce a result. The map goes on with the others."""

    def __init__(self, message: str, *, index: int = -1, node: str = "", worker: str = ""):
        super().__init__(message)
        self.index = index
        self.node = node
        self.worker = worker

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self), self.__dict__.copy(), self.args))


def _rebuild(cls: type[TaskFailed], state: dict[str, Any], args: tuple[Any, ...]
             ) -> TaskFailed:
    obj = cls.__new__(cls)
    Exception.__init__(obj, *args)
    obj.__dict__.update(state)
    return obj


class RemoteError(TaskFailed):
    """The user's function raised an exception that cannot be rebuilt here (its class
    does not exist in this process, or it does not unpickle). Carries the remote
    exception's type, message and formatted traceback; ``exception`` is None."""

    def __init__(
        self,
        type_name: str,
        message: str,
        remote_traceback: str,
        *,
        index: int = -1,
        node: str = "",
        worker: str = "",
        exception: BaseException | None = None,
    ):
        where = f" (input {index}, node {node}, worker {worker})" if node else ""
        super().__init__(f"{type_name}: {message}{where}", index=index, node=node, worker=worker)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.exception = exception

    def __str__(self) -> str:
        head = super().__str__()
        if not self.remote_traceback:
            return head
        return f"{head}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"


class WorkerCrashed(TaskFailed, BrokenProcessPool):
    """The worker running this input died (signal, kill, out of memory) on every attempt,
    or its node was lost more often than the node-loss budget allows. ``signal`` is the
    signal that killed the worker on the last attempt (0 when none did). A
    ``concurrent.futures.process.BrokenProcessPool`` (so a ``BrokenExecutor``), as the
    stdlib's crash error is; unlike the stdlib's pool, the others go on."""

    def __init__(self, reason: str, attempts: int, *, signal: int = 0, index: int = -1,
                 node: str = "", worker: str = ""):
        super().__init__(
            f"worker died running input {index} on all {attempts} attempt(s); last: {reason}",
            index=index, node=node, worker=worker,
        )
        self.reason = reason
        self.attempts = attempts
        self.signal = signal


class TaskTimeout(TaskFailed):
    """The input ran longer than its ``timeout``; its worker process was killed and
    replaced."""

    def __init__(self, timeout_s: float, attempts: int, *, index: int = -1, node: str = "",
                 worker: str = ""):
        super().__init__(
            f"input {index} ran past its timeout of {timeout_s:g} s "
            f"(attempt {attempts}); its worker was killed",
            index=index, node=node, worker=worker,
        )
        self.timeout_s = timeout_s
        self.attempts = attempts


class RemoteTraceback(Exception):
    """The ``__cause__`` of an exception that came back from a worker: its text is the
    remote traceback (as ``concurrent.futures.process._RemoteTraceback``), and it carries
    the remote exception's ``type_name`` and ``message``, and the ``index``, ``node`` and
    ``worker`` where it was raised."""

    def __init__(self, remote_traceback: str, *, type_name: str = "", message: str = "",
                 index: int = -1, node: str = "", worker: str = ""):
        super().__init__(remote_traceback)
        self.remote_traceback = remote_traceback
        self.type_name = type_name
        self.message = message
        self.index = index
        self.node = node
        self.worker = worker

    def __str__(self) -> str:
        where = f" (input {self.index}, node {self.node}, worker {self.worker})" \
            if self.node else ""
        return f"raised remotely{where}\n\"\"\"\n{self.remote_traceback.rstrip()}\n\"\"\""

    def __reduce__(self) -> Any:
        return (_rebuild_cause, (self.__dict__.copy(),))


def _rebuild_cause(state: dict[str, Any]) -> RemoteTraceback:
    cause = RemoteTraceback.__new__(RemoteTraceback)
    Exception.__init__(cause, state.get("remote_traceback", ""))
    cause.__dict__.update(state)
    return cause


def remote_exception(info: Any, *, index: int, node: str, worker: str) -> BaseException:
    """The exception for a worker's error info (a dict: type, message, traceback, and the
    exception ``pickled`` when it could be): the original, unpickled, with a
    ``RemoteTraceback`` as its cause and ``index``/``node``/``worker`` set; else (its
    class does not exist here, its unpickling fails) a ``RemoteError``. Never raises:
    whatever unpickling raises, ``SystemExit`` included, gives the ``RemoteError``."""
    if not isinstance(info, dict):
        info = {"type": "deathstar.ResultError", "message": repr(info), "traceback": ""}
    type_name, message = str(info.get("type")), str(info.get("message"))
    remote_tb = str(info.get("traceback", ""))
    cause = RemoteTraceback(remote_tb, type_name=type_name, message=message, index=index,
                            node=node, worker=worker)
    exception = None
    if isinstance(info.get("pickled"), bytes):
        try:
            exception = pickle.loads(info["pickled"])
        except BaseException:  # noqa: B036 - its class's code runs here; nothing escapes
            exception = None
    if not isinstance(exception, BaseException):
        return RemoteError(type_name, message, remote_tb, index=index, node=node,
                           worker=worker)
    exception.__cause__ = cause
    exception.__suppress_context__ = True
    for name, value in (("index", index), ("node", node), ("worker", worker),
                        ("remote_traceback", remote_tb)):
        try:
            if not hasattr(exception, name):
                setattr(exception, name, value)
        except (AttributeError, TypeError):
            pass  # __slots__ or a read-only property: the cause still has them
    return exception


def describe(exc: BaseException) -> dict[str, Any]:
    """What a failed input's record and the CLI's JSON error line say about ``exc``: type,
    message, remote traceback, node, worker (from its ``RemoteTraceback`` cause when it
    came from a worker)."""
    cause = exc.__cause__ if isinstance(exc.__cause__, RemoteTraceback) else None
    if isinstance(exc, RemoteError):
        return {"type": exc.type_name, "message": exc.message,
                "traceback": exc.remote_traceback, "node": exc.node, "worker": exc.worker}
    if cause is not None:
        return {"type": cause.type_name, "message": cause.message,
                "traceback": cause.remote_traceback, "node": cause.node,
                "worker": cause.worker}
    return {"type": type(exc).__name__, "message": str(exc), "traceback": "",
            "node": getattr(exc, "node", ""), "worker": getattr(exc, "worker", "")}
