"""Input files a worker gives back: it maps them while the task runs (``map_kept``),
closes the maps nothing refers to any more (``give_back``), and the client writes its
next inputs into those files (``SharedFolder.recycle``), never into one still in use."""

from __future__ import annotations

import os

import numpy as np
import pytest

from deathstar import serialize, shm

pytestmark = pytest.mark.skipif(not shm.SharedFolder.available(),
                                reason="no writable /dev/shm")


@pytest.fixture
def folder() -> shm.SharedFolder:
    f = shm.SharedFolder()
    yield f
    f.close()


def shared(folder: shm.SharedFolder, array: np.ndarray) -> tuple[list, list[int], list[str]]:
    return folder.share(serialize.dumps(array))


def test_a_file_is_given_back_only_when_nothing_views_it(folder: shm.SharedFolder) -> None:
    frames, indices, paths = shared(folder, np.full(300_000, 2.0))
    kept: list[shm.Kept] = []
    array = serialize.loads(frames, indices, kept)
    assert os.path.exists(paths[0])  # kept while the task runs
    held = array  # the function kept its input
    del array
    assert shm.give_back(kept) == []
    assert not os.path.exists(paths[0])  # removed: never to be written again
    assert held.sum() == 600_000.0  # the map lives on

    frames, indices, paths = shared(folder, np.full(300_000, 3.0))
    kept = []
    assert serialize.loads(frames, indices, kept).sum() == 900_000.0
    assert shm.give_back(kept) == indices
    assert os.path.exists(paths[0])  # left for the client


def test_the_client_writes_again_into_files_given_back(folder: shm.SharedFolder) -> None:
    _, _, (first,) = shared(folder, np.full(300_000, 1.0))
    folder.recycle([first])
    frames, indices, (again,) = shared(folder, np.full(300_000, 5.0))
    assert again == first and folder.reused == 1 and folder.free_bytes == 0
    assert serialize.loads(frames, indices).sum() == 1_500_000.0
    _, _, (other,) = shared(folder, np.full(200_000, 1.0))  # no file of that size
    assert other != first and folder.reused == 1


def test_a_file_given_back_that_is_no_longer_ours_is_not_written(
        folder: shm.SharedFolder, tmp_path) -> None:
    _, _, (path,) = shared(folder, np.full(300_000, 1.0))
    folder.recycle([path])
    target = tmp_path / "elsewhere"
    target.write_bytes(b"x" * 2_400_000)
    os.unlink(path)
    os.symlink(target, path)  # swapped for a link: not followed
    _, _, (new,) = shared(folder, np.full(300_000, 7.0))
    assert new != path and folder.reused == 0
    assert target.read_bytes() == b"x" * 2_400_000


def test_files_given_back_are_kept_within_bounds(folder: shm.SharedFolder,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "FREE_MAX_FILES", 2)
    paths = [shared(folder, np.full(300_000, float(k)))[2][0] for k in range(3)]
    folder.recycle(paths)
    assert sum(len(f) for f in folder.free.values()) == 2
    assert [os.path.exists(p) for p in paths] == [True, True, False]


def test_only_this_users_folders_of_dead_processes_in_this_namespace_are_swept(
        folder: shm.SharedFolder) -> None:
    """A folder is stamped with its process (pid namespace, pid, start time): the sweep
    removes one whose process is gone or whose pid now names another process, and never
    one of a live process, of another pid namespace, of another user or unstamped."""
    mine = os.path.basename(folder.folder())
    namespace, pid, start = mine[len("deathstar-"):].split("-")[:3]
    assert int(pid) == os.getpid()
    names = {
        "reused": f"deathstar-{namespace}-{pid}-{int(start) + 1}-aaaa",  # an earlier life
        "gone": f"deathstar-{namespace}-{2**22 + 1}-{start}-bbbb",  # above pid_max
        "other_ns": f"deathstar-1-{2**22 + 1}-{start}-cccc",
        "other_user": f"deathstar-{namespace}-{2**22 + 1}-{start}-dddd",
        "unstamped": "deathstar-eeee",
    }
    paths = {k: os.path.join(shm.SHARED_ROOT, n) for k, n in names.items()}
    try:
        for path in paths.values():
            os.mkdir(path, 0o700)
        if os.getuid() == 0:
            os.chown(paths["other_user"], 65534, 65534)
        else:
            os.rmdir(paths.pop("other_user"))
        removed = shm.sweep_dead()
        assert sorted(removed) == sorted([paths["reused"], paths["gone"]])
        assert os.path.isdir(folder.folder())
        for key in paths.keys() - {"reused", "gone"}:
            assert os.path.isdir(paths[key]), key
    finally:
        for path in paths.values():
            if os.path.isdir(path):
                os.rmdir(path)
