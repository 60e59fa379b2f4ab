"""The node bundle: everything a node needs to run the deathstar this client runs, offline.

``build_bundle(platform, python)`` makes, for one target platform (a wheel platform tag such
as ``manylinux_2_28_x86_64``) and one Python minor (``"3.12"``), a folder holding:

- the wheel of the running deathstar (built from its source tree for a source or editable
  checkout, else repacked from the installed distribution's files);
- wheels of its dependencies at **exactly** the versions this client has installed (a
  cloudpickle or msgpack skew breaks pickles; the others follow so a node is the client);
  a dependency only the target needs (``tomli`` below 3.11) is the newest its
  requirement allows;
- wheels of what the user asked for (``pip`` specs and a requirements file), and their
  dependencies: at the client's version when the client has one that fits, else the newest;
- ``manifest.json`` (what is in it and why), ``install.sh`` (the node's offline install)
  and ``SHA256SUMS`` (every other file's sha256, in ``sha256sum`` format).

The bundle is named by its content hash, ``sha256(SHA256SUMS)``: the same files give the
same name wherever they were built. It is kept in the cache folder
(``config.cache_dir()/bundles/<sha256>/``) with a single-file tar of it beside
(``<sha256>.tar``, for an upload), and found again from its inputs without a rebuild.

On a node, unpack the tar and run ``sh install.sh SHA256 VENV PYTHON`` (see
``Bundle.install_command``): it checks the hash of SHA256SUMS, then every file against it
(and that no file was added), then makes the venv and installs with ``pip install
--no-index --find-links`` (never an index). Wheels are fetched on the client with ``pip
download --only-binary=:all: --platform P --python-version X.Y --implementation cp
--no-deps``, so nothing is ever built on, or downloaded by, a node.

Building needs pip in this Python (it is what fetches the wheels) and a route to the
package sources pip is configured with; nodes need neither.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from deathstar import config
from deathstar._version import __version__
from deathstar.deploy.wheels import (BundleError, canonical, installed,
                                     local_platform, marker_env, packaging_tools,
                                     platform_tags, read_requirements, sha256_file,
                                     wheel_from_distribution, wheel_name_version,
                                     wheel_requires)

#: The distribution name of deathstar on package indexes (the import package is deathstar).
DIST_NAME = "deathstar-cluster"

#: The import package whose distribution is bundled.
PACKAGE = "deathstar"

#: Bumped when the bundle's layout changes, so that old cache entries are not reused.
BUNDLE_FORMAT = 1

#: Files of a bundle besides the wheels.
MANIFEST, SUMS, INSTALL_SCRIPT = "manifest.json", "SHA256SUMS", "install.sh"

#: The distributions deathstar itself needs on a node (named in errors and the manifest).
CORE = ("pyzmq", "msgpack", "cloudpickle", "typer", "rich")

#: Seconds one pip call (a wheel build or a download of many wheels) may take.
PIP_TIMEOUT_S = config._env_float("BUNDLE_PIP_TIMEOUT", 600.0)

#: Timestamp of every member of the tar (reproducible bytes).
_EPOCH_S = 1580601600


class MissingWheel(BundleError):
    """No binary wheel of ``package`` for ``platform`` and CPython ``python``."""

    def __init__(self, package: str, platform: str, python: str, detail: str = ""):
        self.package, self.platform, self.python = package, platform, python
        super().__init__(
            f"no binary wheel of {package} for platform {platform}, CPython {python}"
            + (f": {detail}" if detail else "")
            + ". Nodes install offline and never build from source, so every package needs"
              " a wheel for the node's platform and Python.")


@dataclass(frozen=True)
class Bundle:
    """A built bundle in the cache. ``sha256`` names it; ``archive_sha256`` checks a
    download of ``archive`` before it is unpacked."""

    path: Path             # the folder: wheels, manifest.json, install.sh, SHA256SUMS
    archive: Path          # <sha256>.tar beside it: the folder's files, one file to upload
    sha256: str            # sha256 of SHA256SUMS, which lists every other file's sha256
    archive_sha256: str    # sha256 of the archive's bytes
    platform: str
    python: str
    manifest: dict[str, Any] = field(repr=False)
    cached: bool = False   # found in the cache (nothing was built or downloaded)

    @property
    def size_bytes(self) -> int:
        """The archive's size (what a node downloads)."""
        return self.archive.stat().st_size

    @property
    def versions(self) -> dict[str, str]:
        """Distribution name (canonical) -> version of every wheel in it."""
        return {w["name"]: w["version"] for w in self.manifest["wheels"]}

    def install_command(self, venv: str = "/opt/deathstar/venv",
                        python: str = "python3") -> str:
        """The shell command a node runs in the unpacked folder: verify, then install
        offline into ``venv`` made with ``python`` (which must be the bundle's minor)."""
        return f"sh install.sh {self.sha256} {_sh_quote(venv)} {_sh_quote(python)}"


def build_bundle(platform: str | None = None, python: str | None = None, *,
                 pip: Sequence[str] = (), requirements: str | Path | None = None,
                 cache_dir: str | Path | None = None, refresh: bool = False) -> Bundle:
    """Build (or find in the cache) the bundle for ``platform`` (a wheel platform tag;
    default this machine's, ``local_platform()``) and CPython ``python`` ("3.12";
    default this one's).

    ``pip``: extra requirement specs; ``requirements``: a requirements file of specs (one a
    line; ``#`` comments; no option lines). ``cache_dir``: default
    ``config.cache_dir()``. ``refresh``: build again even if the cache has it (user specs
    without a version are resolved once, then cached).

    Blocks while pip builds and downloads. Raises ``MissingWheel`` naming the package,
    platform and Python when a wheel cannot be had (nothing is left in the cache), and
    ``BundleError`` for anything else that stops the build (pip's message included)."""
    platform = platform or local_platform()
    python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    if not re.fullmatch(r"3\.\d{1,2}", python):
        raise BundleError(f"python {python!r}: give a CPython minor such as 3.12")
    root = Path(cache_dir).expanduser() if cache_dir is not None else config.cache_dir()
    bundles = root / "bundles"
    user_specs = list(pip) + (read_requirements(Path(requirements)) if requirements else [])
    source = _deathstar_source()
    key = _cache_key(source, platform, python, user_specs)
    key_file = root / "keys" / f"{key}.json"
    if not refresh:
        found = _from_cache(bundles, key_file)
        if found is not None:
            return found
    bundles.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=bundles))
    try:
        folder = work / "bundle"
        folder.mkdir()
        own = _deathstar_wheel(source, folder)
        wheels = _gather(own, platform, python, user_specs, folder)
        manifest = _manifest(platform, python, user_specs, wheels)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        (folder / INSTALL_SCRIPT).write_text(_install_script(python, manifest))
        sums = "".join(f"{sha256_file(folder / name)}  {name}\n"
                       for name in sorted(p.name for p in folder.iterdir()))
        (folder / SUMS).write_text(sums)
        digest = hashlib.sha256(sums.encode()).hexdigest()
        final = bundles / digest
        try:
            os.replace(folder, final)
        except OSError:  # another build made the same bundle meanwhile: keep that one
            if not final.is_dir():
                raise
        archive = bundles / f"{digest}.tar"
        if not archive.exists():
            _write_tar(final, work / "bundle.tar")
            os.replace(work / "bundle.tar", archive)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps({"sha256": digest}) + "\n")
    return _load(final, archive, cached=False)


def verify_bundle(folder: str | Path, sha256: str) -> None:
    """Check an unpacked bundle: SHA256SUMS hashes to ``sha256``, every file matches it,
    and no file is there that it does not list. Raises ``BundleError`` naming the first
    file that does not; returns None when all is well (the same checks as install.sh)."""
    folder = Path(folder)
    sums_path = folder / SUMS
    try:
        sums = sums_path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{folder}: no {SUMS}; not a deathstar bundle") from None
    actual = hashlib.sha256(sums).hexdigest()
    if actual != sha256:
        raise BundleError(f"{sums_path}: sha256 is {actual}, expected {sha256}; the bundle "
                          "was altered or is another one")
    listed: dict[str, str] = {}
    for line in sums.decode().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{path}: listed in {SUMS} but missing")
        if sha256_file(path) != digest:
            raise BundleError(f"{path}: sha256 does not match {SUMS}; the file was altered")
    extra = sorted(p.name for p in folder.iterdir() if p.name not in listed and p.name != SUMS)
    if extra:
        raise BundleError(f"{folder}: {extra[0]} is not listed in {SUMS}; the bundle was "
                          "altered")



# --- what is bundled --------------------------------------------------------------------

@dataclass(frozen=True)
class _Source:
    """Where the running deathstar's wheel comes from, and a hash of it (the cache key)."""

    tree: Path | None                 # a source checkout (pyproject.toml), else None
    dist: metadata.Distribution | None
    digest: str


@dataclass
class _Wheel:
    name: str        # canonical distribution name
    version: str
    file: str
    why: str         # "deathstar", "client" (the client's version), "target", "user"


def _deathstar_source() -> _Source:
    package_dir = Path(__file__).resolve().parent.parent  # src/deathstar (deploy's parent)
    tree = package_dir.parent.parent
    pyproject = tree / "pyproject.toml"
    if package_dir.parent.name == "src" and pyproject.is_file() \
            and re.search(rf'^name\s*=\s*"{re.escape(DIST_NAME)}"', pyproject.read_text(),
                          re.MULTILINE):
        h = hashlib.sha256()
        files = [pyproject, tree / "README.md", *sorted(package_dir.rglob("*"))]
        for path in files:
            if path.is_file() and "__pycache__" not in path.parts \
                    and path.suffix not in (".pyc", ".pyo"):
                h.update(str(path.relative_to(tree)).encode() + b"\0")
                h.update(path.read_bytes() + b"\0")
        return _Source(tree, None, h.hexdigest())
    try:
        dist = metadata.distribution(DIST_NAME)
    except metadata.PackageNotFoundError:
        raise BundleError(f"deathstar at {package_dir} is neither a source checkout nor an "
                          f"installed {DIST_NAME} distribution; cannot bundle it") from None
    record = dist.read_text("RECORD") or ""
    return _Source(None, dist, hashlib.sha256(record.encode()).hexdigest())


def _deathstar_wheel(source: _Source, folder: Path) -> _Wheel:
    if source.tree is not None:
        _pip("wheel", "--no-deps", "--quiet", "--wheel-dir", str(folder), str(source.tree),
             what=f"building the wheel of {source.tree}")
        built = sorted(folder.glob("*.whl"))
        if len(built) != 1:
            raise BundleError(f"building {source.tree} gave {len(built)} wheels")
        path = built[0]
    else:
        assert source.dist is not None
        path = wheel_from_distribution(source.dist, folder)
    name, version = wheel_name_version(path.name)
    return _Wheel(name, version, path.name, "deathstar")



def _gather(own: _Wheel, platform: str, python: str, user_specs: list[str],
            folder: Path) -> list[_Wheel]:
    """Fetch the closure of deathstar's and the user's requirements for the target into
    ``folder``: installed distributions at the client's versions (all in one pip call),
    others at the newest their requirement allows (then their requirements in turn)."""
    Requirement, InvalidRequirement = packaging_tools()
    env = marker_env(platform, python)
    have = installed()
    chosen: dict[str, _Wheel] = {own.name: own}
    pending: list[tuple[Any, str]] = [(Requirement(r), "client") for r in
                                      wheel_requires(folder / own.file)]
    for spec in user_specs:
        try:
            pending.append((Requirement(spec), "user"))
        except InvalidRequirement as exc:
            raise BundleError(f"--pip {spec!r}: {exc}") from None
    while pending:
        pins: dict[str, tuple[str, str]] = {}  # name -> (pip spec, why)
        for req, why in pending:
            name = canonical(req.name)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                continue
            if name in chosen or name in pins:
                continue  # first come: deathstar's own pins, then the user's
            dist = have.get(name)
            if dist is not None and req.specifier.contains(dist.version, prereleases=True):
                pins[name] = (f"{name}=={dist.version}", "client" if why != "user" else "user")
            else:
                pins[name] = (f"{name}{req.specifier}" if req.specifier else name,
                              "target" if why != "user" else "user")
        pending = []
        if not pins:
            break
        for file in _download([s for s, _ in pins.values()], platform, python, folder,
                              user_specs):
            name, version = wheel_name_version(file)
            if name in chosen or name not in pins:
                continue
            why = pins[name][1]
            chosen[name] = _Wheel(name, version, file, why)
            dist = have.get(name)
            requires = (dist.requires or []) if dist is not None and dist.version == version \
                else wheel_requires(folder / file)
            pending.extend((Requirement(r), why) for r in requires)
        missing = sorted(set(pins) - set(chosen))
        if missing:
            raise BundleError(f"pip downloaded no wheel for {', '.join(missing)}")
    return sorted(chosen.values(), key=lambda w: w.name)


def _download(specs: list[str], platform: str, python: str, folder: Path,
              user_specs: Sequence[str] = ()) -> list[str]:
    """``pip download --no-deps`` the ``specs`` for the target into ``folder``; the names
    of the wheel files it fetched (or found already there)."""
    report = folder.parent / "pip-report.txt"
    try:
        _pip("download", "--no-deps", "--only-binary=:all:",
             *[a for tag in platform_tags(platform) for a in ("--platform", tag)],
             "--python-version", python, "--implementation", "cp", "--dest", str(folder),
             "--progress-bar", "off", "--quiet", *specs,
             what=f"downloading wheels for {platform}, CPython {python}", log=report)
    except BundleError as exc:
        match = re.search(r"(?:No matching distribution found for|satisfies the "
                          r"requirement) ([A-Za-z0-9._-]+)(\S*)", str(exc))
        if match:
            name = canonical(match.group(1))
            spec = next((s for s in specs if canonical(re.split(r"[=<>!~\[; ]", s)[0])
                         == name), name)
            pinned = "==" in spec and not any(s == spec for s in user_specs)
            reason = ("the version this client runs; " if pinned else "") \
                + _pip_reason(str(exc))
            raise MissingWheel(spec, platform, python, reason) from None
        raise
    wanted = {canonical(re.split(r"[=<>!~\[; ]", s)[0]) for s in specs}
    return sorted(p.name for p in folder.glob("*.whl")
                  if wheel_name_version(p.name)[0] in wanted)


def _pip_reason(text: str) -> str:
    match = re.search(r"\(from versions: ([^)]*)\)", text)
    versions = [v.strip() for v in match.group(1).split(",")
                if v.strip() and v.strip() != "none"] if match else []
    if not versions:
        return "pip found no version at all for it"
    if len(versions) > 6:
        versions = versions[:2] + ["..."] + versions[-3:]
    return f"pip found only {', '.join(versions)}"


def _manifest(platform: str, python: str, user_specs: list[str],
              wheels: list[_Wheel]) -> dict[str, Any]:
    return {
        "format": BUNDLE_FORMAT,
        "platform": platform,
        "python": python,
        "implementation": "cp",
        "deathstar": {"dist": DIST_NAME, "version": __version__},
        "built_by": {"python": ".".join(map(str, sys.version_info[:3])),
                     "platform": local_platform()},
        "user_specs": user_specs,
        # what install.sh asks pip for; the rest comes in as their dependencies
        "install": [f"{w.name}=={w.version}" for w in wheels
                    if w.why in ("deathstar", "user")],
        "wheels": [{"name": w.name, "version": w.version, "file": w.file, "source": w.why}
                   for w in wheels],
    }


# --- the node's side --------------------------------------------------------------------

_INSTALL_SH = r'''#!/bin/sh
# Install this deathstar bundle offline. Usage: sh install.sh SHA256 VENV [PYTHON]
# Checks that SHA256SUMS hashes to SHA256, that every file matches it and that none was
# added; then makes VENV with PYTHON (CPython @PYTHON@) and installs from this folder only.
set -eu
expected=$1
venv=$2
python=${3:-python3}
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
fail() { echo "deathstar bundle: $*" >&2; exit 1; }
actual=$(sha256sum SHA256SUMS | cut -d' ' -f1)
[ "$actual" = "$expected" ] || fail "SHA256SUMS hashes to $actual, expected $expected: the bundle was altered or is another one; not installing"
sha256sum --check --strict --quiet SHA256SUMS >&2 || fail "a file does not match SHA256SUMS: the bundle was altered; not installing"
listed=$(cut -c67- SHA256SUMS | sort)
present=$(ls -A | grep -vx SHA256SUMS | sort)
[ "$listed" = "$present" ] || fail "files not listed in SHA256SUMS are present: the bundle was altered; not installing"
minor=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$minor" = "@PYTHON@" ] || fail "$python is Python $minor; this bundle is for @PYTHON@"
"$python" -m venv "$venv"
PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip install --no-index --find-links "$here" \
    --disable-pip-version-check --no-input --quiet @INSTALL@
echo "deathstar bundle $expected installed in $venv"
'''


def _install_script(python: str, manifest: dict[str, Any]) -> str:
    specs = " ".join(_sh_quote(s) for s in manifest["install"])
    return _INSTALL_SH.replace("@PYTHON@", python).replace("@INSTALL@", specs)


# --- cache ------------------------------------------------------------------------------

def _cache_key(source: _Source, platform: str, python: str, user_specs: list[str]) -> str:
    """A hash of everything that decides a bundle's contents, known before building it:
    deathstar's source, the client's installed versions, the target, the user's specs."""
    versions = sorted(f"{n}=={d.version}" for n, d in installed().items())
    blob = json.dumps({"format": BUNDLE_FORMAT, "source": source.digest,
                       "platform": platform, "python": python, "specs": user_specs,
                       "installed": versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _from_cache(bundles: Path, key_file: Path) -> Bundle | None:
    try:
        digest = json.loads(key_file.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    folder, archive = bundles / str(digest), bundles / f"{digest}.tar"
    if not (folder.is_dir() and archive.is_file()):
        return None
    try:
        verify_bundle(folder, str(digest))
    except BundleError:
        return None  # a damaged cache entry is rebuilt, never handed out
    return _load(folder, archive, cached=True)


def _load(folder: Path, archive: Path, *, cached: bool) -> Bundle:
    manifest = json.loads((folder / MANIFEST).read_text())
    return Bundle(path=folder, archive=archive, sha256=folder.name,
                  archive_sha256=sha256_file(archive), platform=manifest["platform"],
                  python=manifest["python"], manifest=manifest, cached=cached)


def _write_tar(folder: Path, dest: Path) -> None:
    """The folder's files, flat, in name order, with fixed owners and times."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.iterdir()):
            info = tarfile.TarInfo(path.name)
            info.size = path.stat().st_size
            info.mtime = _EPOCH_S
            info.mode = 0o644
            with path.open("rb") as fh:
                tar.addfile(info, fh)


# --- helpers ----------------------------------------------------------------------------

def _pip(*args: str, what: str, log: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise BundleError(f"{what}: cannot run {sys.executable}") from None
    except subprocess.TimeoutExpired:
        raise BundleError(f"{what}: pip took more than {PIP_TIMEOUT_S:.0f} s") from None
    if log is not None:
        log.write_text(f"{' '.join(cmd)}\n{time.monotonic() - started:.1f} s\n"
                       f"{proc.stdout}{proc.stderr}")
    if proc.returncode != 0:
        if "No module named pip" in proc.stderr:
            raise BundleError(f"{what}: building a bundle needs pip in {sys.executable} "
                              "(python -m ensurepip)")
        errors = "\n".join(line for line in proc.stderr.splitlines()
                           if "is ignored: it is neither a file nor a directory" not in line)
        raise BundleError(f"{what}: pip exited {proc.returncode}:\n{errors.strip()}")



def _sh_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)

