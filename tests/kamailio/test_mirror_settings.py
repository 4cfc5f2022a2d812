"""--kamailio-mirrors and --htable-autoexpire: defaults, parsing, one-sentence errors."""

from __future__ import annotations

import pytest

from app import settings
from app.dmq.errors import ConfigError


def config(**cli: object) -> object:
    return settings.load(cli).gateway_config()


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    for name in ("DMQ_KAMAILIO_MIRRORS", "DMQ_HTABLE_AUTOEXPIRE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))


def test_every_mirror_runs_by_default() -> None:
    built = settings.load({}).gateway_config()
    assert built.kamailio_mirrors == ("htable", "usrloc", "dialog")
    assert built.htable_autoexpire == ()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("htable", ("htable",)),
        ("HTABLE, dialog", ("htable", "dialog")),
        ("htable htable", ("htable",)),
        ("none", ()),
        ("", ()),
    ],
)
def test_mirrors_are_chosen_by_name(given: str, expected: tuple[str, ...]) -> None:
    built = settings.load({"kamailio_mirrors": given}).gateway_config()
    assert built.kamailio_mirrors == expected


def test_autoexpire_tables_from_the_command_line_and_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built = settings.load({"htable_autoexpire": ["hx=300", "sess=60"]}).gateway_config()
    assert built.htable_autoexpire == (("hx", 300), ("sess", 60))
    monkeypatch.setenv("DMQ_HTABLE_AUTOEXPIRE", "a=1, b=2")
    assert settings.load({}).gateway_config().htable_autoexpire == (("a", 1), ("b", 2))


@pytest.mark.parametrize(
    ("cli", "sentence"),
    [
        (
            {"kamailio_mirrors": "htable,presence"},
            "--kamailio-mirrors 'htable,presence': 'presence' is not a mirror "
            "(htable, usrloc, dialog, or none)",
        ),
        (
            {"htable_autoexpire": ["hx"]},
            "--htable-autoexpire 'hx': must be TABLE=SECONDS, SECONDS a positive whole number",
        ),
        (
            {"htable_autoexpire": ["hx=0"]},
            "--htable-autoexpire 'hx=0': must be TABLE=SECONDS, SECONDS a positive whole number",
        ),
    ],
)
def test_a_bad_value_is_one_sentence_naming_the_option(
    cli: dict[str, object], sentence: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings.load(cli).gateway_config()
    assert str(caught.value) == sentence


def test_a_bad_value_from_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DMQ_KAMAILIO_MIRRORS", "usrloc,bogus")
    with pytest.raises(ConfigError) as caught:
        settings.load({}).gateway_config()
    assert str(caught.value).startswith("DMQ_KAMAILIO_MIRRORS 'usrloc,bogus': 'bogus'")


def test_dialog_sync_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DMQ_DIALOG_SYNC", raising=False)
    assert settings.load({}).gateway_config().dialog_sync is False
    assert settings.load({"dialog_sync": True}).gateway_config().dialog_sync is True
    monkeypatch.setenv("DMQ_DIALOG_SYNC", "true")
    assert settings.load({}).gateway_config().dialog_sync is True
