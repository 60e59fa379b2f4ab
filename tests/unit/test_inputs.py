from __future__ import annotations

import json
import pickle
from array import array
from pathlib import Path

import pytest

from deathstar.cli import inputs as inputs_mod
from deathstar.cli.inputs import InputError, load_function, parse_kwargs, read_inputs


def test_jsonl_shapes_become_calls(tmp_path: Path) -> None:
    path = tmp_path / "args.jsonl"
    path.write_text('[1, 2]\n{"x": 3}\n\n7\n"text"\n[[1, 2]]\n')
    inputs = read_inputs(path)
    assert inputs.total == 5 and inputs.plain is None
    assert list(inputs.calls) == [((1, 2), None), ((), {"x": 3}), ((7,), None), (("text",), None),
                           (([1, 2],), None)]


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("1\n2\n{not json\n4\n")
    # Checked when the file is opened, before any input is sent anywhere.
    with pytest.raises(InputError) as info:
        read_inputs(path)
    assert str(path) in str(info.value) and "line 3" in str(info.value)


@pytest.mark.parametrize("bad", [b"1 2", b"[1", b"1,2", b'{"a": 1}}', b"\xff\xfe1",
                                 b"nan", b"'single'"])
def test_each_line_must_hold_exactly_one_json_value(tmp_path: Path, bad: bytes) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'  5  \n[1, "x"]\n' + bad + b"\n6\n")
    with pytest.raises(InputError) as info:
        read_inputs(path)
    assert f"{path}, line 3: not valid JSON" in str(info.value)
    path.write_bytes(b'  5  \n[1, "x"]\n\t{"k": 1.5}\r\n')
    inputs = read_inputs(path)
    assert inputs.total == 3 and list(inputs.calls) == [((5,), None), ((1, "x"), None), ((), {"k": 1.5})]


def test_pickle_inputs(tmp_path: Path) -> None:
    path = tmp_path / "args.pkl"
    path.write_bytes(pickle.dumps([1, [2, 3], {"k": 4}]))
    inputs = read_inputs(path)
    assert inputs.total == 3 and inputs.plain is None
    assert list(inputs.calls) == [((1,), None), ((2, 3), None), ((), {"k": 4})]


def test_pickle_that_is_not_a_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "args.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(InputError, match="not a list"):
        read_inputs(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        read_inputs(tmp_path / "nope.jsonl")


def test_load_function_errors_name_module_and_function() -> None:
    assert load_function("tests.jobs:square")(3) == 9
    with pytest.raises(InputError, match="cannot import module 'no_such_module_xyz'"):
        load_function("no_such_module_xyz:f")
    with pytest.raises(InputError, match="has no 'nope'"):
        load_function("tests.jobs:nope")
    with pytest.raises(InputError, match="MODULE:FUNCTION"):
        load_function("justaname")


def test_parse_kwargs() -> None:
    assert parse_kwargs('{"draws": 5}') == {"draws": 5}
    with pytest.raises(InputError, match="JSON object"):
        parse_kwargs("[1]")
    with pytest.raises(InputError, match="not valid JSON"):
        parse_kwargs("{draws")


@pytest.mark.parametrize("lines, kept", [
    ("1\n-2\n\n9223372036854775807\n", array("q", [1, -2, 2**63 - 1])),
    ("1.5\n-0.0\n1e300\n", array("d", [1.5, -0.0, 1e300])),
    ("1\n2.5\n", None),  # mixed: 1 must stay an int, 2.5 a float
    ("1\ntrue\n", None),  # a bool is no int: True must stay True
    ("true\nfalse\n", None),
    ("1\n1180591620717411303424\n", None),  # past 64 bits
    ('1\n"2"\n', None),
    ("[1]\n2\n", None),
], ids=["ints", "floats", "mixed", "bool after int", "bools", "big int", "string", "list"])
def test_a_file_of_numbers_of_one_kind_is_kept_as_an_array(tmp_path: Path, lines: str,
                                                            kept: array | None) -> None:
    """Such a file is read once (when it is checked) and sliced into messages; any other
    is read again lazily. The calls are the same either way."""
    path = tmp_path / "args.jsonl"
    path.write_text(lines)
    inputs = read_inputs(path)
    assert inputs.plain == kept
    if kept is not None:
        assert type(inputs.plain) is array and inputs.plain.typecode == kept.typecode
    expected = [inputs_mod.to_call(json.loads(line)) for line in lines.splitlines() if line]
    assert inputs.total == len(expected)
    calls = list(inputs.calls)
    assert calls == expected
    assert [type(args[0]) for args, _ in calls] == [type(args[0]) for args, _ in expected]


def test_a_file_of_more_numbers_than_kept_is_read_again(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs_mod, "KEPT_MAX_INPUTS", 2)
    path = tmp_path / "args.jsonl"
    path.write_text("1\n2\n")
    assert read_inputs(path).plain == array("q", [1, 2])
    path.write_text("1\n2\n3\n")
    inputs = read_inputs(path)
    assert inputs.plain is None and list(inputs.calls) == [((1,), None), ((2,), None),
                                                         ((3,), None)]


def test_a_pickled_list_of_single_arguments_is_sliced_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "args.pkl"
    path.write_bytes(pickle.dumps([1, "two", (3, 4), None]))
    inputs = read_inputs(path)
    assert inputs.plain == [1, "two", (3, 4), None] and inputs.total == 4
    assert list(inputs.calls) == [((1,), None), (("two",), None), (((3, 4),), None),
                                  ((None,), None)]
