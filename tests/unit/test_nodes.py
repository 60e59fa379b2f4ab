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


def test_named_clusters_and_settings_from_the_config_file(tmp_path: Path) -> None:
    """A fresh interpreter reads config.toml: flag > env > file > default, and named
    clusters expand (a cluster naming itself is an error)."""
    import json
    import subprocess
    import sys

    cfg = tmp_path / "config.toml"
    cfg.write_text('[defaults]\nheartbeat_interval = 0.5\nliveness = 9\n\n'
                   '[clusters]\nlab = ["a", "b:7000"]\nall = ["lab", "c"]\nloop = ["loop"]\n')
    code = ("import json, deathstar.config as c; from deathstar.nodes import parse_cluster;"
            "print(json.dumps([c.HEARTBEAT_INTERVAL_S, c.LIVENESS, c.SOURCES['LIVENESS'][1],"
            " c.SOURCES['HEARTBEAT_INTERVAL'][1], [n.name for n in parse_cluster('all')]]))")
    env = {"DEATHSTAR_CONFIG": str(cfg), "DEATHSTAR_LIVENESS": "4", "PATH": "/usr/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    hb, liveness, liveness_from, hb_from, nodes = json.loads(out.stdout)
    assert (hb, liveness) == (0.5, 4)
    assert liveness_from == "env DEATHSTAR_LIVENESS" and hb_from == str(cfg)
    assert nodes == ["a", "b:7000", "c"]
    loop = subprocess.run([sys.executable, "-c", "from deathstar.nodes import parse_cluster;"
                           "parse_cluster('loop')"], env=env, capture_output=True, text=True)
    assert "names itself" in loop.stderr
    cfg.write_text("[defaults\n")
    bad = subprocess.run([str(Path(sys.executable).with_name("deathstar")), "config", "show"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and str(cfg) in bad.stderr
