"""Wheel files and requirement specs, as the node bundle needs them: the target's
platform tags and marker environment, what this Python has installed, a wheel's name,
version and requirements, a requirements file's specs, and an installed pure-Python
distribution repacked as a wheel."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

#: Timestamp of every member of a repacked wheel (reproducible bytes).
EPOCH = (2020, 2, 2, 0, 0, 0)


class BundleError(Exception):
    """A bundle that cannot be built or does not check out; the message says why."""


def local_platform() -> str:
    """This machine's wheel platform tag: ``manylinux_2_X_<arch>`` on glibc Linux (X this
    glibc's minor), else ``sysconfig``'s platform in wheel form."""
    import platform as _platform
    import sysconfig

    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    if plat.startswith("linux_"):
        libc, version = _platform.libc_ver()
        match = re.match(r"(\d+)\.(\d+)", version)
        if libc == "glibc" and match:
            return f"manylinux_{match.group(1)}_{match.group(2)}_{plat[len('linux_'):]}"
    return plat


def platform_tags(platform: str) -> list[str]:
    """The wheel platform tags a node of ``platform`` runs, most specific first: a
    ``manylinux_2_X_<arch>`` node runs every older glibc's wheels (and their legacy
    names), a ``musllinux_1_X_<arch>`` one every older musl's; others only their own."""
    match = re.fullmatch(r"(manylinux|musllinux)_(\d+)_(\d+)_(\w+)", platform)
    if not match:
        return [platform]
    kind, major, minor, arch = match.group(1), int(match.group(2)), int(match.group(3)), \
        match.group(4)
    if kind == "musllinux":
        return [f"musllinux_{major}_{m}_{arch}" for m in range(minor, -1, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags = []
    for m in range(minor, 4, -1) if major == 2 else [minor]:
        tags.append(f"manylinux_{major}_{m}_{arch}")
        # manylinux1 and 2010 exist only for x86; manylinux2014 for every arch
        if major == 2 and m in legacy and (m == 17 or arch in ("x86_64", "i686")):
            tags.append(f"{legacy[m]}_{arch}")
    return tags


def wheel_from_distribution(dist: metadata.Distribution, folder: Path) -> Path:
    """Repack an installed pure-Python distribution into a wheel in ``folder`` (its files
    as installed, minus bytecode and the installer's own records) and return its path."""
    name = canonical(dist.metadata["Name"]).replace("-", "_")
    version = dist.version
    info = f"{name}-{version}.dist-info"
    skip_info = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    members: dict[str, bytes] = {}
    for file in dist.files or []:
        parts = file.parts
        if "__pycache__" in parts or file.suffix in (".pyc", ".pyo") or parts[0] == "..":
            continue
        if parts[0].endswith(".dist-info"):
            if file.name in skip_info:
                continue
            arcname = f"{info}/{'/'.join(parts[1:])}"
        else:
            arcname = "/".join(parts)
        members[arcname] = Path(str(dist.locate_file(file))).read_bytes()
    if f"{info}/METADATA" not in members:
        raise BundleError(f"{name} {version}: the installed distribution has no METADATA")
    members.setdefault(f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: deathstar\n"
                                         b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    record = io.StringIO()
    for arcname in sorted(members):
        data = members[arcname]
        digest = b64(hashlib.sha256(data).digest())
        record.write(f"{arcname},sha256={digest},{len(data)}\n")
    record.write(f"{info}/RECORD,,\n")
    members[f"{info}/RECORD"] = record.getvalue().encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname in sorted(members, key=lambda a: (a.startswith(info), a)):
            zi = zipfile.ZipInfo(arcname, EPOCH)
            zi.external_attr = 0o644 << 16
            zf.writestr(zi, members[arcname], zipfile.ZIP_DEFLATED)
    return path


def packaging_tools() -> tuple[Any, Any]:
    """packaging's Requirement and InvalidRequirement: the real package when installed,
    else the copy inside pip (which building a bundle needs anyway)."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import (  # type: ignore[assignment]
                InvalidRequirement, Requirement)
        except ImportError:
            raise BundleError("building a bundle needs pip (or packaging) in "
                              f"{sys.executable}") from None
    return Requirement, InvalidRequirement


def marker_env(platform: str, python: str) -> dict[str, str]:
    """PEP 508 marker values of a CPython ``python`` node on ``platform``."""
    if platform.startswith(("manylinux", "musllinux", "linux")):
        sys_platform, system, os_name = "linux", "Linux", "posix"
    elif platform.startswith("macosx"):
        sys_platform, system, os_name = "darwin", "Darwin", "posix"
    elif platform.startswith("win"):
        sys_platform, system, os_name = "win32", "Windows", "nt"
    else:
        sys_platform, system, os_name = platform, platform, "posix"
    machine = next((m for m in ("x86_64", "aarch64", "arm64", "i686", "ppc64le", "s390x",
                                "armv7l", "amd64") if platform.endswith(m)), "")
    machine = {"amd64": "AMD64"}.get(machine, machine)
    return {"python_version": python, "python_full_version": f"{python}.0",
            "implementation_name": "cpython", "implementation_version": f"{python}.0",
            "platform_python_implementation": "CPython", "sys_platform": sys_platform,
            "platform_system": system, "os_name": os_name, "platform_machine": machine,
            "platform_release": "", "platform_version": ""}


def installed() -> dict[str, metadata.Distribution]:
    """Canonical name -> the distribution this client imports (first on sys.path)."""
    out: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(canonical(name), dist)
    return out


def wheel_requires(path: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(path) as zf:
        name = next((n for n in zf.namelist()
                     if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)), None)
        if name is None:
            raise BundleError(f"{path.name}: no METADATA")
        text = zf.read(name).decode("utf-8")
    from email.parser import HeaderParser

    return HeaderParser().parsestr(text).get_all("Requires-Dist") or []


def read_requirements(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise BundleError(f"--requirements {path}: {exc.strerror}") from None
    specs = []
    for number, raw in enumerate(lines, 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise BundleError(f"{path}, line {number}: {line!r}: option lines are not "
                              "supported in a bundle's requirements (give specs only)")
        specs.append(line)
    return specs


def wheel_name_version(filename: str) -> tuple[str, str]:
    parts = filename[:-len(".whl")].split("-")
    if not filename.endswith(".whl") or len(parts) < 5:
        raise BundleError(f"{filename}: not a wheel file name")
    return canonical(parts[0]), parts[1]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def b64(digest: bytes) -> str:

    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
