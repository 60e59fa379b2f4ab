#!/usr/bin/python3
"""A stand-in for ``systemctl`` inside the boot test's disposable root, where systemd does
not run. Copied to ``/usr/local/sbin/systemctl`` there (early on PATH).

- ``daemon-reload``, ``stop UNIT``, ``poweroff``: do nothing, succeed;
- ``enable --now UNIT`` / ``start UNIT``: start the unit's ``ExecStart`` the way systemd
  would for a ``Type=simple`` service: as its ``User=``/``Group=`` (with that user's
  groups), in its ``WorkingDirectory=``, with only its ``Environment=``, its ``UMask=``,
  ``NoNewPrivileges=`` through ``PR_SET_NO_NEW_PRIVS``, in a session of its own, output to
  ``/var/log/UNIT.log``; return once it is started. The other hardening settings (the
  mount namespace of ProtectSystem and friends) are not applied: the test checks them in
  the unit's text.
"""

import ctypes
import os
import pwd
import shlex
import sys

UNIT_DIR = "/etc/systemd/system"
PR_SET_NO_NEW_PRIVS = 38


def service_section(unit: str) -> dict[str, str]:
    values: dict[str, str] = {}
    section = ""
    with open(os.path.join(UNIT_DIR, unit)) as fh:
        for raw in fh:
            line = raw.strip()
            if line.startswith("["):
                section = line
            elif section == "[Service]" and "=" in line:
                key, _, value = line.partition("=")
                values[key] = value
    return values


def start(unit: str) -> int:
    service = service_section(unit)
    argv = shlex.split(service["ExecStart"])
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    for pair in shlex.split(service.get("Environment", "")):
        key, _, value = pair.partition("=")
        env[key] = value
    user = pwd.getpwnam(service.get("User", "root"))
    log = os.open(f"/var/log/{unit}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    pid = os.fork()
    if pid:
        os.close(log)
        return 0
    try:
        os.setsid()
        os.dup2(log, 1)
        os.dup2(log, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.closerange(3, 65536)  # nothing of the caller's (its pipes) stays open
        os.chdir(service.get("WorkingDirectory", "/"))
        os.umask(int(service.get("UMask", "0022"), 8))
        os.initgroups(user.pw_name, user.pw_gid)
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
        if service.get("NoNewPrivileges") == "yes":
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        os.execve(argv[0], argv, env)
    except BaseException as exc:  # the child must never return into the caller
        os.write(2, f"systemctl stand-in: {exc}\n".encode())
    os._exit(127)


def main(args: list[str]) -> int:
    words = [a for a in args if not a.startswith("-")]
    if not words:
        return 1
    command, units = words[0], words[1:]
    if command in ("daemon-reload", "stop", "poweroff"):
        return 0
    if command == "enable" and "--now" not in args:
        return 0
    if command in ("enable", "start", "restart"):
        return max((start(u) for u in units), default=0)
    print(f"systemctl stand-in: {command} is not supported", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
