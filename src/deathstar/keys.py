"""CurveZMQ keys: making them, finding them, checking their permissions, and putting them
on sockets.

A key folder (``deathstar keygen``; default ``<config folder>/keys``) holds::

    node.key  node.key_secret        the daemon's keypair
    client.key  client.key_secret    this user's keypair (clients and hand-started workers)
    authorized/*.key                 public keys a daemon serves (keygen puts client.key here)
    nodes/HOST.key, nodes/HOST_PORT.key   optional: the public key of one node, when nodes
                                     do not share node.key

Secret files must be 0600 and folders not writable or readable by others: a daemon (and
a client) refuses keys with loose permissions, naming the file.
"""

from __future__ import annotations

import os
import shutil
import stat
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


def resolve_dir(explicit: str | Path | None, role: str) -> Path | None:
    """The key folder to use: ``explicit``, else ``$DEATHSTAR_KEYS``, else the config
    file's ``keys``, else the default folder when it holds ``role``'s secret key; None
    means no keys (``none`` too)."""
    chosen = explicit if explicit is not None else (
        os.environ.get("DEATHSTAR_KEYS") or config.file_keys_dir())
    if chosen is not None:
        return None if str(chosen) == NO_KEYS else Path(chosen).expanduser()
    default = default_dir()
    return default if (default / f"{role}.key_secret").exists() else None


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
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
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
    """Refuse a secret file others can read or write, and a folder others can write
    (someone who can write ``authorized/`` can let themselves in)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}") from None
    loose = mode & (0o077 if secret else 0o022)
    if loose:
        fix = "chmod 600" if secret and not stat.S_ISDIR(mode) else "chmod 700"
        raise KeyFileError(f"{path} has loose permissions ({stat.filemode(mode)}): others can "
                        f"{'read or write' if secret else 'write'} it; run: {fix} {path}")


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
    authorized: frozenset[bytes]
    folder: Path


def load_server_keys(folder: Path) -> ServerKeys:
    public, secret = _load_pair(folder, NODE)
    auth_dir = folder / AUTHORIZED
    check_permissions(auth_dir, secret=False)
    authorized = frozenset(_load_public(p) for p in sorted(auth_dir.glob("*.key")))
    if not authorized:
        raise KeyFileError(f"{auth_dir} holds no public key: nobody could use this daemon; "
                        "copy clients' client.key files there")
    return ServerKeys(public, secret, authorized, folder)


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


class Gatekeeper:
    """A daemon's door. With keys, every socket is a CURVE server, and the daemon's own
    loop answers ZAP (RFC 27) requests on ``zap_socket``: only authorized public keys get
    in, with their key as ``User-Id``. ``admits`` checks each message's ``User-Id`` again,
    because CURVE without a ZAP handler accepts anyone who knows the node's public key:
    should the handler ever be missing, the daemon fails closed.

    The daemon's own workers get an ephemeral keypair (through their environment) that
    is admitted too. Without keys, everything is admitted (loopback or ``--insecure``).
    """

    WORKER_ENV = "DEATHSTAR_WORKER_CURVE"
    ZAP_ENDPOINT = "inproc://zeromq.zap.01"

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], keys: ServerKeys | None,
                 zap: bool = True):
        self.ctx = ctx
        self.keys = keys
        self.zap = zap
        self.zap_socket: zmq.Socket[bytes] | None = None
        self.allowed: set[str] = set()
        self.worker_pair: tuple[bytes, bytes] | None = None
        self.refused = 0
        if keys is not None:
            self.worker_pair = zmq.curve_keypair()
            self.allowed = {k.decode("ascii") for k in keys.authorized}
            self.allowed.add(self.worker_pair[0].decode("ascii"))

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
        """Answer every pending ZAP request: 200 with the z85 key as User-Id for an
        authorized CURVE key, 400 for anything else."""
        assert self.zap_socket is not None
        while True:
            try:
                frames = self.zap_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # [peer, b"", version, request id, domain, address, identity, mechanism, key]
            if len(frames) < 8:
                continue
            peer, request_id, mechanism = frames[0], frames[3], frames[7]
            user = b""
            if mechanism == b"CURVE" and len(frames) >= 9 and len(frames[8]) == 32:
                key = zmq.utils.z85.encode(frames[8])
                if key.decode("ascii") in self.allowed:
                    user = key
            if not user:
                self.refused += 1
            status = (b"200", b"OK") if user else (b"400", b"not authorized")
            self.zap_socket.send_multipart([peer, b"", b"1.0", request_id, *status, user, b""])

    def secure(self, sock: zmq.Socket[bytes]) -> None:
        if self.keys is not None:
            serve_with(sock, self.keys)

    def admits(self, frames: list[zmq.Frame]) -> bool:
        """Whether a received message (identity frame first) comes from an authorized
        key. Without keys: always."""
        if self.keys is None:
            return True
        if len(frames) < 2:
            return False
        try:
            user = frames[1].get("User-Id")
        except (zmq.ZMQError, AttributeError, TypeError):
            return False
        return isinstance(user, str) and user in self.allowed

    def worker_env(self) -> dict[str, str]:
        """Environment for a local worker: its keypair and the node's public key."""
        if self.keys is None or self.worker_pair is None:
            return {}
        public, secret = self.worker_pair
        # z85 keys use ':' among their characters, never ','
        return {self.WORKER_ENV: b",".join((public, secret, self.keys.public)).decode()}


def worker_curve_from_env() -> tuple[bytes, bytes, bytes] | None:
    """A local worker's (public, secret, server public) from its daemon, if any."""
    raw = os.environ.pop(Gatekeeper.WORKER_ENV, "")
    parts = raw.encode().split(b",")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None
