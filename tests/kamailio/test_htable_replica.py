"""The htable replica applies each action as a Kamailio 5.6 node does (time given).

Sans I/O: the replica takes the time as an argument, so expiries are checked at exact
instants. What Kamailio does is from ht_api.c / ht_dmq.c (5.6): expiry only in
autoexpire tables, values matched by removals only when they are strings.
"""

from __future__ import annotations

import json
import re

import pytest

from app.dmq.peers import PeerMessage
from app.dmq.sip import SipUri
from app.kamailio.htable import HtableMirror, HtableReplica
from app.kamailio.htable_codec import (
    Cell,
    DeleteCell,
    RemoveCells,
    SetCell,
    SetCellExpire,
    SyncAnswer,
    build,
    read_set,
)

T0 = 1_800_000_000.0
SENDER = SipUri.parse("sip:htable@10.0.0.1:5060")


def values(replica: HtableReplica, table: str, now: float = T0) -> dict[str, str | int]:
    return {key: entry.value for key, entry in replica.items(table, now)}


def test_set_replace_delete() -> None:
    replica = HtableReplica()
    [change] = replica.apply(SetCell("ht", "k", "v"), T0, "sip:a:1")
    assert (change.event, change.table, change.key) == ("set", "ht", "k")
    replica.apply(SetCell("ht", "k", 7), T0)
    assert values(replica, "ht") == {"k": 7}
    [change] = replica.apply(DeleteCell("ht", "k"), T0)
    assert change.event == "delete" and change.entry is None
    assert replica.apply(DeleteCell("ht", "k"), T0) == []  # nothing to delete
    assert replica.cells == 0


def test_the_same_value_again_changes_nothing() -> None:
    replica = HtableReplica()
    answer = SyncAnswer((Cell("ht", "a", "1"), Cell("ht", "b", 2)))
    assert len(replica.apply(answer, T0)) == 2
    assert replica.apply(answer, T0 + 1) == []  # a donor that answered twice
    # "1" and 1 are different values in Kamailio (string vs integer).
    assert len(replica.apply(SetCell("ht", "b", "2"), T0)) == 1


def test_expiry_only_in_an_autoexpire_table() -> None:
    replica = HtableReplica(autoexpire={"hx": 300})
    replica.apply(SetCell("ht", "k", "v"), T0)
    assert replica.apply(SetCellExpire("ht", "k", 5), T0) == []  # ignored, as in 5.6
    replica.apply(SetCell("hx", "k", "v"), T0)
    assert replica.get("hx", "k", T0).expires == T0 + 300  # type: ignore[union-attr]
    replica.apply(SetCellExpire("hx", "k", 5), T0 + 0.7)  # whole seconds, as Kamailio
    assert replica.get("hx", "k", T0 + 5.99) is not None  # expire < time(NULL): not yet
    assert replica.get("hx", "k", T0 + 6) is None  # gone for readers at once
    assert replica.next_deadline() == T0 + 6
    assert replica.expire(T0 + 5.99) == []
    [change] = replica.expire(T0 + 6)
    assert (change.event, change.key) == ("expire", "k")
    assert values(replica, "ht") == {"k": "v"}


def test_a_set_restarts_autoexpire_and_expire_zero_means_never() -> None:
    replica = HtableReplica(autoexpire={"hx": 10})
    replica.apply(SetCell("hx", "k", "v"), T0)
    replica.apply(SetCell("hx", "k", "w"), T0 + 8)  # updateexpire=1 (the default)
    assert replica.expire(T0 + 18.5) == []
    assert values(replica, "hx", T0 + 12) == {"k": "w"}
    replica.apply(SetCellExpire("hx", "k", 0), T0 + 12)
    assert replica.expire(T0 + 10_000) == []
    assert values(replica, "hx", T0 + 10_000) == {"k": "w"}


def test_sync_cells_carry_absolute_expiries_and_mark_the_table() -> None:
    replica = HtableReplica()
    replica.apply(
        SyncAnswer((Cell("hy", "a", "x", int(T0) + 30), Cell("hy", "old", "x", int(T0) - 1))),
        T0,
    )
    assert values(replica, "hy") == {"a": "x"}  # the expired one is not kept
    assert replica.has_autoexpire("hy")
    replica.apply(SetCellExpire("hy", "a", 3), T0)  # now honoured: the table expires
    assert [c.event for c in replica.expire(T0 + 4)] == ["expire"]


def test_removals_by_regex_and_prefix_on_names_and_values() -> None:
    replica = HtableReplica()
    for key, value in [
        ("tmp_a", "x"),
        ("TMP_b", "x"),
        ("pre_1", "old-1"),
        ("keep", "OLD-2"),
        ("n", 5),
    ]:
        replica.apply(SetCell("ht", key, value), T0)
    # regex on names: case-insensitive (REG_ICASE)
    removed = replica.apply(RemoveCells("ht", "re", "name", "^tmp_"), T0)
    assert sorted(c.key for c in removed) == ["TMP_b", "tmp_a"]
    # regex on values: strings only
    removed = replica.apply(RemoveCells("ht", "re", "value", "^old-"), T0)
    assert sorted(c.key for c in removed) == ["keep", "pre_1"]
    # prefix: case-sensitive; an integer value never matches
    replica.apply(SetCell("ht", "Pre_2", "5"), T0)
    assert replica.apply(RemoveCells("ht", "sw", "name", "pre_"), T0) == []
    assert replica.apply(RemoveCells("ht", "sw", "value", "5"), T0)[0].key == "Pre_2"
    assert values(replica, "ht") == {"n": 5}
    with pytest.raises(re.error):
        replica.apply(RemoveCells("ht", "re", "name", "("), T0)


def message(body: bytes, sender: str, origin: str | None = None) -> PeerMessage:
    return PeerMessage(
        1, "htable", body, "application/json", SipUri.parse(sender), "c", 0.0, 1
    )._replace(origin=origin)


def test_the_mirror_names_each_sender_and_notes_each_kamailio_node() -> None:
    """Senders alternate (their text is kept per node): every change names its own
    sender without the user part, and every node that sent without an origin stamp
    is known to the bootstrap as a Kamailio node, however the messages interleave."""
    mirror = HtableMirror(None, clock=lambda: T0)  # type: ignore[arg-type]
    stream = mirror.stream_for("ht")
    senders = ["sip:htable@10.0.0.1:5060", "sip:10.0.0.2:5070", "sip:htable@10.0.0.1:5060"]
    for n, sender in enumerate(senders * 3):
        body = b'{"action":2,"htname":"ht","cname":"k%d","type":0,"intval":%d,"mode":1}' % (n, n)
        assert mirror.handle(message(body, sender)).code == 200
    mirror.handle(
        message(b'{"action":4,"htname":"ht","cname":"k0","mode":0}', "sip:gw@10.0.0.3:5080", "x")
    )
    got = [json.loads(text) for _, text in stream.subscribe(0, stream.epoch).subscriber.frames]
    assert [f["from"] for f in got] == [
        "sip:10.0.0.1:5060",
        "sip:10.0.0.2:5070",
        "sip:10.0.0.1:5060",
    ] * 3 + ["sip:10.0.0.3:5080"]
    assert [f["data"] for f in got[:2]] == [
        {"value": 0, "type": "int", "expires": None},
        {"value": 1, "type": "int", "expires": None},
    ]
    assert got[-1]["event"] == "delete" and got[-1]["data"] is None
    # The third node stamped its message (a gateway): not taken for a Kamailio node.
    assert mirror.bootstrap.kamailio_nodes == {"10.0.0.1:5060", "10.0.0.2:5070"}


def test_the_usual_set_and_the_full_reading_change_the_same() -> None:
    """Kamailio's own SET bodies take the mirror's shortcut; the same SETs written
    otherwise (spaces after the separators) are read in full. Both mirrors end with
    the same cells, counters and change frames: the same value again changes nothing,
    an autoexpire table's cells expire, strings and integers stay apart."""
    fast = HtableMirror(None, autoexpire={"hx": 60}, clock=lambda: T0)  # type: ignore[arg-type]
    full = HtableMirror(None, autoexpire={"hx": 60}, clock=lambda: T0)  # type: ignore[arg-type]
    for table in ("ht", "hx"):
        fast.stream_for(table).epoch = full.stream_for(table).epoch
    sets: list[tuple[str, str, str | int]] = [
        ("ht", "a", "1"),
        ("ht", "a", "1"),  # the same again
        ("ht", "a", 1),  # an integer now
        ("hx", "b", "v"),
        ("hx", "b", "v"),  # renews its expiry: the same cell, no change
        ("ht", "é", -(2**31)),
    ]
    for table, key, value in sets:
        message = SetCell(table, key, value)
        usual = build(message)
        spaced = json.dumps(json.loads(usual)).encode()
        assert read_set(usual) is not None and read_set(spaced) is None
        assert fast.handle(PeerMessage(1, "htable", usual, None, SENDER, "c", 0.0, 1)).code == 200
        assert full.handle(PeerMessage(1, "htable", spaced, None, SENDER, "c", 0.0, 1)).code == 200
    assert fast.replica.tables == full.replica.tables
    assert fast.replica.next_deadline() == full.replica.next_deadline() == T0 + 61
    assert fast.applied == full.applied == len(sets)
    for table in ("ht", "hx"):
        got = fast.stream_for(table).subscribe(0, fast.stream_for(table).epoch)
        want = full.stream_for(table).subscribe(0, full.stream_for(table).epoch)
        assert list(got.subscriber.frames) == list(want.subscriber.frames)
    assert len(fast.streams["ht"].subscribers.pop().frames) == 3


def test_a_set_keeps_the_expiry_of_a_live_cell_of_a_table_with_no_declared_autoexpire() -> None:
    """A table known to expire only from a sync answer (its autoexpire unknown): a SET
    of a live cell keeps the cell's expiry, a SET after it expired makes a cell that
    never expires, and a SET of a new key too."""
    replica = HtableReplica()
    replica.apply(SyncAnswer((Cell("hy", "a", "x", int(T0) + 30),)), T0)
    [change] = replica.apply(SetCell("hy", "a", "y"), T0 + 10)
    assert change.entry is not None and change.entry.expires == int(T0) + 30
    assert change.entry.as_data() == {"value": "y", "type": "str", "expires": int(T0) + 30}
    [change] = replica.apply(SetCell("hy", "a", "y"), T0 + 31)  # expired: a new cell
    assert change.entry is not None and change.entry.expires == 0
    assert replica.get("hy", "a", T0 + 10_000) is not None
    assert replica.expire(T0 + 10_000) == []  # its old deadline is stale
    [change] = replica.apply(SetCell("hy", "b", 1), T0)
    assert change.entry is not None and change.entry.as_data()["expires"] is None


def test_the_same_value_again_after_expiry_is_a_change() -> None:
    """An expired cell is replaced, even by its own value: readers had lost it."""
    replica = HtableReplica(autoexpire={"hx": 5})
    replica.apply(SetCell("hx", "k", "v"), T0)
    assert replica.apply(SetCell("hx", "k", "v"), T0 + 2) != []  # renews its expiry
    assert len(replica.apply(SetCell("hx", "k", "v"), T0 + 9)) == 1
    assert replica.cells == 1


def test_tables_and_cells_beyond_the_bounds_are_refused_and_counted() -> None:
    """A table beyond max_tables and a new cell beyond max_cells change nothing and are
    counted; a cell already held is still replaced at the bound, and a deletion makes
    room again. By SET and by sync answer alike."""
    replica = HtableReplica(max_tables=2, max_cells=3)
    replica.apply(SetCell("t1", "a", 1), T0)
    replica.apply(SyncAnswer((Cell("t2", "b", 2), Cell("t2", "c", 3))), T0)
    assert replica.cells == 3 and replica.refused == 0
    assert replica.apply(SetCell("t3", "a", 1), T0) == []  # a third table
    assert replica.apply(SetCell("t1", "new", 1), T0) == []  # a fourth cell
    assert replica.apply(SyncAnswer((Cell("t2", "d", 4),)), T0) == []
    assert replica.refused == 3 and replica.cells == 3
    assert sorted(replica.tables) == ["t1", "t2"]
    [change] = replica.apply(SetCell("t1", "a", 7), T0)  # held already: replaced
    assert change.entry is not None and change.entry.value == 7
    replica.apply(DeleteCell("t2", "b"), T0)
    assert len(replica.apply(SetCell("t1", "new", 1), T0)) == 1
    assert replica.cells == 3 and replica.refused == 3


def test_the_module_bounds_are_the_defaults() -> None:
    from app.kamailio import htable, replica

    made = HtableReplica()
    assert (made.max_tables, made.max_cells) == (replica.MAX_TABLES, replica.MAX_CELLS)
    assert (htable.MAX_TABLES, htable.MAX_CELLS) == (64, 2_000_000)
