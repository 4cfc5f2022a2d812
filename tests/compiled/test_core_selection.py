"""Which core runs: the compiled extensions when they are built, the sources otherwise.

``make test`` (when ``make core`` compiled it) and ``make test-compiled`` run the tests
with ``DMQ_GATEWAY_EXPECT_COMPILED=1``, so that a build the interpreter silently
ignores (an extension for another Python, a stale ``.so``) fails here instead of
measuring and testing the pure-Python core by mistake. A machine that cannot compile
is tried for real: setup.py with no compiler to be found.
"""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

import app
from app.dmq import node, sip

REPO = Path(__file__).resolve().parents[2]
DMQ_DIR = REPO / "app" / "dmq"
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
BUILT = sorted(p.name for p in DMQ_DIR.glob(f"*{SUFFIX}"))
FORCED_PURE = os.environ.get(app.CORE_ENV) == "pure"


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != app.CORE_ENV}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_expected_build_is_present() -> None:
    if os.environ.get("DMQ_GATEWAY_EXPECT_COMPILED") != "1":
        pytest.skip("only when the core was compiled (DMQ_GATEWAY_EXPECT_COMPILED=1)")
    assert "sip" + SUFFIX in BUILT and "node" + SUFFIX in BUILT, BUILT


@pytest.mark.skipif(not BUILT, reason="no compiled core built (make compiled)")
@pytest.mark.skipif(FORCED_PURE, reason="DMQ_GATEWAY_CORE=pure forces the sources")
def test_built_extensions_are_the_modules_imported() -> None:
    for module in (sip, node):
        assert module.__file__ is not None
        assert module.__file__.endswith(SUFFIX), module.__file__
    assert app.core() == "compiled"


def test_pure_switch_imports_the_sources() -> None:
    code = (
        "import app; from app.dmq import sip, node; print(sip.__file__, node.__file__, app.core())"
    )
    result = _python(code, DMQ_GATEWAY_CORE="pure")
    assert result.returncode == 0, result.stderr
    sip_file, node_file, core = result.stdout.split(" ", 2)
    assert sip_file.endswith("sip.py") and node_file.endswith("node.py")
    assert core.strip() == "pure Python"


def test_version_names_the_core() -> None:
    code = "from app.cli import main; main(['--version'])"
    pure = _python(code, DMQ_GATEWAY_CORE="pure")
    assert pure.stdout.strip() == f"dmq-gateway {app.__version__} (core: pure Python)"
    default = _python(code)
    expected = "compiled" if BUILT else "pure Python"
    assert default.stdout.strip() == f"dmq-gateway {app.__version__} (core: {expected})"


def test_unknown_core_choice_is_refused_with_its_name() -> None:
    result = _python("import app", DMQ_GATEWAY_CORE="fast")
    assert result.returncode != 0
    assert "DMQ_GATEWAY_CORE='fast'" in result.stderr and "pure" in result.stderr


def _copy_with_newer_sip_source(tmp_path: Path, source_tree: bool) -> Path:
    """A copy of the package (with setup.py beside it: a source tree) whose sip.py is
    younger than its extension."""
    import shutil

    shutil.copytree(REPO / "app", tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    if source_tree:
        shutil.copy(REPO / "setup.py", tmp_path / "setup.py")
    source = tmp_path / "app" / "dmq" / "sip.py"
    extension = tmp_path / "app" / "dmq" / ("sip" + SUFFIX)
    newer = extension.stat().st_mtime + 10
    os.utime(source, (newer, newer))
    return source


def _sip_file_in(tree: Path) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != app.CORE_ENV}
    return subprocess.run(
        [sys.executable, "-c", "import app; from app.dmq import sip; print(sip.__file__)"],
        cwd=tree,
        env={**environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(not BUILT, reason="no compiled core built (make core)")
def test_an_extension_older_than_its_source_is_not_run(tmp_path: Path) -> None:
    """In a source tree whose sip.py changed after the build, the sources run."""
    source = _copy_with_newer_sip_source(tmp_path, source_tree=True)
    result = _sip_file_in(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(source)
    assert "sip.py changed since the core was compiled" in result.stderr


@pytest.mark.skipif(not BUILT, reason="no compiled core built (make core)")
def test_a_native_codec_older_than_its_c_source_is_not_run(tmp_path: Path) -> None:
    """The codec's C fast paths are built from _sipscan.c, not from a .py: an edited
    .c without a rebuild runs the sources too, rather than the old machine code."""
    import shutil

    shutil.copytree(REPO / "app", tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "setup.py", tmp_path / "setup.py")
    source = tmp_path / "app" / "dmq" / "_sipscan.c"
    newer = (tmp_path / "app" / "dmq" / ("_sipscan" + SUFFIX)).stat().st_mtime + 10
    os.utime(source, (newer, newer))
    result = _sip_file_in(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "app" / "dmq" / "sip.py")
    assert "_sipscan.c changed since the core was compiled" in result.stderr


def test_expected_build_has_the_native_codec() -> None:
    """make compiled builds the codec's C fast paths beside the mypyc modules."""
    if os.environ.get("DMQ_GATEWAY_EXPECT_COMPILED") != "1":
        pytest.skip("only under make test-compiled (DMQ_GATEWAY_EXPECT_COMPILED=1)")
    assert "_sipscan" + SUFFIX in BUILT, BUILT
    assert sip._native is True


def test_pure_switch_runs_no_native_codec() -> None:
    """DMQ_GATEWAY_CORE=pure imports the stand-in module, so no C code parses."""
    result = _python(
        "from app.dmq import sip, _sipscan; print(sip._native, _sipscan.__file__)",
        **{app.CORE_ENV: "pure"},
    )
    assert result.returncode == 0, result.stderr
    native, path = result.stdout.split()
    assert native == "False"
    assert path.endswith("_sipscan.py"), path


@pytest.mark.skipif(not BUILT, reason="no compiled core built (make core)")
def test_an_installed_compiled_core_runs_whatever_its_files_dates(tmp_path: Path) -> None:
    """An installed wheel has no setup.py beside the package, and pip writes a source
    after its extension as often as not: the extension runs all the same."""
    source = _copy_with_newer_sip_source(tmp_path, source_tree=False)
    result = _sip_file_in(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(source.with_name("sip" + SUFFIX))
    assert result.stderr == ""


def _tree_without_extensions(tmp_path: Path) -> Path:
    """What setup.py builds from (the package, its metadata files), extensions left out."""
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(
        REPO / "app", tree / "app", ignore=shutil.ignore_patterns("__pycache__", "*.so")
    )
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, tree / name)
    return tree


def _build_in_place(tree: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v for k, v in os.environ.items() if k not in ("CC", "DMQ_GATEWAY_COMPILE", app.CORE_ENV)
    }
    environ.update(env)
    return subprocess.run(
        [sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"],
        cwd=tree,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("no_compiler", ["CC=/nonexistent", "PATH without a compiler"])
def test_a_machine_without_a_compiler_gets_the_pure_core_and_one_line(
    tmp_path: Path, no_compiler: str
) -> None:
    """What ``make core`` (so ``make run`` and ``make test``) runs, on a machine that
    cannot compile: the build succeeds, says why in one line, and leaves no extension,
    so the package imports and names the pure-Python core."""
    tree = _tree_without_extensions(tmp_path)
    if no_compiler.startswith("CC="):
        env = {"CC": "/nonexistent"}
    else:
        empty = tmp_path / "bin"
        empty.mkdir()
        env = {"PATH": str(empty)}
    result = _build_in_place(tree, **env)
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("dmq-gateway:")]
    assert len(said) == 1, result.stderr
    assert said[0].startswith("dmq-gateway: pure-Python core: "), said
    assert "cannot build against Python.h" in said[0]
    if "CC" in env:
        assert "/nonexistent" in said[0]
    assert not list((tree / "app").rglob("*.so"))
    core = subprocess.run(
        [sys.executable, "-c", "import app; print(app.core())"],
        cwd=tree,
        env={**{k: v for k, v in os.environ.items() if k != app.CORE_ENV}, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert core.returncode == 0, core.stderr
    assert core.stdout.strip() == "pure Python"


def test_a_build_that_must_be_compiled_fails_without_a_compiler(tmp_path: Path) -> None:
    """``DMQ_GATEWAY_COMPILE=1`` (``make compiled``, a wheel for distribution) never
    quietly gives the pure core."""
    tree = _tree_without_extensions(tmp_path)
    result = _build_in_place(tree, CC="/nonexistent", DMQ_GATEWAY_COMPILE="1")
    assert result.returncode != 0
    assert "dmq-gateway: cannot compile the core: /nonexistent cannot build" in result.stderr
    assert not list((tree / "app").rglob("*.so"))


def test_an_unknown_compile_choice_is_refused_with_its_name(tmp_path: Path) -> None:
    tree = _tree_without_extensions(tmp_path)
    result = _build_in_place(tree, DMQ_GATEWAY_COMPILE="yes")
    assert result.returncode != 0
    assert "DMQ_GATEWAY_COMPILE='yes'" in result.stderr and "auto" in result.stderr
