from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from deathstar.cli.inputs import InputError, load_function, parse_kwargs, read_calls


def test_jsonl_shapes_become_calls(tmp_path: Path) -> None:
    path = tmp_path / "args.jsonl"
    path.write_text('[1, 2]\n{"x": 3}\n\n7\n"text"\n[[1, 2]]\n')
    calls, total = read_calls(path)
    assert total == 5
    assert list(calls) == [((1, 2), None), ((), {"x": 3}), ((7,), None), (("text",), None),
                           (([1, 2],), None)]


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("1\n2\n{not json\n4\n")
    # Checked when the file is opened, before any input is sent anywhere.
    with pytest.raises(InputError) as info:
        read_calls(path)
    assert str(path) in str(info.value) and "line 3" in str(info.value)


@pytest.mark.parametrize("bad", [b"1 2", b"[1", b"1,2", b'{"a": 1}}', b"\xff\xfe1",
                                 b"nan", b"'single'"])
def test_each_line_must_hold_exactly_one_json_value(tmp_path: Path, bad: bytes) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'  5  \n[1, "x"]\n' + bad + b"\n6\n")
    with pytest.raises(InputError) as info:
        read_calls(path)
    assert f"{path}, line 3: not valid JSON" in str(info.value)
    path.write_bytes(b'  5  \n[1, "x"]\n\t{"k": 1.5}\r\n')
    calls, total = read_calls(path)
    assert total == 3 and list(calls) == [((5,), None), ((1, "x"), None), ((), {"k": 1.5})]


def test_pickle_inputs(tmp_path: Path) -> None:
    path = tmp_path / "args.pkl"
    path.write_bytes(pickle.dumps([1, [2, 3], {"k": 4}]))
    calls, total = read_calls(path)
    assert total == 3
    assert list(calls) == [((1,), None), ((2, 3), None), ((), {"k": 4})]


def test_pickle_that_is_not_a_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "args.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(InputError, match="not a list"):
        read_calls(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        read_calls(tmp_path / "nope.jsonl")


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
