from __future__ import annotations

import msgpack
import pytest

from deathstar import protocol

V = protocol.PROTOCOL_VERSION


def test_envelope_round_trip_keeps_fields_and_payload() -> None:
    frames = protocol.pack(protocol.TASK, [b"pickle", b"buffer"], id=7, fn="abc", n=2,
                           timeout=None)
    msg = protocol.decode(frames)
    assert msg.type == protocol.TASK
    assert (msg.env["id"], msg.env["fn"], msg.env["n"], msg.env["nb"]) == (7, "abc", 2, 2)
    assert msg.payload == [b"pickle", b"buffer"]
    assert msg.raw == frames[0]


def test_other_protocol_version_names_both_versions() -> None:
    raw = msgpack.packb({"v": protocol.PROTOCOL_VERSION + 1, "t": "hello"})
    with pytest.raises(protocol.VersionMismatch) as info:
        protocol.decode([raw])
    text = str(info.value)
    assert f"peer speaks {protocol.PROTOCOL_VERSION + 1}" in text
    assert f"we speak {protocol.PROTOCOL_VERSION}" in text


@pytest.mark.parametrize("frames, fragment", [
    ([], "empty"),
    ([b"\xc1garbage"], "undecodable"),
    ([msgpack.packb([1, 2, 3])], "not a map"),
    ([msgpack.packb({"t": "hb"})], "no protocol version"),
    ([msgpack.packb({"v": V, "t": "launch-missiles"})], "unknown message type"),
    ([msgpack.packb({"v": V, "t": "task", "id": "x", "fn": "h", "n": 1, "nb": 0,
                     "timeout": None})], "field 'id'"),
    ([msgpack.packb({"v": V, "t": "task", "id": 1, "fn": "h", "n": 1, "nb": 2,
                     "timeout": None}), b"only-one"], "declares 2 payload"),
    ([msgpack.packb({"v": V, "t": "hb"}), b"stray"], "declares 0 payload"),
    ([msgpack.packb({"v": True, "t": "hb"})], "no protocol version"),
    ([msgpack.packb({"v": V, "t": "result", "id": 1, "worker": "w", "ok": [True],
                     "ts": [[1.0, 2.0]], "nb": 0})], "field 'ok'"),
    ([msgpack.packb({"v": V, "t": "result", "id": 1, "worker": "w", "ok": b"\x01\x01",
                     "ts": bytes(24), "nb": 0})], "neither a pair per input nor one pair"),
])
def test_malformed_messages_raise_protocol_error(frames: list[bytes], fragment: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=fragment):
        protocol.decode(frames)


def test_result_outcomes_round_trip_as_two_byte_strings() -> None:
    frames = protocol.pack(protocol.RESULT, [b"pickle"], id=3, worker="w",
                           **protocol.outcome_fields([True, False, True],
                                                     [1.5, 2.5, 3.0, 3.25, 4.0, 9.0]))
    msg = protocol.decode(frames)
    oks, starts, ends = protocol.result_outcomes(msg)
    assert list(oks) == [1, 0, 1]
    assert list(starts) == [1.5, 3.0, 4.0] and list(ends) == [2.5, 3.25, 9.0]
    assert isinstance(msg.env["ts"], bytes) and len(msg.env["ts"]) == 48


def test_a_result_with_one_pair_of_times_spreads_it_over_its_inputs() -> None:
    """Inputs too short to time one by one share their message's time evenly."""
    frames = protocol.pack(protocol.RESULT, [b"pickle"], id=3, worker="w",
                           **protocol.outcome_fields([True] * 4, [10.0, 14.0]))
    oks, starts, ends = protocol.result_outcomes(protocol.decode(frames))
    assert list(oks) == [1] * 4 and len(starts) == len(ends) == 4
    assert list(starts) == [10.0, 11.0, 12.0, 13.0] and list(ends) == [11.0, 12.0, 13.0, 14.0]
    assert starts[-1] == 13.0 and ends[1:3] == [12.0, 13.0]


def test_oversized_envelope_is_refused_before_decoding() -> None:
    big = msgpack.packb({"v": V, "t": "hb", "pad": "x" * (protocol.MAX_ENVELOPE_BYTES + 1)})
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.decode([big])


def test_python_minor_mismatch_is_refused_naming_both() -> None:
    ours = protocol.local_versions()
    theirs = dict(ours, python="3.1.4")
    with pytest.raises(protocol.VersionMismatch) as info:
        protocol.compare_versions(ours, theirs, "node n1")
    assert "node n1 runs Python 3.1.4" in str(info.value)
    assert f"we run {ours['python']}" in str(info.value)


def test_python_patch_difference_is_a_warning() -> None:
    ours = protocol.local_versions()
    major, minor, _ = ours["python"].split(".")[:3]
    theirs = dict(ours, python=f"{major}.{minor}.999")
    warnings = protocol.compare_versions(ours, theirs, "node n1")
    assert any("python" in w and "999" in w for w in warnings)


@pytest.mark.parametrize("frames", [
    protocol.hello(1.0, "/dev/shm/probe"),
    protocol.welcome(1.0, "node1", 2, "proof"),
    protocol.ready(1.0, "w1", 42),
    protocol.refused("no", protocol.REFUSED_HELLO),
    protocol.lost([3, 4], "gone", "w1", protocol.LOST_UNSTARTED, 9),
    protocol.cancel([5]),
    protocol.heartbeat(3),
    protocol.pack(protocol.TASK, [b"p"], id=1, fn="h", n=2, timeout=1.5,
                  **{protocol.F_IX: [0, 1], protocol.F_SEED: -3, protocol.F_EST: 0.01}),
    protocol.pack(protocol.RESULT, [b"v"], id=1, worker="w",
                  **protocol.outcome_fields([True, False], [1.0, 2.0, 3.0, 4.0])),
])
def test_a_message_handed_over_in_memory_is_what_its_frames_decode_to(frames: list) -> None:
    """A hosted peer takes a message made in its process without decoding it: the
    envelope it gets must equal the decoding of the same frames off a socket (no tuple
    where the wire gives a list), and frames from outside are never taken as such."""
    handed = protocol.in_memory(frames)
    decoded = protocol.decode(list(frames))
    assert handed is not None
    assert (handed.env, handed.payload, handed.raw) == (decoded.env, decoded.payload,
                                                        decoded.raw)
    assert protocol.in_memory(list(frames)) is None
    relayed = protocol.Packed(list(frames), decoded.env)  # a daemon relaying a result
    assert protocol.in_memory(relayed) == decoded
