"""The history's pages in the state store: one row per commit, trimmed and read back
by offset, and the rows of the former one-row-per-message table moved over once."""

from __future__ import annotations

import json
from pathlib import Path

from app.gateway.models import PeerSettings
from app.gateway.store import MIGRATED_PAGE, StateStore


def test_one_page_per_commit_read_back_after_the_trimmed_offset(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.open()
    try:
        store.save_peer("p", PeerSettings(), "e1")
        store.begin()
        for offset in range(1, 6):
            stream = ("p", "sip:o", "oe", "", offset + 10)
            store.append(
                "p", "e1", offset, 1.0, "sip:s", "text/plain", b"m%d" % offset, None, stream
            )
        store.commit()
        store.append("p", "e1", 6, 2.0, "sip:s", None, b"", {"from": 1, "to": 2}, None)
        pages = store.db.execute("SELECT first, last FROM pages ORDER BY first").fetchall()
        assert pages == [(1, 5), (6, 6)]
        # The stream's position was written with its entries.
        assert store.load_streams() == [(("p", "sip:o", "oe", ""), 16)]
        # A page that straddles the trimmed offset is read from just after it.
        store.trim("p", "e1", 3)
        newest = store.load_history("p", "e1", 10, after=3)
        assert [(e.offset, e.body, e.gap) for e in newest] == [
            (4, b"m4", None),
            (5, b"m5", None),
            (6, b"", {"from": 1, "to": 2}),
        ]
        assert [e.offset for e in store.load_history("p", "e1", 2, after=3)] == [5, 6]
        assert store.latest_offset("p", "e1") == 6
        store.trim("p", "e1", 5)
        assert store.db.execute("SELECT first, last FROM pages").fetchall() == [(6, 6)]
    finally:
        store.close()


def test_a_rolled_back_batch_leaves_no_page(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.open()
    try:
        store.begin()
        store.append("p", "e1", 1, 1.0, "sip:s", None, b"x")
        store.rollback()
        store.begin()
        store.append("p", "e1", 2, 1.0, "sip:s", None, b"y")
        store.commit()
        assert [e.body for e in store.load_history("p", "e1", 10)] == [b"y"]
    finally:
        store.close()


def test_rows_of_the_former_history_table_are_moved_into_pages_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.open()
    count = MIGRATED_PAGE + 10
    with store.transaction() as db:
        db.execute("INSERT INTO peers (peer_id, settings, epoch) VALUES ('p', '{}', 'e1')")
        for offset in range(1, count + 1):
            db.execute(
                "INSERT INTO history (peer_id, epoch, offset, at, sender, content_type, body, "
                "gap, origin, origin_epoch, recipient, seq) "
                "VALUES ('p', 'e1', ?, 1.0, 'sip:s', NULL, ?, ?, 'sip:o', 'oe', '', ?)",
                (
                    offset,
                    b"m%d" % offset,
                    json.dumps({"from": 1, "to": 1}) if offset == 1 else None,
                    offset,
                ),
            )
    store.close()
    store.open()
    try:
        entries = store.load_history("p", "e1", count)
        assert [e.offset for e in entries] == list(range(1, count + 1))
        assert entries[0].gap == {"from": 1, "to": 1} and entries[-1].body == b"m%d" % count
        assert store.db.execute("SELECT count(*) FROM history").fetchone() == (0,)
        assert store.db.execute("SELECT count(*) FROM pages").fetchone() == (2,)
        assert store.load_streams() == [(("p", "sip:o", "oe", ""), count + 1)]
    finally:
        store.close()
