"""Optional compiled core: the sans-IO DMQ modules built with mypyc.

Without ``DMQ_GATEWAY_COMPILE=1`` this is plain setuptools and the package is pure
Python (what ``pip install`` and ``make run`` give on any machine). With it, and with
mypy (which ships mypyc), a C compiler and the Python headers present, the modules in
``COMPILED`` become C extensions beside their sources: ``make compiled`` builds them in
place, ``DMQ_GATEWAY_COMPILE=1 pip wheel --no-build-isolation .`` builds a wheel with them.
The sources stay in the package either way, so a missing extension falls back to them.

``transaction.py`` keeps its ``TimerSettings`` a plain Python class
(``mypyc_attr(native_class=False)``): compiled, an ``int`` given for one of its
``float`` fields would be stored as a float and change the configuration's error
sentences, as with ``config.py`` below.

Modules left out, and why (they stay Python and import the compiled ones):

* ``app/dmq/events.py``: not tried; events are built a few per message and read by
  the Python driver, so there is little to gain.
* ``app/dmq/cache.py``: a generic ``OrderedDict`` subclass with ``__slots__``; mypyc
  compiles it, and the compiled class crashes the interpreter (segmentation fault) on
  its first ``put``.
* ``app/dmq/errors.py``: compiled, the class attributes its exception subclasses
  override (``status_hint``) are no longer found on their instances.
* ``app/dmq/config.py``: compiled, an ``int`` given for a ``float`` field becomes a
  float, so its error sentences change (``t1 -1.0`` for ``t1 -1``); it runs once at
  start, so nothing is lost by leaving it Python.
"""

from __future__ import annotations

import os

from setuptools import Extension, setup

COMPILED = [
    "app/dmq/sip.py",
    "app/dmq/node.py",
    "app/dmq/nodes.py",
    "app/dmq/outbox.py",
    "app/dmq/peers.py",
    "app/dmq/transaction.py",
    "app/dmq/timers.py",
]


def _ext_modules() -> list[object]:
    if os.environ.get("DMQ_GATEWAY_COMPILE") != "1":
        return []
    from mypyc.build import mypycify

    # One shared library inside the package (app/dmq/core__mypyc*.so), not a hashed
    # name at the top of the tree, where an installed script would not find it.
    extensions = list(mypycify(COMPILED, opt_level="3", group_name="app.dmq.core"))
    # The codec's native fast paths (plain C; sip.py falls back to Python without it).
    extensions.append(Extension("app.dmq._sipscan", ["app/dmq/_sipscan.c"]))
    return extensions


setup(ext_modules=_ext_modules())
