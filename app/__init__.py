"""dmq-gateway.

The sans-IO core (:mod:`app.dmq`) may be compiled (``make compiled``: C extensions
beside the sources). Which one runs is :func:`core`. ``DMQ_GATEWAY_CORE=pure`` in the
environment makes this process import the Python sources even where extensions are
built, so that both can be run, tested and measured from one tree.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType

__version__ = "0.1.0"

#: The environment variable that forces the pure-Python core, and its one value.
CORE_ENV = "DMQ_GATEWAY_CORE"
#: The package whose modules may be compiled.
CORE_PACKAGE = "app.dmq"


class _SourceOnlyFinder(importlib.abc.MetaPathFinder):
    """Finds ``app.dmq`` modules from their ``.py`` files only, never an extension."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(CORE_PACKAGE + ".") or not path:
            return None
        loader = (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES)
        for entry in path:
            spec = importlib.machinery.FileFinder(entry, loader).find_spec(fullname)
            if spec is not None:
                return spec
        return None


def _select_core() -> None:
    value = os.environ.get(CORE_ENV, "")
    if value == "pure":
        sys.meta_path.insert(0, _SourceOnlyFinder())
    elif value not in ("", "auto"):
        raise SystemExit(
            f"{CORE_ENV}={value!r} is not a core choice: use 'pure' (Python sources only) "
            "or leave it unset (the compiled core when built)"
        )


_select_core()


def core() -> str:
    """``"compiled"`` when the codec and node run from C extensions, else ``"pure Python"``."""
    from app.dmq import node, sip

    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    compiled = all(str(m.__file__).endswith(suffixes) for m in (sip, node))
    return "compiled" if compiled else "pure Python"
