"""Every exit code a deathstar process ends with, in one table.

The numbers are part of the interface: scripts test ``deathstar``'s code, and the daemon's
supervisor reads its workers' codes. Ranges keep the groups apart: 0-9 the CLI's general
outcomes, 10-19 the worker process, 20-29 ``deathstar ec2``, 130 an interrupt (128+SIGINT).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    USAGE = 2  #: bad options, a refused bind, unreadable keys or config
    TASKS_FAILED = 3  #: the map ran, some inputs failed
    NO_NODES = 4  #: no node could be used
    BAD_INPUT = 5  #: an input file, function or output that cannot be used

    WORKER_REFUSED = 10  #: the daemon refused the worker (version mismatch)
    WORKER_PARENT_GONE = 11  #: the daemon that started the worker is gone
    WORKER_RECYCLED = 12  #: reached --max-tasks/--max-memory; replaced, not a crash

    EC2_NO_BOTO3 = 20
    EC2_NO_CREDENTIALS = 21
    EC2_NO_DEFAULT_VPC = 22
    EC2_TYPE_NOT_OFFERED = 23
    EC2_QUOTA = 24
    EC2_REGION = 25
    EC2_NO_ADDRESS = 26
    EC2_AWS = 27  #: any other AWS error
    EC2_BUNDLE = 28  #: the node bundle cannot be built (e.g. no wheel for the node)
    EC2_NODE_FAILED = 29  #: a node reported that its boot failed

    INTERRUPTED = 130
