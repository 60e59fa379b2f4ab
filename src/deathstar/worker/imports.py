"""The user's modules in a worker: bundles of source files (``deathstar.shipping``)
written to folders of this process and imported under their real names.

Each bundle gets its own folder, named by its content hash, in a private folder of this
worker (mode 0700, removed at exit): the one its daemon gave it (removed by the daemon
when the worker dies), else a scratch folder of the temporary directory
(``deathstar.scratch``: swept once its process is gone). Before a function of a bundle
is unpickled or called, that bundle is made *active*: its folder goes first on
``sys.path`` (the previous bundle's folder comes off), and ``sys.modules`` holds its
modules under their names (those of another bundle are put aside). So two clients with two versions of
``mymod`` each get their own, and a module edited and sent again is imported afresh.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from types import ModuleType

from deathstar import scratch
from deathstar.shipping import Bundle

#: Bundles whose folders a worker keeps (least recently used ones go first).
MAX_BUNDLES = 32


class ModuleFolders:
    """The bundles this worker has written, and which one is active."""

    def __init__(self, root: str | None = None) -> None:
        self.given = root  # the folder to use (made on first use), if the daemon gave one
        self.root: str | None = None
        self.bundles: dict[str, Bundle] = {}
        self.imported: dict[str, dict[str, ModuleType]] = {}  # bundle hash -> its modules
        self.active: str | None = None
        self.noted: tuple[str, int] | None = None  # (active, len(sys.modules)) at ``remember``

    def folder(self, bundle: Bundle) -> str:
        if self.root is None:
            if self.given is not None:
                os.makedirs(self.given, mode=0o700, exist_ok=True)
                self.root = self.given
            else:
                self.root = scratch.make_folder("deathstar-modules-")
        return os.path.join(self.root, bundle.hash)

    def install(self, bundle: Bundle) -> None:
        """Write ``bundle``'s files into its folder (once)."""
        if bundle.hash in self.bundles:
            self.bundles[bundle.hash] = self.bundles.pop(bundle.hash)  # most recent last
            return
        target = self.folder(bundle)
        staging = tempfile.mkdtemp(dir=self.root)
        for _, rel, source in bundle.files:
            if os.path.isabs(rel) or ".." in rel.split(os.sep):
                raise ValueError(f"a shipped module path leaves its folder: {rel!r}")
            path = os.path.join(staging, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(source)
        os.rename(staging, target)
        self.bundles[bundle.hash] = bundle
        while len(self.bundles) > MAX_BUNDLES:
            self.forget(next(iter(self.bundles)))

    def forget(self, bundle_hash: str) -> None:
        bundle = self.bundles.pop(bundle_hash)
        self.imported.pop(bundle_hash, None)
        if self.active == bundle_hash:
            self.deactivate()
        shutil.rmtree(self.folder(bundle), ignore_errors=True)

    def activate(self, bundle: Bundle | None) -> None:
        """Make ``bundle`` the one whose modules ``import`` finds (None: no bundle)."""
        key = None if bundle is None else bundle.hash
        if key == self.active:
            return
        self.deactivate()
        if bundle is None:
            return
        self.install(bundle)
        folder = self.folder(bundle)
        sys.path.insert(0, folder)
        kept = self.imported.get(bundle.hash, {})
        for name in bundle.names:
            module = sys.modules.get(name)
            if name in kept:
                sys.modules[name] = kept[name]
            elif module is not None and not _inside(module, folder):
                del sys.modules[name]  # another copy of it: import ours instead
        importlib.invalidate_caches()
        self.active = bundle.hash

    def deactivate(self) -> None:
        """Put the active bundle's modules aside and take its folder off the path."""
        if self.active is None:
            return
        bundle = self.bundles[self.active]
        folder = self.folder(bundle)
        self.remember()
        for name in bundle.names:
            module = sys.modules.get(name)
            if module is not None and _inside(module, folder):
                del sys.modules[name]
        while folder in sys.path:
            sys.path.remove(folder)
        self.active = None

    def remember(self) -> None:
        """Note the active bundle's modules imported so far (call after unpickling or
        running its code), so that activating it again brings back those objects."""
        if self.active is None or self.noted == (self.active, len(sys.modules)):
            return  # nothing was imported since it last looked
        self.noted = (self.active, len(sys.modules))
        folder = self.folder(self.bundles[self.active])
        kept = self.imported.setdefault(self.active, {})
        for name in self.bundles[self.active].names:
            module = sys.modules.get(name)
            if module is not None and _inside(module, folder):
                kept[name] = module

    def translate(self, text: str) -> str:
        """``text`` (a traceback) with the active bundle's file paths here replaced by
        the paths the files have on the client."""
        if self.active is None:
            return text
        bundle = self.bundles[self.active]
        folder = self.folder(bundle)
        for (_, rel, _), origin in zip(bundle.files, bundle.origins):
            text = text.replace(os.path.join(folder, rel), origin)
        return text

    def close(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def _inside(module: ModuleType, folder: str) -> bool:
    path = getattr(module, "__file__", None)
    return isinstance(path, str) and path.startswith(folder + os.sep)
