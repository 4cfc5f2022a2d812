"""The htable mirror's compiled modules are part of the core's build and its switches.

``app/kamailio/htable_codec.py`` and ``app/kamailio/replica.py`` are compiled by the
same ``make core`` as ``app/dmq``: when built they are what runs, ``DMQ_GATEWAY_CORE=pure``
runs their sources, a source edited after the build runs instead of its old
extension (with the warning), and ``--version`` calls the core compiled only when
every compiled module is.
"""

from __future__ import annotations

import ast
import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import app
from app.kamailio import htable, htable_codec, replica

REPO = Path(__file__).resolve().parents[2]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
MIRROR_DIR = REPO / "app" / "kamailio"
MIRROR_MODULES = ("htable_codec", "replica")
BUILT = sorted(p.name for p in MIRROR_DIR.glob(f"*{SUFFIX}"))
FORCED_PURE = os.environ.get(app.CORE_ENV) == "pure"


def _environ(**env: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k != app.CORE_ENV}
    environ.update(env)
    return environ


def _run(code: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=_environ(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_compiled_modules_are_the_ones_setup_compiles() -> None:
    """app.COMPILED_MODULES (what core() and --version check) and setup.py's COMPILED
    (what the build compiles) name the same modules."""
    tree = ast.parse((REPO / "setup.py").read_text())
    [listed] = [
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets)
    ]
    assert isinstance(listed, ast.List)
    paths = [ast.literal_eval(item) for item in listed.elts]
    names = [path.removesuffix(".py").replace("/", ".") for path in paths]
    assert sorted(names) == sorted(app.COMPILED_MODULES)
    assert {"app.kamailio.htable_codec", "app.kamailio.replica"} <= set(names)


def test_expected_mirror_build_is_present() -> None:
    if os.environ.get("DMQ_GATEWAY_EXPECT_COMPILED") != "1":
        pytest.skip("only when the core was compiled (DMQ_GATEWAY_EXPECT_COMPILED=1)")
    assert [m + SUFFIX for m in MIRROR_MODULES] == BUILT, BUILT


@pytest.mark.skipif(not BUILT, reason="no compiled core built (make core)")
@pytest.mark.skipif(FORCED_PURE, reason="DMQ_GATEWAY_CORE=pure forces the sources")
def test_the_built_mirror_modules_are_the_ones_imported() -> None:
    """The codec and the replica run compiled, and the mirror (Python) uses them: the
    names htable.py offers are the compiled classes themselves."""
    for module in (htable_codec, replica):
        assert str(module.__file__).endswith(SUFFIX), module.__file__
    assert str(htable.__file__).endswith(".py")
    assert htable.HtableReplica is replica.HtableReplica
    assert htable.Entry is replica.Entry and htable.Change is replica.Change
    assert app.core() == "compiled"


def test_pure_switch_imports_the_mirror_sources() -> None:
    result = _run(
        "import app; from app.kamailio import htable_codec, replica; "
        "print(htable_codec.__file__, replica.__file__, app.core(), sep='|')",
        DMQ_GATEWAY_CORE="pure",
    )
    assert result.returncode == 0, result.stderr
    codec_file, replica_file, core = result.stdout.strip().split("|")
    assert codec_file == str(MIRROR_DIR / "htable_codec.py")
    assert replica_file == str(MIRROR_DIR / "replica.py")
    assert core == "pure Python"


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "app", tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "setup.py", tmp_path / "setup.py")
    return tmp_path / "app" / "kamailio"


_WHICH = (
    "import app; from app.dmq import sip; from app.kamailio import replica; "
    "print(sip.__file__, replica.__file__, app.core(), sep='|')"
)


@pytest.mark.skipif(not BUILT, reason="no compiled core built (make core)")
def test_a_mirror_module_older_than_its_source_is_not_run(tmp_path: Path) -> None:
    """An htable_codec.py edited after make core: the sources run, all of them, with
    the warning that names it."""
    package = _copy(tmp_path)
    source = package / "htable_codec.py"
    newer = (package / ("htable_codec" + SUFFIX)).stat().st_mtime + 10
    os.utime(source, (newer, newer))
    result = _run(_WHICH, cwd=tmp_path, PYTHONPATH=str(tmp_path))
    assert result.returncode == 0, result.stderr
    sip_file, replica_file, core = result.stdout.strip().split("|")
    assert sip_file == str(tmp_path / "app" / "dmq" / "sip.py")
    assert replica_file == str(package / "replica.py")
    assert core == "pure Python"
    assert "htable_codec.py changed since the core was compiled" in result.stderr


@pytest.mark.skipif(not BUILT, reason="no compiled core built (make core)")
def test_a_tree_with_a_compiled_module_missing_is_not_called_compiled(tmp_path: Path) -> None:
    """A build from before the replica was compiled (its extension absent): that module
    runs from its source, the others compiled, and the core is not called compiled."""
    package = _copy(tmp_path)
    (package / ("replica" + SUFFIX)).unlink()
    result = _run(_WHICH, cwd=tmp_path, PYTHONPATH=str(tmp_path))
    assert result.returncode == 0, result.stderr
    sip_file, replica_file, core = result.stdout.strip().split("|")
    assert sip_file.endswith(SUFFIX)
    assert replica_file == str(package / "replica.py")
    assert core == "pure Python"
    assert result.stderr == ""
