"""Which core runs: the compiled extensions when they are built, the sources otherwise.

``make test-compiled`` builds the extensions and runs the core's tests with
``DMQ_GATEWAY_EXPECT_COMPILED=1``, so that a build the interpreter silently ignores
(an extension for another Python, a stale ``.so``) fails here instead of measuring
and testing the pure-Python core by mistake.
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
        pytest.skip("only under make test-compiled (DMQ_GATEWAY_EXPECT_COMPILED=1)")
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


@pytest.mark.skipif(not BUILT, reason="no compiled core built (make compiled)")
def test_an_extension_older_than_its_source_is_not_run(tmp_path: Path) -> None:
    """A copy of the package whose sip.py changed after the build runs the sources."""
    import shutil

    shutil.copytree(REPO / "app", tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    source = tmp_path / "app" / "dmq" / "sip.py"
    extension = tmp_path / "app" / "dmq" / ("sip" + SUFFIX)
    newer = extension.stat().st_mtime + 10
    os.utime(source, (newer, newer))
    environ = {k: v for k, v in os.environ.items() if k != app.CORE_ENV}
    result = subprocess.run(
        [sys.executable, "-c", "import app; from app.dmq import sip; print(sip.__file__)"],
        cwd=tmp_path,
        env={**environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(source)
    assert "sip.py changed since the core was compiled" in result.stderr


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
