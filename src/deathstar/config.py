"""Every tunable of deathstar, documented once, and where its value came from.

Each constant is, in order of precedence: a command-line flag (where one exists, applied
by the CLI), the environment variable ``DEATHSTAR_`` plus the constant's name without its
unit suffix (``DEATHSTAR_HEARTBEAT_INTERVAL=0.2``), the ``[defaults]`` table of the config
file (``heartbeat_interval = 0.2``), else the default here. The config file is
``config.toml`` in the config folder (``~/.config/deathstar`` on Linux), or
``$DEATHSTAR_CONFIG``; its ``[clusters]`` table names clusters (``lab = ["krypton",
"xenon:7000"]``) that ``--cluster lab`` then means. Values are read once, at import.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any


if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file or variable that cannot be used; the message names it."""


def config_dir() -> Path:
    """The per-user config folder (XDG on Linux: ``$XDG_CONFIG_HOME/deathstar``, else
    ``~/.config/deathstar``), which holds the default keys, ``config.toml`` and deployed
    clusters' state. It need not exist."""
    if sys.platform.startswith("linux"):
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
        return Path(base) / "deathstar"
    # elsewhere the platform's convention, as typer (the CLI's library) knows it; not
    # imported on Linux, where every worker process reads this at start
    from typer import get_app_dir

    return Path(get_app_dir("deathstar"))


def config_path() -> Path:
    """Where the config file is (it need not exist)."""
    explicit = os.environ.get("DEATHSTAR_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    return config_dir() / "config.toml"


def cache_dir() -> Path:
    """The user's cache folder for deathstar (node bundles): ``$DEATHSTAR_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/deathstar``, else ``~/Library/Caches/deathstar`` on macOS and
    ``~/.cache/deathstar`` elsewhere. It need not exist."""
    explicit = os.environ.get("DEATHSTAR_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "deathstar"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "deathstar"
    return Path.home() / ".cache" / "deathstar"


def log_dir() -> Path:
    """Where a daemon's workers write what tasks print: ``$XDG_STATE_HOME/deathstar/logs``
    (``~/.local/state/deathstar/logs``)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "deathstar" / "logs"


def trust_problem(path: Path, open_bits: int = 0o022) -> str | None:
    """Why ``path`` (a file or folder that grants trust: keys, ``authorized/``, the config
    file) cannot be trusted, or None: it is a symbolic link, belongs to another user than
    this process's (root's are trusted), or has any of ``open_bits`` set (by default,
    group or others may write it). Raises FileNotFoundError when it does not exist."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link; use the real path"
    if st.st_uid not in (os.getuid(), 0):
        return (f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}) "
                "or root")
    if st.st_mode & open_bits:
        fix = "chmod 700" if stat.S_ISDIR(st.st_mode) else (
            "chmod 600" if open_bits & 0o044 else "chmod go-w")
        return (f"{path} has loose permissions ({stat.filemode(st.st_mode)}): others can "
                f"{'read or write' if open_bits & 0o044 else 'write'} it; run: {fix} {path}")
    return None


def make_private_dir(path: Path) -> Path:
    """Make ``path`` and any missing parent folder 0700, whatever the umask (so that a
    first run under umask 000 does not leave ``~/.config/deathstar`` open to others)."""
    missing = [p for p in [path, *path.parents] if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        folder.chmod(0o700)
    return path


def _load_file() -> dict[str, Any]:
    path = config_path()
    try:
        problem = trust_problem(path)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    if problem:  # it can say keys = "none" and redefine clusters: it must be ours
        raise ConfigError(f"config file not used: {problem}")
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for table in ("defaults", "clusters"):
        if not isinstance(data.get(table, {}), dict):
            raise ConfigError(f"{path}: [{table}] must be a table")
    return data


try:
    FILE = _load_file()
    FILE_ERROR = ""
except ConfigError as _exc:  # the CLI reports it and stops; the library goes on without
    FILE, FILE_ERROR = {}, str(_exc)
#: Each setting's value and where it came from ("env DEATHSTAR_X", "config.toml", "default").
SOURCES: dict[str, tuple[Any, str]] = {}


def _setting(name: str, default: Any, kind: type) -> Any:
    raw = os.environ.get("DEATHSTAR_" + name)
    if raw not in (None, ""):
        source = f"env DEATHSTAR_{name}"
    elif name.lower() in FILE.get("defaults", {}):
        raw = FILE["defaults"][name.lower()]
        source = str(config_path())
    else:
        SOURCES[name] = (default, "default")
        return default
    try:
        value = kind(float(raw)) if kind is int else kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name.lower()}={raw!r} is not a {kind.__name__}") \
            from None
    SOURCES[name] = (value, source)
    return value


def _env_float(name: str, default: float) -> float:
    return float(_setting(name, default, float))


def _env_int(name: str, default: int) -> int:
    return int(_setting(name, default, int))


def named_clusters() -> dict[str, list[str]]:
    """The config file's ``[clusters]``: name -> node specs."""
    out: dict[str, list[str]] = {}
    for name, nodes in FILE.get("clusters", {}).items():
        out[name] = [nodes] if isinstance(nodes, str) else [str(n) for n in nodes]
    return out


def file_keys_dir() -> str | None:
    """The config file's ``keys = "DIR"`` (used when neither --keys nor DEATHSTAR_KEYS
    says)."""
    value = FILE.get("defaults", {}).get("keys")
    return str(value) if value else None

#: Exec port of a node named without a port; its status port is the next one and the
#: port for hand-started workers the one after.
DEFAULT_PORT = _env_int("PORT", 6000)

#: Seconds between heartbeats on a link that is otherwise quiet.
HEARTBEAT_INTERVAL_S = _env_float("HEARTBEAT_INTERVAL", 1.0)

#: Heartbeats a peer may miss before it is declared dead (window = interval x liveness).
LIVENESS = _env_int("LIVENESS", 5)

#: Seconds a client waits for a node's handshake before naming it unreachable.
CONNECT_TIMEOUT_S = _env_float("CONNECT_TIMEOUT", 5.0)

#: Attempts a task gets when its worker dies under it (crash, kill, OOM) before the input
#: fails with WorkerCrashed.
MAX_ATTEMPTS = _env_int("MAX_ATTEMPTS", 3)

#: Times a task may be re-sent because its node was lost (silent, restarted, stopping)
#: before the input fails: a lost node is not the task's fault, so this budget is apart
#: from MAX_ATTEMPTS, but it is bounded so a task that takes its node down cannot loop.
MAX_NODE_LOSSES = _env_int("MAX_NODE_LOSSES", 10)

#: Seconds an input may run when a map gives no timeout (0: no limit).
TASK_TIMEOUT_S = _env_float("TASK_TIMEOUT", 0.0)

#: Messages a client keeps in flight per node beyond its worker count, so that a worker
#: finds its next task already queued at its broker when it finishes one.
PREFETCH_PER_NODE = _env_int("PREFETCH", 2)

#: The same when messages are short: then each worker also holds one behind its current
#: one, and this many more wait at the daemon (a deeper queue hides the client's latency).
PREFETCH_SHORT = _env_int("PREFETCH_SHORT", 6)

#: With short messages, a node's queue also covers its round trip: the messages its
#: workers finish while a result travels back and the next message out (the node's lag,
#: measured) wait there, up to this many per worker. A queue of that depth holds about
#: one lag of work, so it costs a map's tail no more than the round trip it hides.
PREFETCH_DEPTH_MAX = _env_int("PREFETCH_DEPTH", 16)

#: A worker holds a second task message behind its current one when the client expects the
#: current one to run at most this long: it never waits a round trip between short
#: messages, and a long one cannot keep another message from an idle worker.
PREFETCH_MAX_EST_S = _env_float("PREFETCH_MAX_EST", 0.06)

#: Behind a short message a worker holds more than one while those waiting are expected
#: to run less than this in all, up to PREFETCH_WORKER_MAX messages held: a worker running
#: tiny messages then finds the next ones in its pipe, never sleeping until its daemon's
#: loop comes round (a write that wakes a sleeping process costs that loop more than the
#: message's own work), and what waits behind a message that overruns is little.
PREFETCH_COVER_S = _env_float("PREFETCH_COVER", 0.002)
PREFETCH_WORKER_MAX = _env_int("PREFETCH_WORKER", 8)

#: Adaptive batching aims at batches that keep a worker busy about this long: long enough
#: that per-message cost vanishes, short enough that load balancing stays fine.
BATCH_TARGET_S = _env_float("BATCH_TARGET", 0.05)

#: Seconds of work below which a message is not made smaller near the end of a map.
BATCH_MIN_S = _env_float("BATCH_MIN", 0.002)

#: Results a client holds for a consumer that has not taken them yet; past it, no new
#: inputs are read until the consumer catches up (memory stays bounded).
MAX_PENDING_RESULTS = _env_int("MAX_PENDING_RESULTS", 20_000)
#: Seconds a map's outcomes may wait in the client's I/O thread to be handed to the map's
#: consumer together: a consumer thread blocked on the outcomes is woken once per this,
#: not once per message (each wake costs the I/O thread a switch of the GIL). The outcomes
#: of a map that has ended go at once.
DELIVERY_HOLD_S = _env_float("DELIVERY_HOLD", 0.002)
#: A message's outcomes at least this many go to the consumer at once (with any held
#: before them): a message that large is worth its own wake-up, and the consumer then
#: places them while the rest of the map runs instead of after it.
DELIVERY_AT_ONCE = _env_int("DELIVERY_AT_ONCE", 256)
#: Seconds an executor's job for one function stays open with no call to run and none
#: running: a call submitted meanwhile rides in it (no job to start, none to end, per
#: call); past it the job ends, and the client's loop goes quiet.
FEED_IDLE_S = _env_float("FEED_IDLE", 0.25)
#: Seconds between the client's snapshots of its nodes' figures (``Cluster.node_stats``, the
#: progress display) while a job runs: the client's loop wakes this often then, message
#: or not.
NODE_FIGURES_S = 0.25

#: A message's pickled inputs are at most about this many bytes, unless one input alone is
#: larger (it then goes alone): the client writes a message whole before its worker can
#: start, and 16 MB arrays batched by their run time alone kept workers idle for tens of
#: milliseconds.
BATCH_MAX_BYTES = _env_int("BATCH_MAX_BYTES", 4 << 20)

#: Upper bound on inputs per message whatever the measured task time, in a map whose
#: length is unknown: what the window holds was read ahead of a consumer that may be slow.
BATCH_MAX_ITEMS = _env_int("BATCH_MAX_ITEMS", 4096)

#: The same in a map of known length, which is cut into whole rounds of messages: a map of
#: 20,000 tiny inputs goes as one message per worker. Under MAX_PENDING_RESULTS: one
#: message's results never throttle a map on their own.
BATCH_MAX_ITEMS_KNOWN = _env_int("BATCH_MAX_ITEMS_KNOWN", 16384)

#: Frames sent without copying (pyzmq's zero-copy, whose buffers a helper thread frees)
#: start at this size; smaller ones are copied, which costs less up to about here.
ZERO_COPY_MIN_BYTES = _env_int("ZERO_COPY_MIN_BYTES", 1 << 20)

#: Largest message the exec and worker ports accept, in bytes.
MAX_MESSAGE_BYTES = _env_int("MAX_MESSAGE_BYTES", 512 * 1024 * 1024)

#: Largest message the status port accepts, in bytes.
MAX_STATUS_MESSAGE_BYTES = _env_int("MAX_STATUS_MESSAGE_BYTES", 4096)

#: Bytes of function-and-common-argument blobs a daemon keeps cached.
BLOB_CACHE_BYTES = _env_int("BLOB_CACHE_BYTES", 2 * 1024 * 1024 * 1024)

#: The longest heartbeat interval a peer may announce (seconds); a longer one is held to
#: it, so a peer that says 1e300 still expires after LIVENESS of these.
HEARTBEAT_MAX_S = _env_float("HEARTBEAT_MAX", 60.0)

#: Blobs a daemon caches at most, whatever their size (each also counts 1 KiB).
BLOB_CACHE_ENTRIES = _env_int("BLOB_CACHE_ENTRIES", 4096)

#: Clients a daemon serves at once; a hello past it is refused.
MAX_CLIENTS = _env_int("MAX_CLIENTS", 256)

#: Task messages and payload bytes one client may have queued at a daemon; past either,
#: a task is answered lost "busy" and the client backs off (an empty queue always takes
#: one message, however large).
CLIENT_QUEUE_MESSAGES = _env_int("CLIENT_QUEUE_MESSAGES", 4096)
CLIENT_QUEUE_BYTES = _env_int("CLIENT_QUEUE_BYTES", 512 * 1024 * 1024)

#: Seconds between checks of the daemon's worker processes (exit is noticed this fast).
SUPERVISE_INTERVAL_S = _env_float("SUPERVISE_INTERVAL", 0.1)

#: Set DEATHSTAR_DEBUG=1 to log every message each component sends and receives.
DEBUG = os.environ.get("DEATHSTAR_DEBUG", "") not in ("", "0")
