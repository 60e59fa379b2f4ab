"""What the client does with a task message a node will not answer, by the LOST code the
daemon gave (``protocol.LOST_CODES``): send the function again, go elsewhere, back off,
charge an attempt, or time the input out. One function a code, in ``LOST_HANDLERS``."""

from __future__ import annotations

import time
from typing import Callable

from deathstar import protocol
from deathstar.client.job import Task
from deathstar.client.node import BUSY_BACKOFF_MAX_S, Node
from deathstar.protocol import Message

__all__ = ["LOST_HANDLERS", "lost_crash"]


def lost_blob(node: Node, send_id: int, task: Task, msg: Message) -> None:
    """The node lacked the blob: send it again (unless that was already done after
    this task went out), then the task, at no cost."""
    if node.blobs_sent.get(task.job.fn_hash, send_id) <= send_id:
        node.blobs_sent.pop(task.job.fn_hash, None)
    task.job.requeue(task, charge=False)


def lost_stopping(node: Node, send_id: int, task: Task, msg: Message) -> None:
    """The node is draining: no one's fault; elsewhere if possible."""
    task.avoid = node.name
    task.job.requeue(task, charge=False)


def lost_unstarted(node: Node, send_id: int, task: Task, msg: Message) -> None:
    """It waited behind a message whose worker died: no one's fault."""
    task.job.requeue(task, charge=False)


def lost_busy(node: Node, send_id: int, task: Task, msg: Message) -> None:
    """Our queue at the node is full: no one's fault; hold off that node a while."""
    now = time.monotonic()
    if node.busy_until <= now:
        node.busy_until = now + node.busy_backoff_s
        node.busy_backoff_s = min(2 * node.busy_backoff_s, BUSY_BACKOFF_MAX_S)
    task.job.requeue(task, charge=False)


def lost_timeout(node: Node, send_id: int, task: Task, msg: Message) -> None:
    """An input ran past its timeout."""
    task.job.timed_out(task, node.name, msg.env["worker"])


def lost_crash(node: Node, send_id: int, task: Task, msg: Message) -> None:
    """The worker died under it: costs an attempt; elsewhere if possible."""
    task.last_reason = f"{msg.env['reason']} (node {node.name})"
    task.avoid = node.name
    task.job.requeue(task, charge=True, node=node.name, worker=msg.env["worker"],
                     sig=msg.env.get(protocol.F_SIG, 0))


#: LOST code -> what to do with each task it names (a missing or unknown code: a crash).
LOST_HANDLERS: dict[str, Callable[[Node, int, Task, Message], None]] = {
    protocol.LOST_BLOB: lost_blob,
    protocol.LOST_STOPPING: lost_stopping,
    protocol.LOST_UNSTARTED: lost_unstarted,
    protocol.LOST_TIMEOUT: lost_timeout,
    protocol.LOST_CRASH: lost_crash,
    protocol.LOST_BUSY: lost_busy,
}
