"""deploy/systemd: the unit passes ``systemd-analyze verify``, and its example environment
file sets only options ``dmq-gateway serve`` has."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.gateway import ROOT, clean_env, gateway_command

UNIT = ROOT / "deploy" / "systemd" / "dmq-gateway.service"
ENV_FILE = ROOT / "deploy" / "systemd" / "dmq-gateway.env"
MISSING = "systemd-analyze is not installed (apt-get install systemd)"


def systemd_analyze() -> str:
    """The systemd-analyze binary; skipped where it is missing, but a failure with CI=true."""
    found = shutil.which("systemd-analyze")
    if found:
        return found
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{MISSING}; CI=true, so this is an error, not a skip")
    pytest.skip(MISSING)


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    # verify needs ExecStart's binary to exist: this virtualenv's dmq-gateway.
    script = gateway_command()[0]
    assert Path(script).name == "dmq-gateway", f"no dmq-gateway script installed: {script}"
    text = UNIT.read_text()
    (line,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    unit = tmp_path / "dmq-gateway.service"
    unit.write_text(text.replace(line, f"ExecStart={script} serve"))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr + result.stdout
    # Nothing it complains of, even as a warning, about our unit.
    assert unit.name not in result.stderr, result.stderr


def test_the_unit_keeps_state_in_its_state_directory_and_restarts_on_failure() -> None:
    settings = unit_settings(UNIT.read_text())
    assert settings["StateDirectory"] == ["dmq-gateway"]
    assert "DMQ_STATE_DIR=%S/dmq-gateway" in settings["Environment"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["DynamicUser"] == ["yes"]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["EnvironmentFile"] == ["/etc/dmq-gateway.env"]
    (exec_start,) = settings["ExecStart"]
    assert exec_start.endswith("dmq-gateway serve")


def test_the_example_environment_names_only_real_options() -> None:
    names = re.findall(r"^#?(DMQ_[A-Z_]+)=", ENV_FILE.read_text(), re.MULTILINE)
    assert names, f"no DMQ_* settings in {ENV_FILE}"
    help_text = subprocess.run(
        [*gateway_command(), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=clean_env(),
    ).stdout
    for name in names:
        option = "--" + name.removeprefix("DMQ_").lower().replace("_", "-")
        assert option in help_text, f"{ENV_FILE.name}: {name} is no option ({option})"


def test_every_example_value_is_valid_up_to_the_foreign_address(tmp_path: Path) -> None:
    """Read as the service reads them, the values pass; only the example's address,
    not this machine's, stops the gateway (it cannot bind it), with a sentence naming it."""
    env = clean_env()
    for line in ENV_FILE.read_text().splitlines():
        if line.startswith("DMQ_"):
            key, _, value = line.partition("=")
            env[key] = value
    env["DMQ_STATE_DIR"] = str(tmp_path / "state")
    result = subprocess.run(
        [*gateway_command(), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode != 0
    assert "10.0.0.5" in result.stderr, result.stderr
