"""Who may reach a daemon: the rule for when it may listen without keys.

A daemon runs whatever its exec port is sent, as its own user. Without keys (CurveZMQ)
anyone who can reach the port can do that, loopback included: every local user reaches
127.0.0.1. So a daemon on TCP always uses CURVE; when its user has no keys yet, the
first daemon makes them in the config folder (as a notebook server makes its token) and
says where. ``insecure`` is the one way to plaintext TCP, on any address, and is
warned about at every start. Only an ipc folder (the embedded cluster's private one) may
go keyless without it. The rule lives here, in the daemon, so that a daemon started from
Python is held to it as one started by ``deathstar daemon``.
"""

from __future__ import annotations

import ipaddress
import socket

from pathlib import Path

from deathstar.keys import (NO_KEYS, NODE, ServerKeys, chosen_dir, default_dir, ensure_keys,
                            load_server_keys)


class UnsafeBind(ValueError):
    """A daemon was asked to listen where strangers reach it, without keys."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def check_bind(host: str, keys: ServerKeys | None, *, insecure: bool = False,
               ipc: str | None = None) -> str | None:
    """Check that a daemon may listen on ``host`` (or the ipc folder ``ipc``) with ``keys``.

    Returns a warning to show the operator at every start (a keyless TCP daemon that
    ``insecure`` allowed), else None. Raises ``UnsafeBind`` for a keyless TCP daemon
    without ``insecure``, whatever the address (loopback is every local user's too)."""
    if keys is not None or ipc is not None:
        return None
    if not insecure:
        where = "loopback, which every user of this machine reaches" if is_loopback(host) \
            else host
        raise UnsafeBind(
            f"refusing to listen on {where} without keys: anyone who can reach it could "
            "run code here. Leave --keys out to use (or make) your keys, make some with "
            "'deathstar keygen' (then --keys DIR), or pass --insecure.")
    return (f"listening on {host} with no authentication (--insecure): anyone who can "
            "reach these ports can run code as this user, and can serve as a worker whose "
            "results run code in the clients.")


def daemon_keys(option: str | Path | None, *, ipc: str | None = None,
                insecure: bool = False) -> tuple[ServerKeys | None, str | None]:
    """The keys a daemon serves with, and a note for the operator (or None).

    ``option`` as ``--keys``: a folder, ``none``, or None for ``$DEATHSTAR_KEYS``, the
    config file's ``keys``, else the default folder. With nothing chosen and no default
    keys, an ipc or ``insecure`` daemon goes keyless; any other is given keys made in the
    default folder, and the note says where. ``check_bind`` then judges the result.
    Raises ``KeyFileError`` for keys missing, not the user's, or open to others."""
    chosen = chosen_dir(option)
    if chosen == NO_KEYS:
        return None, None
    if chosen is not None:
        return load_server_keys(Path(chosen)), None
    default = default_dir()
    if (default / f"{NODE}.key_secret").exists():
        return load_server_keys(default), None
    if ipc is not None or insecure:
        return None, None
    ensure_keys(default)
    return load_server_keys(default), (
        f"made keys in {default} (the first start without keys): a client on another "
        f"machine needs a copy of {default / 'node.key'}, and its client.key in "
        f"{default / 'authorized'}")
