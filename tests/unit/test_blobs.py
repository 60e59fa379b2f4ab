"""A function pickled by value (defined in a script, a notebook, another function) keeps
its pickle only while everything it refers to is the very same immutable object; any
change, or anything that can change in place, pickles it again."""

from __future__ import annotations

import math
from typing import Any, Callable

import pytest

from deathstar import serialize
from deathstar.client import blobs
from deathstar.client.blobs import FunctionBlobs, value_state

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pickled(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The functions ``serialize.pickle_function`` was asked to pickle."""
    seen: list[Any] = []
    real = serialize.pickle_function

    def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(blobs.serialize, "pickle_function", counting)
    return seen


def run(blob: list[Any], *args: Any) -> Any:
    """What a worker would compute with this blob."""
    _, deferred = serialize.loads_function(blob)
    fn, _, _ = deferred.load()
    return fn(*args)


def script(source: str) -> dict[str, Any]:
    """A namespace run as a script's ``__main__``: its functions pickle by value."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(source, namespace)  # noqa: S102 - the test's own source
    return namespace


def test_a_script_function_over_immutable_globals_is_pickled_once(pickled: list[Any]) -> None:
    ns = script("import math\nK = 3\ndef f(x):\n    return math.floor(x) + K\n")
    blobs_ = FunctionBlobs(None)
    first = blobs_.blob(ns["f"], (1.5,), {})
    assert blobs_.blob(ns["f"], (2.5,), {}) == first
    assert pickled == [ns["f"]]
    ns["K"] = 10  # rebinding a global it names: pickled again, with the new value
    second = blobs_.blob(ns["f"], (1.5,), {})
    assert second[0] != first[0] and len(pickled) == 2
    assert run(first[1], 1.5) == 4 and run(second[1], 1.5) == 11


def test_a_closure_rebound_or_a_function_it_calls_changed_is_pickled_again(
        pickled: list[Any]) -> None:
    k = 1

    def inner(x: int) -> int:
        return x + k

    def outer(x: int) -> int:
        return inner(x) * 2

    blobs_ = FunctionBlobs(None)
    first = blobs_.blob(outer, (1,), {})
    assert blobs_.blob(outer, (1,), {}) == first and len(pickled) == 1
    k = 5  # a cell of the function ``outer`` calls, not of ``outer``'s own
    second = blobs_.blob(outer, (1,), {})
    assert len(pickled) == 2 and second[0] != first[0]
    assert run(first[1], 1) == 4 and run(second[1], 1) == 12


@pytest.mark.parametrize("make", [
    lambda: (lambda box: (lambda x: x + box[0]))([1]),  # a list, mutable in place
    lambda: (lambda d: (lambda x: x + d["k"]))({"k": 1}),  # a dict
    lambda: (lambda add: (lambda x: add(x)))([].append),  # a list's bound method
    lambda: (lambda: None).__class__,  # not a function at all: a type
], ids=["list", "dict", "bound method", "type"])
def test_what_can_change_in_place_is_never_kept(make: Callable[[], Any]) -> None:
    assert value_state(make()) is None


def test_a_list_changed_in_place_reaches_the_next_call(pickled: list[Any]) -> None:
    box = [1]

    def f(x: int) -> int:
        return x + box[0]

    blobs_ = FunctionBlobs(None)
    first = blobs_.blob(f, (1,), {})
    box[0] = 7
    second = blobs_.blob(f, (1,), {})
    assert len(pickled) == 2
    assert run(first[1], 1) == 2 and run(second[1], 1) == 8


def test_the_state_holds_the_objects_themselves() -> None:
    """Equal is not enough: 1 and 1.0 and True are equal, and pickle differently."""
    ns = script("K = 1\ndef f(x):\n    return x * K\n")
    before = value_state(ns["f"])
    ns["K"] = 1.0
    after = value_state(ns["f"])
    assert before is not None and after is not None and before == after
    assert not blobs.same_state(before, after)
    assert blobs.same_state(after, value_state(ns["f"]) or ())
    assert value_state(math.floor) is None  # a builtin pickles by name: never by value
