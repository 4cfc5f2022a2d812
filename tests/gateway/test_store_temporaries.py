"""Temporaries a crash left in the state dir are gone after the next start."""

from __future__ import annotations

from pathlib import Path

from app.gateway.store import DB_NAME, StateStore


def test_open_removes_leftover_temporaries_and_keeps_everything_else(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = StateStore(state)
    first.open()
    first.close()
    leftovers = [state / ".peers-a1b2c3.json", state / ".peers-zz.json"]
    for leftover in leftovers:
        leftover.write_text('{"peers": {"half": ')
    # Files that merely look alike, and the database itself, stay.
    kept = [state / "peers-notes.json", state / "other.json"]
    for other in kept:
        other.write_text("{}")

    store = StateStore(state)
    store.open()
    try:
        assert [p for p in leftovers if p.exists()] == []
        assert all(p.exists() for p in kept)
        assert (state / DB_NAME).exists()
        assert store.load_peers() == {}
    finally:
        store.close()
