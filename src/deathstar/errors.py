"""Exceptions a map can hand back for one input. Each names the input, node and worker."""

from __future__ import annotations

from typing import Any

import cloudpickle


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
    """The user's function raised. Carries the remote exception's type, message and
    formatted traceback, and the original exception as ``exception`` when it could be
    unpickled."""

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


class WorkerCrashed(TaskFailed):
    """The worker running this input died (signal, kill, out of memory) on every attempt,
    or its node was lost more often than the node-loss budget allows. ``signal`` is the
    signal that killed the worker on the last attempt (0 when none did)."""

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


def remote_error(info: Any, *, index: int, node: str, worker: str) -> RemoteError:
    """The RemoteError for a worker's error info (a dict: type, message, traceback, and
    the exception ``pickled`` when it could be); the original exception is unpickled
    when its class exists here."""
    if not isinstance(info, dict):
        info = {"type": "deathstar.ResultError", "message": repr(info), "traceback": ""}
    exception = None
    if info.get("pickled"):
        try:
            exception = cloudpickle.loads(info["pickled"])
        except Exception:
            exception = None  # its class does not exist here; the text remains
    return RemoteError(str(info.get("type")), str(info.get("message")),
                       str(info.get("traceback", "")), index=index, node=node, worker=worker,
                       exception=exception)
