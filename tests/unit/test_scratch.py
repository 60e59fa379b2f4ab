"""Scratch folders in the temporary directory name their process in an owner file; the
sweep removes those whose process is gone, and nothing else."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deathstar import scratch

pytestmark = pytest.mark.timeout(60)


def test_a_scratch_folder_is_private_and_names_its_process(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(scratch.tempfile, "tempdir", None)  # read TMPDIR again
    folder = scratch.make_folder("deathstar-test-")
    assert os.path.dirname(folder) == str(tmp_path)
    assert os.path.basename(folder).startswith("deathstar-test-")
    assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700
    stamp = Path(folder, scratch.OWNER).read_text()
    assert stamp == scratch.own_stamp() and stamp.split("-")[1] == str(os.getpid())
    assert not scratch.stamp_is_dead(stamp, scratch.pid_namespace() or "")


def _folder(root: Path, name: str, owner: str | None, mode: int = 0o700) -> Path:
    path = root / name
    path.mkdir()
    (path / "inside").mkdir()
    (path / "inside" / "file").write_bytes(b"x")
    if owner is not None:
        (path / scratch.OWNER).write_text(owner)
    path.chmod(mode)
    return path


def test_only_this_users_folders_of_dead_processes_in_this_namespace_are_swept(
        tmp_path: Path) -> None:
    """Removed: a folder whose process is gone (a real one, killed), or whose pid names a
    process that started at another time. Left alone: a live process's, another pid
    namespace's, another user's, one others may write, one without an owner file, one
    whose owner file is a symlink, a symlink to a folder, one not named deathstar-."""
    namespace = scratch.pid_namespace()
    assert namespace is not None
    gone = subprocess.run([sys.executable, "-c", "from deathstar import scratch; "
                           "print(scratch.own_stamp())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    live = scratch.own_stamp()
    assert live is not None
    _, pid, start = live.split("-")
    folders = {
        "killed": _folder(tmp_path, "deathstar-a", gone),
        "reused_pid": _folder(tmp_path, "deathstar-b", f"{namespace}-{pid}-{int(start) + 1}"),
        "live": _folder(tmp_path, "deathstar-c", live),
        "other_ns": _folder(tmp_path, "deathstar-d", f"1-{2**22 + 1}-{start}"),
        "other_user": _folder(tmp_path, "deathstar-e", gone),
        "writable": _folder(tmp_path, "deathstar-f", gone, mode=0o777),
        "unstamped": _folder(tmp_path, "deathstar-g", None),
        "not_ours": _folder(tmp_path, "other-h", gone),
        "owner_link": _folder(tmp_path, "deathstar-i", None),
    }
    (folders["owner_link"] / scratch.OWNER).symlink_to(folders["killed"] / scratch.OWNER)
    (tmp_path / "deathstar-j").symlink_to(folders["killed"])
    if os.getuid() == 0:
        os.chown(folders["other_user"], 65534, 65534)
    else:
        del folders["other_user"]

    removed = scratch.sweep_dead(str(tmp_path))

    assert sorted(removed) == sorted(str(folders[k]) for k in ("killed", "reused_pid"))
    for key, path in folders.items():
        assert path.exists() == (key not in ("killed", "reused_pid")), key
    assert (tmp_path / "deathstar-j").is_symlink()

