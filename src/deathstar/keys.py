"""CurveZMQ keys: making them, finding them, checking their permissions, and putting them
on sockets.

A key folder (``deathstar keygen``; default ``<config folder>/keys``) holds::

    node.key  node.key_secret        the daemon's keypair
    client.key  client.key_secret    this user's keypair (clients and hand-started workers)
    authorized/*.key                 public keys a daemon serves (keygen puts client.key here)
    authorized_workers/*.key         public keys that may serve as hand-started workers on
                                     the worker port (none by default)
    nodes/HOST.key, nodes/HOST_PORT.key   optional: the public key of one node, when nodes
                                     do not share node.key

Secret files must be 0600 and folders not writable or readable by others: a daemon (and
a client) refuses keys with loose permissions, naming the file.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85

from deathstar import config
from deathstar.nodes import NodeAddress

NODE = "node"
CLIENT = "client"
AUTHORIZED = "authorized"
AUTHORIZED_WORKERS = "authorized_workers"
NODES = "nodes"

#: ``--keys none`` (or DEATHSTAR_KEYS=none): use no keys even if the default folder has some.
NO_KEYS = "none"

#: ZAP domain of deathstar's sockets.
ZAP_DOMAIN = b"deathstar"


class KeyFileError(Exception):
    """Keys missing, unreadable, or with loose permissions; the message names the file."""


def default_dir() -> Path:
    """The default key folder, inside the per-user config folder (XDG on Linux)."""
    return config.config_dir() / "keys"


def chosen_dir(explicit: str | Path | None) -> Path | str | None:
    """What the user chose: ``explicit``, else ``$DEATHSTAR_KEYS``, else the config file's
    ``keys``: a folder, ``NO_KEYS``, or None when nothing was chosen."""
    chosen = explicit if explicit is not None else (
        os.environ.get("DEATHSTAR_KEYS") or config.file_keys_dir())
    if chosen is None:
        return None
    return NO_KEYS if str(chosen) == NO_KEYS else Path(chosen).expanduser()


def resolve_dir(explicit: str | Path | None, role: str) -> Path | None:
    """The key folder to use: the one chosen (``chosen_dir``), else the default folder
    when it holds ``role``'s secret key; None means no keys (``none`` too)."""
    chosen = chosen_dir(explicit)
    if chosen is not None:
        return None if chosen == NO_KEYS else Path(chosen)
    default = default_dir()
    return default if (default / f"{role}.key_secret").exists() else None


def ensure_keys(folder: Path) -> bool:
    """Make keys in ``folder`` (``keygen``) unless it has them; True when it made them.
    Safe when two processes race to make them: the loser uses the winner's."""
    if (folder / f"{NODE}.key_secret").exists() and (folder / f"{CLIENT}.key_secret").exists():
        return False
    try:
        keygen(folder)
    except KeyFileError:
        return False  # another process made them first
    return True


def keygen(folder: Path, force: bool = False) -> list[Path]:
    """Make a node keypair and a client keypair in ``folder`` and authorize the client.
    Refuses to overwrite existing keys unless ``force``. Returns the files written."""
    folder = folder.expanduser()
    existing = [folder / f"{n}.key_secret" for n in (NODE, CLIENT)
                if (folder / f"{n}.key_secret").exists()]
    if existing and not force:
        raise KeyFileError(f"{existing[0]} exists already; pass --force to replace the keys "
                        "(clients and nodes using them will need the new ones)")
    for d in (folder, folder / AUTHORIZED):
        config.make_private_dir(d)
    written = []
    for name in (NODE, CLIENT):
        for suffix in (".key", ".key_secret"):
            (folder / f"{name}{suffix}").unlink(missing_ok=True)
        public, secret = zmq.auth.create_certificates(str(folder), name)
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)
        written += [Path(public), Path(secret)]
    authorized = folder / AUTHORIZED / f"{CLIENT}.key"
    shutil.copyfile(folder / f"{CLIENT}.key", authorized)
    os.chmod(authorized, 0o644)
    written.append(authorized)
    return written


def check_permissions(path: Path, secret: bool) -> None:
    """Refuse a file or folder that grants trust unless it is this user's (or root's), not a
    symbolic link, and closed: a secret others can read or write, a folder others can write
    (someone who can write ``authorized/`` can let themselves in)."""
    try:
        problem = config.trust_problem(path, 0o077 if secret else 0o022)
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}") from None
    if problem:
        raise KeyFileError(problem)


def _load_pair(folder: Path, name: str) -> tuple[bytes, bytes]:
    secret_file = folder / f"{name}.key_secret"
    check_permissions(folder, secret=True)
    check_permissions(secret_file, secret=True)
    try:
        public, secret = zmq.auth.load_certificate(str(secret_file))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{secret_file}: not a readable key ({exc}); make keys with "
                        "'deathstar keygen'") from None
    if secret is None:
        raise KeyFileError(f"{secret_file} holds no secret key")
    return public, secret


def _load_public(path: Path) -> bytes:
    try:
        return zmq.auth.load_certificate(str(path))[0]
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: not a readable public key ({exc})") from None


@dataclass(frozen=True)
class ServerKeys:
    """A daemon's keypair and the public keys (z85) it serves."""

    public: bytes
    secret: bytes
    authorized: frozenset[bytes]  # clients: may submit work (exec and status ports)
    folder: Path
    workers: frozenset[bytes] = frozenset()  # may serve as workers (worker port only)


def _load_authorized(folder: Path, required: bool) -> frozenset[bytes]:
    """The public keys in ``folder`` (each checked like the folder: ours, closed)."""
    if not required and not os.path.lexists(folder):
        return frozenset()
    check_permissions(folder, secret=False)
    files = sorted(folder.glob("*.key"))
    for path in files:
        check_permissions(path, secret=False)
    return frozenset(_load_public(p) for p in files)


def load_server_keys(folder: Path) -> ServerKeys:
    public, secret = _load_pair(folder, NODE)
    auth_dir = folder / AUTHORIZED
    authorized = _load_authorized(auth_dir, required=True)
    if not authorized:
        raise KeyFileError(f"{auth_dir} holds no public key: nobody could use this daemon; "
                        "copy clients' client.key files there")
    workers = _load_authorized(folder / AUTHORIZED_WORKERS, required=False)
    return ServerKeys(public, secret, authorized, folder, workers)


@dataclass(frozen=True)
class ClientKeys:
    """A client's (or hand-started worker's) keypair and where node public keys are."""

    public: bytes
    secret: bytes
    folder: Path

    def server_key(self, node: NodeAddress) -> bytes:
        """The node's public key: the one it came with (ec2 nodes), else
        ``nodes/HOST_PORT.key``, ``nodes/HOST.key``, else ``node.key``."""
        if node.server_key is not None:
            return node.server_key
        for name in (f"{node.host}_{node.port}.key", f"{node.host}.key"):
            path = self.folder / NODES / name
            if path.exists():
                return _load_public(path)
        return _load_public(self.folder / f"{NODE}.key")


def load_client_keys(folder: Path) -> ClientKeys:
    public, secret = _load_pair(folder, CLIENT)
    return ClientKeys(public, secret, folder)


def serve_with(sock: zmq.Socket[bytes], keys: ServerKeys) -> None:
    """Make ``sock`` a CURVE server (before it binds)."""
    sock.curve_server = True
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.zap_domain = ZAP_DOMAIN


def connect_with(sock: zmq.Socket[bytes], public: bytes, secret: bytes,
                 server_public: bytes) -> None:
    """Make ``sock`` a CURVE client of the server with ``server_public`` (before it
    connects)."""
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public


#: Roles of a daemon's sockets: who may connect to each.
CLIENTS = "clients"  # exec and status ports: keys in authorized/
WORKERS = "workers"  # the worker port: keys in authorized_workers/ and the daemon's own


class Gatekeeper:
    """A daemon's door. With keys, every socket is a CURVE server, and the daemon's own
    loop answers ZAP (RFC 27) requests on ``zap_socket``: a key gets in only on the
    sockets of its role (``CLIENTS``: keys in ``authorized/``; ``WORKERS``: keys in
    ``authorized_workers/``, for hand-started workers), with the key as
    ``User-Id``. ``admits`` checks each message's ``User-Id`` again, because CURVE without
    a ZAP handler accepts anyone who knows the node's public key: should the handler ever
    be missing, the daemon fails closed.

    The daemon's own workers need no key: they talk over pipes they inherited
    (``pipelink``). Without keys, everything is admitted (an ipc folder, or
    ``--insecure``)."""

    ZAP_ENDPOINT = "inproc://zeromq.zap.01"
    DOMAINS = {CLIENTS: ZAP_DOMAIN, WORKERS: ZAP_DOMAIN + b"-workers"}

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], keys: ServerKeys | None,
                 zap: bool = True):
        self.ctx = ctx
        self.keys = keys
        self.zap = zap
        self.zap_socket: zmq.Socket[bytes] | None = None
        self.allowed: dict[str, set[str]] = {CLIENTS: set(), WORKERS: set()}
        self.refused = 0
        if keys is not None:
            self.allowed[CLIENTS] = {k.decode("ascii") for k in keys.authorized}
            self.allowed[WORKERS] = {k.decode("ascii") for k in keys.workers}
        self.by_domain = {domain: self.allowed[role] for role, domain in self.DOMAINS.items()}

    def start(self) -> None:
        """Bind the ZAP handler socket (before any CURVE socket binds)."""
        if self.keys is None or not self.zap:
            return
        self.zap_socket = self.ctx.socket(zmq.ROUTER)
        self.zap_socket.setsockopt(zmq.LINGER, 0)
        self.zap_socket.bind(self.ZAP_ENDPOINT)

    def stop(self) -> None:
        if self.zap_socket is not None:
            self.zap_socket.close(linger=0)
            self.zap_socket = None

    def handle_zap(self) -> None:
        """Answer every pending ZAP request: 200 with the z85 key as User-Id for a CURVE
        key authorized on the requesting socket's role, 400 for anything else."""
        assert self.zap_socket is not None
        while True:
            try:
                frames = self.zap_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # [peer, b"", version, request id, domain, address, identity, mechanism, key]
            if len(frames) < 8:
                continue
            peer, request_id, domain, mechanism = frames[0], frames[3], frames[4], frames[7]
            allowed = self.by_domain.get(domain, set())
            user = b""
            if mechanism == b"CURVE" and len(frames) >= 9 and len(frames[8]) == 32:
                key = zmq.utils.z85.encode(frames[8])
                if key.decode("ascii") in allowed:
                    user = key
            if not user:
                self.refused += 1
            status = (b"200", b"OK") if user else (b"400", b"not authorized")
            self.zap_socket.send_multipart([peer, b"", b"1.0", request_id, *status, user, b""])

    def secure(self, sock: zmq.Socket[bytes], role: str) -> None:
        """Make ``sock`` a CURVE server for the keys of ``role`` (before it binds)."""
        if self.keys is not None:
            serve_with(sock, self.keys)
            sock.zap_domain = self.DOMAINS[role]

    def user(self, frames: list[zmq.Frame], role: str) -> str | None:
        """The authenticated key (z85) a received message (identity frame first) came
        with, when it is authorized for ``role``; else None. Without keys: "" for all."""
        if self.keys is None:
            return ""
        if len(frames) < 2:
            return None
        try:
            user = frames[1].get("User-Id")
        except (zmq.ZMQError, AttributeError, TypeError):
            return None
        return user if isinstance(user, str) and user in self.allowed[role] else None

    def admits(self, frames: list[zmq.Frame], role: str) -> bool:
        """Whether a received message comes from a key authorized for ``role``."""
        return self.user(frames, role) is not None
