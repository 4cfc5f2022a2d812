"""The compiled core: the sans-IO DMQ modules, and the htable mirror's codec and
replica, built with mypyc where the machine can.

``DMQ_GATEWAY_COMPILE`` says what to build:

* ``auto`` (the default): the modules in ``COMPILED`` become C extensions when a C
  compiler and the headers of the interpreter that builds are present (a real compile of
  a file that includes ``Python.h`` decides: ``CC`` is honoured as setuptools honours
  it); otherwise one line on stderr says so and the package is pure Python. A build
  that fails for any other reason (mypyc refusing a module) fails: only a machine that
  cannot compile falls back.
* ``1``: the extensions or an error (a build that must be compiled, e.g. a wheel for
  distribution).
* ``0``: pure Python, nothing probed (the editable install the Makefile makes; it
  builds the extensions in place itself, ``make core``).

``pip install .`` and ``python -m build`` therefore give a wheel with the compiled core
where they can (mypy, which ships mypyc, is a build requirement in pyproject.toml) and a
pure-Python wheel elsewhere. The sources stay in the package either way, so a missing
extension falls back to them, and ``DMQ_GATEWAY_CORE=pure`` picks them at run time.

``transaction.py`` keeps its ``TimerSettings`` a plain Python class
(``mypyc_attr(native_class=False)``): compiled, an ``int`` given for one of its
``float`` fields would be stored as a float and change the configuration's error
sentences, as with ``config.py`` below.

**Explicit __init__.** A compiled dataclass is built through the Python ``__init__``
the dataclass decorator writes, interpreted even when compiled code builds it: 0.5 us
for a four-field class and 0.9 us for a frozen one (whose ``__init__`` goes through
``object.__setattr__``), against 0.07-0.1 us for an ``__init__`` written in the class,
which mypyc compiles and the decorator keeps (it writes one only where the class has
none). Every dataclass of the core built per message (``SipRequest``, ``SipResponse``,
the transactions and their ``FinalResult``, ``OutboxMessage``, ``PeerReply``, the
codec's ``SetCell`` and its kin...) therefore writes its ``__init__`` out, with the
generated one's parameters, defaults and checks (a ``default_factory`` becomes
``None``); ``tests/compiled/test_explicit_init.py`` holds each to its fields and, on the
compiled core, checks that it is compiled. Frozen ones set their fields with
``object.__setattr__``, which pure Python needs and mypyc turns into a plain store.

The htable mirror's hot path is compiled in the same group (``app/kamailio/htable_codec.py``,
``app/kamailio/replica.py``); what it met:

* a compiled dataclass stores an ``int`` given for a ``float`` field as a float: the
  replica's ``Entry`` is a plain class (``int | float`` for its expiry, so a change
  frame still says ``60``, not ``60.0``) with a dataclass's equality and repr;
* a NamedTuple's constructor is a Python function: ``Change`` is built with
  ``tuple.__new__``, as ``node.py`` builds ``PeerMessage``;
* module functions are bound at compile time, so a test cannot patch one to change
  what another calls: the codec's full reading is a function of its own
  (``read_full``) that tests call directly;
* a regular expression is no faster compiled, and a loop over bytes is six times
  slower as Python than one: ``read_set`` scans where it is compiled and matches where
  it is not (both tested on every build);
* the mirror itself (``app/kamailio/htable.py``) stays Python: it is bound to asyncio
  and imports the gateway for its types.

Modules left out, and why (they stay Python and import the compiled ones):

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
import sys
import tempfile

from setuptools import Extension, setup

COMPILED = [
    "app/dmq/sip.py",
    "app/dmq/node.py",
    "app/dmq/nodes.py",
    "app/dmq/outbox.py",
    "app/dmq/peers.py",
    "app/dmq/transaction.py",
    "app/dmq/timers.py",
    "app/dmq/events.py",
    # The htable mirror's hot path: every KDMQ SET of peer htable is read by the codec
    # and applied to the replica (the mirror around them, asyncio-bound, stays Python).
    "app/kamailio/htable_codec.py",
    "app/kamailio/replica.py",
]

#: The environment variable that chooses, and its values.
COMPILE_ENV = "DMQ_GATEWAY_COMPILE"
CHOICES = ("auto", "1", "0")


def cannot_compile() -> str | None:
    """Why this machine cannot build a C extension for this interpreter, or None.

    Compiles a few lines that include ``Python.h`` with the compiler setuptools would
    use: a missing compiler and missing headers (Debian's ``python3-dev``) are both
    found the way the real build would meet them, and nothing else is guessed."""
    import sysconfig

    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    cc = str(compiler.compiler_so[0]) if compiler.compiler_so else "cc"
    with tempfile.TemporaryDirectory() as work, tempfile.TemporaryFile("w+") as said:
        source = os.path.join(work, "probe.c")
        with open(source, "w") as file:
            file.write("#include <Python.h>\nint probe(void) { return PY_MAJOR_VERSION; }\n")
        # What the compiler says goes to a file (one line of it is the reason given),
        # not to the terminal as a wall of errors.
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(said.fileno(), 2)
        try:
            compiler.compile(
                [source], output_dir=work, include_dirs=[sysconfig.get_paths()["include"]]
            )
        except Exception as exc:  # any failure to build the probe: no extension either
            said.seek(0)
            lines = [line.strip() for line in said.read().splitlines() if "error" in line]
            reason = lines[0] if lines else str(exc).strip() or type(exc).__name__
            return f"{cc} cannot build against Python.h: {reason}"
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return None


#: The commands that build extensions. setup.py also runs for metadata (egg_info,
#: dist_info) and source distributions, where neither the probe nor mypyc's analysis of
#: every module (tens of seconds) is of any use; an editable install stays pure Python
#: (``make core`` builds the extensions in place beside it).
BUILDS = {"build", "build_ext", "bdist_wheel", "install"}


def _ext_modules() -> list[object]:
    choice = os.environ.get(COMPILE_ENV, "auto")
    if choice not in CHOICES:
        raise SystemExit(f"{COMPILE_ENV}={choice!r}: use auto (the default), 1 or 0")
    if choice == "0" or not BUILDS.intersection(sys.argv[1:]):
        return []
    why = cannot_compile()
    if why is not None:
        if choice == "1":
            raise SystemExit(f"dmq-gateway: cannot compile the core: {why}")
        print(f"dmq-gateway: pure-Python core: {why}", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    # One shared library inside the package (app/dmq/core__mypyc*.so), not a hashed
    # name at the top of the tree, where an installed script would not find it.
    extensions = list(mypycify(COMPILED, opt_level="3", group_name="app.dmq.core"))
    # The codec's native fast paths (plain C; sip.py falls back to Python without it).
    extensions.append(Extension("app.dmq._sipscan", ["app/dmq/_sipscan.c"]))
    return extensions


setup(ext_modules=_ext_modules())
