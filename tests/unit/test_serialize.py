"""Payload pickling: builtin data takes the C pickler alone, anything else goes through
cloudpickle, which notes the modules it refers to; both come back equal, with large
buffers out of band."""

from __future__ import annotations

import pickle

import pytest

from deathstar import serialize
from tests import jobs

pytestmark = pytest.mark.timeout(30)


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
