"""The user's own modules, shipped as source.

A function from ``mymod.py`` (a file of the user's, not installed on the nodes) is pickled
*by reference* (``mymod.f``), so its module must exist where it is unpickled. Rather than
pickling the module's contents by value (which drags every global the function touches,
locks and caches included, into the pickle as a snapshot), the client sends the source
files: ``bundle_for`` starts from the modules a pickle referenced and adds what they
import from the same source tree (their globals that are modules, functions or classes
of other local modules, names their functions import lazily, and parent packages), reads
the ``.py`` files and names the set by a content hash. A worker writes the files to a
folder of its own per bundle and imports them under their real names
(``deathstar.worker.imports``).

"Local" means: a module with a ``.py`` file that lies outside the installed locations
(the standard library, site-packages) and is not deathstar itself. ``__main__`` is never
shipped: a notebook's or a script's own functions still travel by value.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from types import CodeType, FunctionType, ModuleType
from typing import Any, Iterable

#: A bundle bigger than this is refused, naming its largest files (source trees are small;
#: a bigger one is a data file loaded as a module, or the wrong folder).
MAX_BUNDLE_BYTES = 64 * 1024 * 1024


class ShippingError(Exception):
    """The user's modules cannot be shipped (unreadable, or too large); names the file."""


@dataclass(frozen=True)
class Bundle:
    """The source files of a set of local modules: ``files`` is (module name, path
    relative to the import root, source bytes) per module, sorted by name; ``hash`` names
    the whole content. ``origins``: each file's path here, for tracebacks. Plain data: a
    worker unpickles it before any user code."""

    hash: str
    files: tuple[tuple[str, str, bytes], ...]
    origins: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.files]


def _installed_roots() -> tuple[str, ...]:
    roots = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(os.path.realpath(path))
    for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix):
        roots.add(os.path.realpath(os.path.join(prefix, "lib")))
    return tuple(sorted(roots))


_INSTALLED = _installed_roots()
_OURS = ("deathstar",)


def relative_path(module: ModuleType) -> str | None:
    """Where ``module``'s source sits below its import root (``pkg/sub.py``,
    ``pkg/__init__.py``), or None when its file does not match its name (a module loaded
    from a path under another name cannot be imported by that name elsewhere)."""
    path = getattr(module, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py"):
        return None
    parts = module.__name__.split(".")
    is_package = os.path.basename(path) == "__init__.py"
    rel = os.path.join(*parts, "__init__.py") if is_package else os.path.join(*parts) + ".py"
    return rel if os.path.realpath(path).endswith(os.sep + rel) else None


_LOCAL: dict[tuple[str, str], bool] = {}  # (name, file) -> is_local


def is_local(module: object) -> bool:
    """A module the user wrote and nodes may not have: a ``.py`` file outside the
    installed locations, importable by its name, neither ``__main__`` nor deathstar."""
    if not isinstance(module, ModuleType):
        return False
    key = (module.__name__, str(getattr(module, "__file__", None)))
    known = _LOCAL.get(key)
    if known is None:
        known = _LOCAL[key] = _is_local(module)
    return known


def _is_local(module: ModuleType) -> bool:
    name = module.__name__
    if name == "__main__" or name.split(".")[0] in _OURS or relative_path(module) is None:
        return False
    real = os.path.realpath(str(module.__file__))
    return not any(real.startswith(root + os.sep) for root in _INSTALLED)


def _local(name: str) -> ModuleType | None:
    module = sys.modules.get(name)
    return module if is_local(module) else None


def _code_names(code: CodeType) -> Iterable[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _code_names(const)


def _imports_of(module: ModuleType) -> set[str]:
    """The local modules ``module`` uses: its parent packages, the modules its globals
    come from, and modules its functions import lazily (by name in their code)."""
    found: set[str] = set()
    parts = module.__name__.split(".")
    found.update(".".join(parts[:i]) for i in range(1, len(parts)))
    package = module.__name__ if hasattr(module, "__path__") else ".".join(parts[:-1])
    for value in list(vars(module).values()):
        if isinstance(value, ModuleType):
            found.add(value.__name__)
        elif isinstance(value, (FunctionType, type)):
            owner = getattr(value, "__module__", None)
            if isinstance(owner, str):
                found.add(owner)
            if isinstance(value, FunctionType) and owner == module.__name__:
                for word in _code_names(value.__code__):
                    found.add(word)
                    if package:
                        found.add(f"{package}.{word}")
    return {name for name in found if _local(name) is not None}


def local_closure(names: Iterable[str]) -> list[ModuleType]:
    """The local modules among ``names`` and every local module they use, transitively
    (sorted by name)."""
    todo = [n for n in names if _local(n) is not None]
    seen: dict[str, ModuleType] = {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        module = _local(name)
        if module is None:
            continue
        seen[name] = module
        todo.extend(_imports_of(module) - seen.keys())
    return [seen[n] for n in sorted(seen)]


_SOURCES: dict[str, tuple[tuple[int, int], bytes]] = {}  # path -> ((mtime, size), source)
_CLOSURES: dict[frozenset[str], tuple[int, tuple[Any, ...], list[ModuleType]]] = {}
_BUNDLES: dict[tuple[Any, ...], Bundle] = {}


def _stamp(module: ModuleType) -> tuple[int, int]:
    path = str(module.__file__)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ShippingError(f"module {module.__name__} cannot be shipped: its source "
                            f"{path} cannot be read ({exc.strerror})") from None
    return (st.st_mtime_ns, st.st_size)


def _source(module: ModuleType, stamp: tuple[int, int]) -> bytes:
    path = str(module.__file__)
    cached = _SOURCES.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ShippingError(f"module {module.__name__} cannot be shipped: its source "
                            f"{path} cannot be read ({exc.strerror})") from None
    _SOURCES[path] = (stamp, data)
    return data


def bundle_for(names: Iterable[str]) -> Bundle | None:
    """The bundle of the local modules among ``names`` and what they use; None when
    there are none. Raises ShippingError naming a file that cannot be read, or the
    largest files when the bundle exceeds ``MAX_BUNDLE_BYTES``.

    Cached: the modules' files are looked at (one ``stat`` each) on every call, and the
    imports followed again when a module was imported or a file changed since."""
    key = frozenset(names)
    cached = _CLOSURES.get(key)
    if cached is not None and cached[0] == len(sys.modules) and \
            all(sys.modules.get(m.__name__) is m for m in cached[2]):
        modules = cached[2]
        stamps = tuple((m.__name__, m.__file__, _stamp(m)) for m in modules)
        if stamps == cached[1]:
            return _BUNDLES.get(stamps)  # None: no local module
    modules = local_closure(key)
    stamps = tuple((m.__name__, m.__file__, _stamp(m)) for m in modules)
    _CLOSURES[key] = (len(sys.modules), stamps, modules)
    if not modules:
        return None
    if stamps not in _BUNDLES:
        _BUNDLES[stamps] = _make_bundle(modules, [stamp for _, _, stamp in stamps])
    return _BUNDLES[stamps]


def _make_bundle(modules: list[ModuleType], stamps: list[tuple[int, int]]) -> Bundle:
    files = []
    for module, stamp in zip(modules, stamps):
        rel = relative_path(module)
        assert rel is not None  # is_local checked it
        files.append((module.__name__, rel, _source(module, stamp)))
    size = sum(len(src) for _, _, src in files)
    if size > MAX_BUNDLE_BYTES:
        biggest = sorted(files, key=lambda f: -len(f[2]))[:3]
        raise ShippingError(
            f"the modules to ship are {size} bytes, more than the {MAX_BUNDLE_BYTES} "
            "allowed (deathstar.shipping.MAX_BUNDLE_BYTES); the largest: "
            + ", ".join(f"{rel} ({len(src)} bytes)" for _, rel, src in biggest))
    digest = hashlib.blake2b(digest_size=16)
    for name, rel, src in files:
        for part in (name.encode(), rel.encode(), src):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return Bundle(digest.hexdigest(), tuple(files),
                  tuple(os.path.realpath(str(m.__file__)) for m in modules))
