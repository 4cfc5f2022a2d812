"""The serve options of durable history and ordered delivery: defaults, the
environment, and the one sentence each bad value gets. (Beside tests/cli/test_settings.py,
whose helpers they reuse.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.gateway.store import HistoryStore, HistorySync
from tests.cli.test_settings import clean_env, config, error

__all__ = ["clean_env"]  # the fixture, used by name


def test_defaults(clean_env: Path) -> None:
    settings = config()
    assert settings.history_store is HistoryStore.SQLITE
    assert settings.history_sync is HistorySync.NORMAL
    assert (settings.reorder_wait, settings.reorder_limit) == (None, 10_000)
    # Derived from Timer F: 4 x 32 s with the default T1, 4 x 2 s with --timer-f 2.
    assert settings.effective_reorder_wait == 128.0
    assert config("--timer-f", "2").effective_reorder_wait == 8.0
    assert config("--reorder-wait", "3").effective_reorder_wait == 3.0


def test_from_the_command_line_and_the_environment(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DMQ_HISTORY_STORE", "MEMORY")
    monkeypatch.setenv("DMQ_REORDER_WAIT", "0.5")
    settings = config("--history-sync", "full", "--reorder-limit", "10")
    assert settings.history_store is HistoryStore.MEMORY
    assert settings.history_sync is HistorySync.FULL
    assert (settings.reorder_wait, settings.reorder_limit) == (0.5, 10)


@pytest.mark.parametrize(
    ("argv", "sentence"),
    [
        (["--history-store", "disk"], "--history-store 'disk': must be sqlite or memory"),
        (["--history-sync", "off"], "--history-sync 'off': must be normal or full"),
        (["--reorder-wait", "-1"], "--reorder-wait -1: must be 0 to 3600 seconds"),
        (["--reorder-wait", "soon"], "--reorder-wait 'soon': must be a number"),
        (["--reorder-limit", "0"], "--reorder-limit 0: must be 1 to 1000000"),
        (["--reorder-limit", "2.5"], "--reorder-limit '2.5': must be a whole number"),
    ],
)
def test_each_error_is_one_sentence_naming_the_option(
    clean_env: Path, capsys: pytest.CaptureFixture[str], argv: list[str], sentence: str
) -> None:
    assert error(capsys, *argv) == sentence


def test_an_error_from_the_environment_names_the_variable(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DMQ_REORDER_LIMIT", "0")
    assert error(capsys) == "DMQ_REORDER_LIMIT 0: must be 1 to 1000000"
