from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from deathstar import serialize


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


def test_local_module_is_shipped_by_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    (tmp_path / "dsmod_shipped.py").write_text(textwrap.dedent("""
        import dshelper_shipped
        def f(x):
            return dshelper_shipped.double(x) + 1
    """))
    (tmp_path / "dshelper_shipped.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import dsmod_shipped

    serialize.ship_local_modules()
    frames = serialize.dumps(dsmod_shipped.f)
    assert len(frames) == 1
    # A fresh interpreter that cannot import dsmod_shipped or its helper runs it.
    code = ("import sys, pickle; f = pickle.loads(sys.stdin.buffer.read()); print(f(20))")
    out = subprocess.run([sys.executable, "-c", code], input=frames[0], capture_output=True,
                         cwd="/", check=True)
    assert out.stdout.strip() == b"41"


def test_unpicklable_common_argument_is_named() -> None:
    import threading

    with pytest.raises(serialize.SerializationError, match="common argument 'lock'"):
        serialize.dumps_function(len, {"ok": 1, "lock": threading.Lock()})
