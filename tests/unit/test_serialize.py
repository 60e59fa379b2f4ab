from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from deathstar import serialize, shm
from tests import jobs


def test_large_arrays_travel_out_of_band_and_come_back_writable() -> None:
    big = np.arange(200_000, dtype=np.float64)
    frames = serialize.dumps({"a": big, "small": np.arange(3)})
    assert len(frames) == 2  # the pickle stream + the big array's buffer
    back = serialize.loads(frames)
    np.testing.assert_array_equal(back["a"], big)
    back["a"][0] = -1.0  # writable, as with multiprocessing
    assert big[0] == 0.0


@pytest.mark.parametrize("array", [
    np.zeros(0), np.arange(300_000.0)[::3], np.arange(100_000).reshape(100, 1000).T,
    np.arange(10, dtype=np.int8),
])
def test_odd_arrays_round_trip(array: np.ndarray) -> None:
    back = serialize.loads(serialize.dumps(array))
    np.testing.assert_array_equal(back, array)
    assert back.dtype == array.dtype and back.shape == array.shape


def test_content_hash_depends_on_content_only() -> None:
    a = serialize.dumps((len, {"x": np.ones(100_000)}))
    b = serialize.dumps((len, {"x": np.ones(100_000)}))
    c = serialize.dumps((len, {"x": np.zeros(100_000)}))
    assert serialize.content_hash(a) == serialize.content_hash(b)
    assert serialize.content_hash(a) != serialize.content_hash(c)


def test_local_module_is_shipped_as_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    (tmp_path / "dsmod_shipped.py").write_text(textwrap.dedent("""
        import threading
        import dshelper_shipped
        _LOCK = threading.Lock()
        def f(x):
            with _LOCK:
                return dshelper_shipped.double(x) + 1
    """))
    (tmp_path / "dshelper_shipped.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import dsmod_shipped

    blob = serialize.dumps_function(dsmod_shipped.f, {})
    bundle, _ = serialize.loads_function(blob)
    assert bundle is not None
    assert bundle.names == ["dshelper_shipped", "dsmod_shipped"]
    assert not cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES  # nothing process-wide
    # A fresh interpreter that cannot import dsmod_shipped or its helper runs it.
    code = ("import sys; from deathstar import serialize; "
            "from deathstar.worker.imports import ModuleFolders; "
            "bundle, fn = serialize.loads_function([sys.stdin.buffer.read()]); "
            "m = ModuleFolders(); m.activate(bundle); f, common, init = fn.load(); "
            "print(f(20)); m.close()")
    out = subprocess.run([sys.executable, "-c", code], input=blob[0], capture_output=True,
                         cwd="/", check=True)
    assert out.stdout.strip() == b"41"


def test_unpicklable_common_argument_is_named() -> None:
    import threading

    with pytest.raises(serialize.SerializationError, match="common argument 'lock'"):
        serialize.dumps_function(len, {"ok": 1, "lock": threading.Lock()})


def test_shared_buffers_map_copy_on_write_and_only_from_deathstar_folders(tmp_path: Path) -> None:
    big = np.arange(shm.SHARED_MIN_BYTES // 8 + 10, dtype=np.float64)
    small = np.arange(10)
    folder = shm.SharedFolder()
    try:
        frames, shared, paths = folder.share(serialize.dumps((big, small)))
        assert shared == [1] and len(paths) == 1 and frames[1] == paths[0].encode()
        assert oct(os.stat(folder.path).st_mode & 0o777) == "0o700"
        got_big, got_small = serialize.loads(frames, shared)
        assert not os.path.exists(paths[0])  # the receiver unlinked it once mapped
        assert np.array_equal(got_big, big) and np.array_equal(got_small, small)
        got_big += 1  # writable, and the writes stay here
        assert got_big[0] == 1 and big[0] == 0
        frames, shared, paths = folder.share(serialize.dumps(big))
        folder.release(paths)  # never taken: the sender removes it
        assert not os.path.exists(paths[0])
        # a worker writes its results into the client's folder, and never removes it
        assert shm.shared_folder(folder.path) == os.path.realpath(folder.path)
        borrowed = shm.SharedFolder(into=shm.shared_folder(folder.path))
        frames, shared, paths = borrowed.share(serialize.dumps(big))
        assert os.path.dirname(paths[0]) == folder.path
        borrowed.close()
        assert os.path.exists(paths[0])
        shm.discard_shared(frames, shared)  # a late result: the client drops it
        assert not os.path.exists(paths[0])
    finally:
        folder.close()
    assert folder.path is None
    for bad in (str(tmp_path), "/dev/shm/../tmp", "/dev/shm/deathstar-none", 7, None):
        assert shm.shared_folder(bad) is None
    outside = tmp_path / "secret"
    outside.write_bytes(b"x" * 10)
    for bad in (str(outside), "/dev/shm/../etc/passwd", "/dev/shm/other-1/0"):
        with pytest.raises(serialize.SerializationError, match="not a deathstar"):
            shm.map_shared(bad.encode())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_shared_memory_falls_back_to_the_socket(tmp_path: Path) -> None:
    """/dev/shm full: the buffers go as they are, and no partial file stays behind."""
    small = tmp_path / "small-shm"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        folder = shm.SharedFolder(into=str(small))  # on a 1 MiB tmpfs
        frames = serialize.dumps(np.ones(shm.SHARED_MIN_BYTES // 4))  # 2 MiB
        out, shared, paths = folder.share(frames)
        assert out is frames and shared == [] and paths == []
        assert os.listdir(small) == []
        assert np.array_equal(serialize.loads(out), np.ones(shm.SHARED_MIN_BYTES // 4))
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_shared_paths_with_nul_bytes_or_foreign_owners_are_refused(tmp_path: Path) -> None:
    """A peer names the files we map and unlink: a NUL byte, a folder another user owns
    or others may write, and a symbolic link are each refused, never followed."""
    if not shm.SharedFolder.available():
        pytest.skip("no writable /dev/shm")
    ours = shm.SharedFolder()
    try:
        _, _, paths = ours.share([b"head", bytearray(shm.SHARED_MIN_BYTES)])
        folder = ours.folder()
        with pytest.raises(serialize.SerializationError, match="not a file name"):
            shm.map_shared(f"{folder}/x\0y".encode())
        shm.discard_shared([b"", f"{folder}/x\0y".encode()], [1])  # no raise
        os.symlink(paths[0], f"{folder}/link")
        with pytest.raises(serialize.SerializationError):
            shm.map_shared(f"{folder}/link".encode())
        assert os.path.exists(paths[0])  # the link was not followed to its target
        os.chmod(folder, 0o777)
        with pytest.raises(serialize.SerializationError, match="not a deathstar"):
            shm.map_shared(paths[0].encode())
        assert shm.shared_folder(folder) is None
        os.chmod(folder, 0o700)
        if os.geteuid() == 0:
            os.chown(folder, 65534, 65534)  # nobody's now
            with pytest.raises(serialize.SerializationError, match="not a deathstar"):
                shm.map_shared(paths[0].encode())
            os.chown(folder, 0, 0)
        assert len(shm.map_shared(paths[0].encode())) == shm.SHARED_MIN_BYTES
    finally:
        ours.close()


def test_a_probe_is_proved_only_by_a_reader_of_its_own_deathstar_file(tmp_path: Path) -> None:
    """``prove_shared`` answers a client's probe with the hash of its token; anything else
    it is named (a file outside a deathstar folder of /dev/shm, a symbolic link, a large
    file, a folder others may write) gets no answer and is not read."""
    if not shm.SharedFolder.available():
        pytest.skip("no writable /dev/shm")
    ours = shm.SharedFolder()
    try:
        path, proof = ours.probe()
        assert shm.prove_shared(path) == proof
        other, other_proof = ours.probe()
        assert other_proof != proof and shm.prove_shared(other) == other_proof
        outside = tmp_path / "token"
        outside.write_bytes(b"x" * 16)
        folder = ours.folder()
        os.symlink(path, f"{folder}/link")
        _, _, big = ours.share([b"head", bytearray(shm.SHARED_MIN_BYTES)])
        for named in (str(outside), "/etc/hostname", f"{folder}/link", big[0],
                      f"{folder}/missing", f"{folder}/x\0y", 42):
            assert shm.prove_shared(named) is None, named
        os.chmod(folder, 0o777)
        assert shm.prove_shared(path) is None
    finally:
        ours.close()


def test_only_a_function_found_by_its_name_pickles_by_name() -> None:
    """What may keep its pickle from call to call: a module's own function, not a
    closure, a lambda, a partial, nor a function of a module registered to go by value."""
    import functools
    import json

    def local(x: int) -> int:
        return x

    assert serialize.pickles_by_name(json.dumps)
    assert not serialize.pickles_by_name(local)
    assert not serialize.pickles_by_name(lambda x: x)
    assert not serialize.pickles_by_name(functools.partial(json.dumps, indent=1))
    cloudpickle.register_pickle_by_value(json)
    try:
        assert not serialize.pickles_by_name(json.dumps)
    finally:
        cloudpickle.unregister_pickle_by_value(json)


class _Mine:
    """A class of the user's: its unpickling is user code."""


@pytest.mark.parametrize("value", [
    None, 3, 2.5, "s", np.float64(1.5), np.int32(7), np.bool_(True), np.arange(4.0),
    (1, 2.0, "x"), [np.float64(1), 2], {"a": 1, "b": np.int64(2)},
])
def test_values_whose_unpickling_runs_no_user_code_are_not_sealed(value: object) -> None:
    """They travel inside the result's one pickle: no pickle of their own each."""
    assert serialize.seal(value) is value
    values, _ = serialize.seal_all([value, value])
    assert values[0] is value and values[1] is value


@pytest.mark.parametrize("value", [
    _Mine(), [1, _Mine()], (np.arange(3.0),), {"k": _Mine()}, {_Mine: 1},
    np.array([None, 1], dtype=object), np.ma.array([1.0]), np.datetime64("2026-01-01"),
    np.arange(3.0).view(np.matrix),
])
def test_values_whose_unpickling_may_run_user_code_are_sealed(value: object) -> None:
    assert isinstance(serialize.seal(value), serialize.Deferred)
    values, raw = serialize.seal_all([1.0, value])
    assert values[0] == 1.0 and isinstance(values[1], serialize.Deferred) and not raw


def test_sealed_results_round_trip_through_the_standard_pickler() -> None:
    values = [np.float64(0.5), _Mine(), np.arange(200_000.0), (1, "x"), None]
    sealed, raw = serialize.seal_all(values)
    back = serialize.unseal_all(serialize.loads(serialize.dumps_sealed(sealed)))
    assert not raw and back[0] == 0.5 and type(back[0]) is np.float64
    assert isinstance(back[1], _Mine) and back[3] == (1, "x") and back[4] is None
    np.testing.assert_array_equal(back[2], values[2])


def test_results_of_builtins_only_are_pickled_as_they_are() -> None:
    """One pass of the C pickler, nothing sealed (raw); any other object anywhere in them
    sends them through ``seal_all``, each value whose unpickling may run user code on its
    own."""
    plain = [1, 2.5, None, "s", b"b", (1, "x"), {"k": [1, 2]}, {3}]
    frames, raw = serialize.dumps_results(plain)
    assert raw and serialize.loads(frames) == plain
    frames, raw = serialize.dumps_results(plain, ["printed"] * len(plain))
    assert raw and serialize.loads(frames) == (plain, ["printed"] * len(plain))
    mixed = [1, np.float64(2.0), [3, _Mine()]]
    frames, raw = serialize.dumps_results(mixed)
    back = serialize.loads(frames)
    assert not raw and back[:2] == [1, 2.0] and isinstance(back[2], serialize.Deferred)
    assert back[2].load()[0] == 3


# ---------------------------------------------------------------- inputs: builtins first


def test_builtin_inputs_refer_to_no_module_and_come_back_equal() -> None:
    data = [((1, 2.5, "s", b"b", None, True), {"k": [1, {2, 3}, frozenset({4})]})] * 3
    modules: set[str] = set()
    frames = serialize.dumps(data, modules)
    assert serialize.loads(frames) == data and modules == set()


def test_an_object_after_builtins_still_notes_its_module() -> None:
    """The C pickler stops at the first object it does not take; cloudpickle then
    pickles the whole again, noting the module of the function at the end."""
    data = [((i,), None) for i in range(1000)] + [((jobs.square,), None)]
    modules: set[str] = set()
    frames = serialize.dumps(data, modules)
    assert "tests.jobs" in modules
    back = serialize.loads(frames)
    assert back[:1000] == data[:1000] and back[-1][0][0] is jobs.square


def test_a_large_buffer_travels_out_of_band_either_way() -> None:
    big = bytearray(b"x" * (serialize.OUT_OF_BAND_MIN_BYTES + 1))
    for data in ([pickle.PickleBuffer(big)], [pickle.PickleBuffer(big), jobs.square]):
        frames = serialize.dumps(data)
        assert len(frames) == 2 and bytes(frames[1]) == bytes(big)
        assert bytes(serialize.loads(frames)[0]) == bytes(big)
