"""The node bundle, built with the real pip from the package sources pip is configured
with, installed offline into a fresh venv, and refused when tampered with."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from deathstar import config
from deathstar._version import __version__
from deathstar.deploy.bundle import (CORE, DIST_NAME, Bundle, BundleError, MissingWheel,
                                     build_bundle, local_platform, platform_tags,
                                     verify_bundle, wheel_from_distribution)
from tests.conftest import sdist_only_package

pytestmark = pytest.mark.timeout(300)

#: Another Python minor than this one, for which the client's versions all have wheels.
OTHER_MINOR = "3.12" if sys.version_info[:2] != (3, 12) else "3.13"

#: No route anywhere: a proxy on the discard port, for commands that must stay offline.
DEAD_PROXY = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundle-cache")


@pytest.fixture(scope="module")
def local(cache: Path) -> Bundle:
    """The bundle for this machine's platform and Python (cold: nothing cached)."""
    return build_bundle(cache_dir=cache)


def _unpack(b: Bundle, dest: Path) -> Path:
    dest.mkdir()
    with tarfile.open(b.archive) as tar:
        tar.extractall(dest, filter="data") if sys.version_info >= (3, 12) \
            else tar.extractall(dest)
    return dest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _offline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")
           and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(http_proxy=DEAD_PROXY, https_proxy=DEAD_PROXY, HTTP_PROXY=DEAD_PROXY,
               HTTPS_PROXY=DEAD_PROXY, no_proxy="", DEATHSTAR_KEYS="none")
    return env


def test_local_bundle_pins_the_clients_versions(local: Bundle) -> None:
    assert local.platform == local_platform()
    assert local.python == f"{sys.version_info.major}.{sys.version_info.minor}"
    versions = local.versions
    assert versions[DIST_NAME] == __version__
    for name in CORE:
        assert versions[name] == metadata.version(name), name
    for wheel in local.manifest["wheels"]:  # every dependency the client has: its version
        if wheel["source"] == "client":
            assert wheel["version"] == metadata.version(wheel["name"]), wheel
    files = {p.name for p in local.path.iterdir()}
    assert {w["file"] for w in local.manifest["wheels"]} <= files
    assert {"manifest.json", "install.sh", "SHA256SUMS"} <= files
    assert local.sha256 == _sha256(local.path / "SHA256SUMS") == local.path.name
    assert local.archive_sha256 == _sha256(local.archive)
    verify_bundle(local.path, local.sha256)


def test_cache_hit_returns_the_same_bundle_without_pip(local: Bundle, cache: Path) -> None:
    """Built again in a process where pip can reach no package source at all (no index,
    no find-links, a dead proxy): only a cache hit, which runs no pip, can succeed."""
    env = {**_offline_env(), "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull,
           "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    code = ("import json; from pathlib import Path; "
            "from deathstar.deploy.bundle import build_bundle; "
            f"b = build_bundle(cache_dir=Path({str(cache)!r})); "
            "print(json.dumps([b.cached, b.sha256, b.archive_sha256]))")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    cached, sha256, archive_sha256 = json.loads(run.stdout.strip().splitlines()[-1])
    assert cached and not local.cached
    assert (sha256, archive_sha256) == (local.sha256, local.archive_sha256)


def test_cache_dir_from_the_environment(local: Bundle, cache: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEATHSTAR_CACHE_DIR", str(cache))
    assert config.cache_dir() == cache
    assert build_bundle().sha256 == local.sha256  # found through the variable


def test_rebuild_gives_the_same_hash(local: Bundle, tmp_path: Path) -> None:
    """The name is the content: a cold build elsewhere makes the same files."""
    assert build_bundle(cache_dir=tmp_path, refresh=True).sha256 == local.sha256


def test_another_python_minor(cache: Path) -> None:
    other = build_bundle(python=OTHER_MINOR, cache_dir=cache)
    assert other.python == OTHER_MINOR
    for name in CORE:
        assert other.versions[name] == metadata.version(name), name
    tag = "cp" + OTHER_MINOR.replace(".", "")
    compiled = [w["file"] for w in other.manifest["wheels"] if "-none-any" not in w["file"]]
    assert compiled and all(f"-{tag}-" in f or "-abi3-" in f for f in compiled), compiled
    assert "pyzmq" in {w["file"].split("-")[0] for w in other.manifest["wheels"]
                       if w["file"] in compiled}


def test_offline_install_into_a_fresh_venv(local: Bundle, tmp_path: Path) -> None:
    folder = _unpack(local, tmp_path / "unpacked")
    venv = tmp_path / "venv"
    proc = subprocess.run(["sh", "install.sh", local.sha256, str(venv), sys.executable],
                          cwd=folder, env=_offline_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "installed" in proc.stdout
    out = subprocess.run([str(venv / "bin" / "deathstar"), "--version"], cwd=tmp_path,
                         env=_offline_env(), capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == f"deathstar {__version__}", out.stderr
    frozen = subprocess.run([str(venv / "bin" / "python"), "-c",
                             "import importlib.metadata as m, json; print(json.dumps("
                             "{d.metadata['Name'].lower().replace('_', '-'): d.version "
                             "for d in m.distributions()}))"],
                            capture_output=True, text=True, timeout=60, check=True)
    installed = json.loads(frozen.stdout)
    for name, version in local.versions.items():
        assert installed.get(name) == version, name
    mapped = subprocess.run([str(venv / "bin" / "python"), "-c",
                             "import deathstar; print(list(deathstar.map(abs, [-1, -2, 3])))"],
                            cwd=tmp_path, env=_offline_env(), capture_output=True, text=True,
                            timeout=60)
    assert mapped.stdout.strip() == "[1, 2, 3]", mapped.stderr


@pytest.mark.parametrize("tamper", ["altered wheel", "added wheel", "other hash"])
def test_tampered_bundle_is_refused(local: Bundle, tmp_path: Path, tamper: str) -> None:
    folder = _unpack(local, tmp_path / "unpacked")
    expected = local.sha256
    if tamper == "altered wheel":
        victim = folder / local.manifest["wheels"][0]["file"]
        victim.write_bytes(victim.read_bytes() + b"\0")
        message = "sha256 does not match SHA256SUMS"
        script_message = "a file does not match SHA256SUMS"
    elif tamper == "added wheel":
        shutil.copy(folder / local.manifest["wheels"][0]["file"],
                    folder / "evil-1.0-py3-none-any.whl")
        message = "evil-1.0-py3-none-any.whl is not listed"
        script_message = "files not listed in SHA256SUMS"
    else:
        expected = "0" * 64
        message = f"expected {expected}"
        script_message = f"expected {expected}"
    with pytest.raises(BundleError, match=message):
        verify_bundle(folder, expected)
    venv = tmp_path / "venv"
    proc = subprocess.run(["sh", "install.sh", expected, str(venv), sys.executable],
                          cwd=folder, env=_offline_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert script_message in proc.stderr and "not installing" in proc.stderr, proc.stderr
    assert not venv.exists()


def test_install_refuses_another_python(local: Bundle, tmp_path: Path) -> None:
    folder = _unpack(local, tmp_path / "unpacked")
    other = next((p for p in sorted(Path("/root/.pyenv/versions").glob("3.1*/bin/python"))
                  if f"/{local.python}." not in str(p)), None)
    if other is None:
        pytest.skip("no second Python here")
    proc = subprocess.run(["sh", "install.sh", local.sha256, str(tmp_path / "v"), str(other)],
                          cwd=folder, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and f"this bundle is for {local.python}" in proc.stderr


def test_missing_binary_wheel_names_package_platform_and_python(
        cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --pip package that has only a source distribution: stop, naming it; nothing
    is left in the cache."""
    links = tmp_path / "links"
    name = sdist_only_package(links)
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    before = sorted(p.name for p in (cache / "bundles").iterdir())
    with pytest.raises(MissingWheel) as caught:
        build_bundle(pip=[name], cache_dir=cache)
    err = caught.value
    assert (err.package, err.platform, err.python) == (name, local_platform(),
                                                        f"{sys.version_info[0]}."
                                                        f"{sys.version_info[1]}")
    assert name in str(err) and local_platform() in str(err) and f"CPython {err.python}" \
        in str(err)
    assert sorted(p.name for p in (cache / "bundles").iterdir()) == before


def test_no_wheel_for_the_platform_names_a_dependency(cache: Path) -> None:
    with pytest.raises(MissingWheel) as caught:
        build_bundle("manylinux_2_28_riscv64", cache_dir=cache)
    assert caught.value.package.split("==")[0] in ("pyzmq", "msgpack", "pydantic-core")
    assert "manylinux_2_28_riscv64" in str(caught.value)


def test_requirements_file_and_pip_specs(local: Bundle, cache: Path, tmp_path: Path) -> None:
    """User specs: a package the client has comes at the client's version."""
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# what the tasks import\npytest  # the client has it\n")
    b = build_bundle(pip=["pluggy"], requirements=reqs, cache_dir=cache)
    assert b.sha256 != local.sha256
    assert b.versions["pytest"] == metadata.version("pytest")
    assert b.versions["pluggy"] == metadata.version("pluggy")
    assert b.manifest["user_specs"] == ["pluggy", "pytest"]
    assert f"pytest=={metadata.version('pytest')}" in b.manifest["install"]
    (tmp_path / "bad.txt").write_text("--index-url http://x\n")
    with pytest.raises(BundleError, match="bad.txt, line 1"):
        build_bundle(requirements=tmp_path / "bad.txt", cache_dir=cache)


def test_wheel_from_an_installed_distribution(local: Bundle, tmp_path: Path) -> None:
    """A client that runs an installed deathstar (not a checkout) ships those files."""
    original = local.path / next(w["file"] for w in local.manifest["wheels"]
                                 if w["name"] == DIST_NAME)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-compile", "--no-index", "--target", str(target), str(original)],
                   check=True, capture_output=True, timeout=120)
    dist = next(d for d in metadata.distributions(path=[str(target)])
                if d.metadata["Name"] == DIST_NAME)
    repacked = wheel_from_distribution(dist, tmp_path)
    assert repacked.name == original.name

    def members(path: Path) -> dict[str, bytes]:
        with zipfile.ZipFile(path) as zf:
            return {n: zf.read(n) for n in zf.namelist() if not n.endswith("/RECORD")}

    assert members(repacked) == members(original)


def test_platform_tags() -> None:
    tags = platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux2014_x86_64" in tags
    assert tags[-1] == "manylinux1_x86_64"
    arm = platform_tags("manylinux_2_28_aarch64")
    assert "manylinux2014_aarch64" in arm and "manylinux1_aarch64" not in arm
    assert platform_tags("macosx_11_0_arm64") == ["macosx_11_0_arm64"]
