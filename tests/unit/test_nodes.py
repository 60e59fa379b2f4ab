from __future__ import annotations

from pathlib import Path

import pytest

from deathstar.nodes import ClusterSpecError, parse_cluster, parse_node


def test_port_convention() -> None:
    n = parse_node("node1")
    assert (n.exec_endpoint, n.status_endpoint) == ("tcp://node1:6000", "tcp://node1:6001")
    n = parse_node("node2:7000")
    assert (n.exec_endpoint, n.status_endpoint) == ("tcp://node2:7000", "tcp://node2:7001")
    n = parse_node("[::1]:7000")
    assert n.exec_endpoint == "tcp://[::1]:7000" and n.name == "[::1]:7000"


@pytest.mark.parametrize("bad", ["", "host:port", "host:0", "host:70000", "[::1", ":6000"])
def test_bad_nodes(bad: str) -> None:
    with pytest.raises(ClusterSpecError):
        parse_node(bad)


def test_cluster_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nodes_file = tmp_path / "nodes.txt"
    nodes_file.write_text("# lab\nkrypton\nxenon:7000  # big one\n\n")
    names = [n.name for n in parse_cluster(f"a,@{nodes_file}") or []]
    assert names == ["a", "krypton", "xenon:7000"]
    assert [n.name for n in parse_cluster(["a", "b:7"]) or []] == ["a", "b:7"]
    monkeypatch.setenv("DEATHSTAR_CLUSTER", "x,y")
    assert [n.name for n in parse_cluster(None) or []] == ["x", "y"]
    monkeypatch.delenv("DEATHSTAR_CLUSTER")
    assert parse_cluster(None) is None


def test_cluster_errors(tmp_path: Path) -> None:
    with pytest.raises(ClusterSpecError, match="named twice"):
        parse_cluster("a,a:6000")
    with pytest.raises(ClusterSpecError, match="cannot read node file"):
        parse_cluster(f"@{tmp_path / 'missing.txt'}")
    with pytest.raises(ClusterSpecError, match="names no node"):
        parse_cluster(" , ")
