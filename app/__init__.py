"""dmq-gateway.

The sans-IO core (:mod:`app.dmq`, and the htable mirror's codec and replica in
:mod:`app.kamailio`) may be compiled (``make compiled``: C extensions beside the
sources). Which one runs is :func:`core`. ``DMQ_GATEWAY_CORE=pure`` in the
environment makes this process import the Python sources even where extensions are
built, so that both can be run, tested and measured from one tree. In a source tree, an
extension older than its source (the source changed since ``make core``) would run
stale code, so then the sources are imported instead, with a warning saying to rebuild.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__version__ = "0.1.0"

#: The environment variable that forces the pure-Python core, and its one value.
CORE_ENV = "DMQ_GATEWAY_CORE"
#: The packages whose modules may be compiled (setup.py's ``COMPILED`` says which).
CORE_PACKAGES = ("app.dmq", "app.kamailio")


class _SourceOnlyFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of :data:`CORE_PACKAGES` from their ``.py`` files only, never
    an extension."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.rpartition(".")[0] not in CORE_PACKAGES or not path:
            return None
        loader = (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES)
        for entry in path:
            spec = importlib.machinery.FileFinder(entry, loader).find_spec(fullname)
            if spec is not None:
                return spec
        return None


def _stale_extensions() -> list[str]:
    """The compiled core modules whose source (``.py``, or ``.c`` for the native codec)
    changed after they were built in place.

    Only in a source tree (``setup.py`` beside the package: ``make core`` builds there,
    and an edited source must not be shadowed by an old build). An installed package
    (a wheel) is never stale: the installer writes its files in any order, so a source
    may be a few microseconds younger than its extension from the same build.
    """
    root = Path(__file__).resolve().parent
    if not (root.parent / "setup.py").is_file():
        return []
    stale: list[str] = []
    for name in CORE_PACKAGES:
        package = root.parent.joinpath(*name.split("."))
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            for extension in package.glob(f"*{suffix}"):
                stem = extension.name.removesuffix(suffix)
                # A mypyc module is built from its .py, the native codec from its .c.
                for source in (package / f"{stem}.py", package / f"{stem}.c"):
                    if source.exists() and source.stat().st_mtime > extension.stat().st_mtime:
                        stale.append(source.name)
    return sorted(stale)


def _select_core() -> None:
    value = os.environ.get(CORE_ENV, "")
    if value == "pure":
        sys.meta_path.insert(0, _SourceOnlyFinder())
    elif value in ("", "auto"):
        stale = _stale_extensions()
        if stale:
            print(
                f"dmq-gateway: {', '.join(stale)} changed since the core was compiled; "
                "running the pure-Python core (make core to rebuild)",
                file=sys.stderr,
            )
            sys.meta_path.insert(0, _SourceOnlyFinder())
    else:
        raise SystemExit(
            f"{CORE_ENV}={value!r} is not a core choice: use 'pure' (Python sources only) "
            "or leave it unset (the compiled core when built)"
        )


_select_core()


#: The modules ``make core`` compiles (setup.py's ``COMPILED``; tests/compiled checks
#: that the two lists agree).
COMPILED_MODULES = (
    "app.dmq.sip",
    "app.dmq.node",
    "app.dmq.nodes",
    "app.dmq.outbox",
    "app.dmq.peers",
    "app.dmq.transaction",
    "app.dmq.timers",
    "app.dmq.events",
    "app.kamailio.htable_codec",
    "app.kamailio.replica",
)


def core() -> str:
    """``"compiled"`` when every module of :data:`COMPILED_MODULES` runs from its C
    extension (the codec, the node, the htable mirror's hot path), else ``"pure
    Python"``: a tree built before a module joined the list runs that one from its
    source, and is not called compiled."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    modules = [importlib.import_module(name) for name in COMPILED_MODULES]
    compiled = all(str(m.__file__).endswith(suffixes) for m in modules)
    return "compiled" if compiled else "pure Python"
