"""Who may reach a daemon: the rule for where it may listen without keys.

A daemon runs whatever its exec port is sent, as its own user. Without keys (CurveZMQ)
anyone who can reach the port can do that, so a keyless daemon listens only on loopback
or on its private ipc folder, unless the operator says ``insecure`` for a network they
trust. The rule lives here, in the daemon, so that a daemon started from Python is held
to it as one started by ``deathstar daemon``.
"""

from __future__ import annotations

import ipaddress
import socket

from deathstar.keys import ServerKeys


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

    Returns a warning to show the operator (a keyless daemon on a network address that
    ``insecure`` allowed), else None. Raises ``UnsafeBind`` for a keyless daemon on a
    network address without ``insecure``."""
    if keys is not None or ipc is not None or is_loopback(host):
        return None
    if not insecure:
        raise UnsafeBind(
            f"refusing to listen on {host} without keys: anyone who can reach it could run "
            "code here. Make keys with 'deathstar keygen' (then --keys DIR), listen on "
            "127.0.0.1, or pass --insecure on a network you trust.")
    return (f"listening on {host} with no authentication (--insecure): anyone who can "
            "reach these ports can run code as this user.")
