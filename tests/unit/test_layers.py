"""The house rules, read from the source: no import cycle (lazy imports and TYPE_CHECKING
imports included) and no import from a lower floor to a higher one.

Data flows one way: ``cli -> deploy -> client -> ground floor <- daemon <- worker``, and
the client may host a daemon (the embedded cluster runs one in its own process); the
ground floor (protocol, serialize, config, errors, report, keys, nodes, exitcodes, the
version) imports nothing above it, and nothing but the package face and ``__main__``
import the face.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
SCRIPTS = ROOT / "scripts"

#: What each room may import besides itself and the ground floor.
ALLOWED: dict[str, set[str]] = {
    "ground": set(),
    "daemon": set(),
    "worker": set(),
    "client": {"daemon"},  # the embedded cluster hosts the daemon in the client's process
    "deploy": {"client"},  # a provider waits until its daemons answer (status queries)
    "cli": {"client", "deploy", "daemon", "worker"},
    "face": {"client", "deploy"},
    "main": {"cli"},
}


def module_names(tree: Path, package_root: Path) -> dict[str, Path]:
    """Every module under ``tree`` by dotted name (a package by its own name)."""
    names = {}
    for path in sorted(tree.rglob("*.py")):
        parts = list(path.relative_to(package_root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The known modules that ``name`` imports anywhere in its file (functions too)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]  # `import a.b.c` of a name inside a.b
            if target and target != name:
                found.add(target)
    return found


def graph(tree: Path, package_root: Path) -> dict[str, set[str]]:
    known = module_names(tree, package_root)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def room(module: str) -> str:
    parts = module.split(".")
    if module == "deathstar":
        return "face"
    if module == "deathstar.__main__":
        return "main"
    if len(parts) > 2 or parts[1] in ALLOWED:
        return parts[1]
    return "ground"


def test_the_graph_is_read() -> None:
    """The reader itself: it must see the imports a broken layout would have."""
    edges = graph(SRC / "deathstar", SRC)
    assert "deathstar.protocol" in edges["deathstar.daemon.loop"]
    assert "deathstar.client" in edges["deathstar"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("tree,package_root", [(SRC / "deathstar", SRC), (SCRIPTS, SCRIPTS)],
                         ids=["src", "scripts"])
def test_no_import_cycle(tree: Path, package_root: Path) -> None:
    assert cycles(graph(tree, package_root)) == []


def test_no_import_points_up() -> None:
    upward = []
    for module, targets in graph(SRC / "deathstar", SRC).items():
        mine = room(module)
        for target in targets:
            theirs = room(target)
            if theirs not in {mine, "ground"} | ALLOWED[mine]:
                upward.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert upward == []
