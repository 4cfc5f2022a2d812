"""The htable replica: Kamailio's replicated htables as one 5.6 node holds them.

:class:`HtableReplica` applies what Kamailio's htable sends (the typed messages of
:mod:`app.kamailio.htable_codec`) as a 5.6 node would, sans I/O, with the time given:

* SET replaces the value; in a table with ``autoexpire`` (declared with
  ``--htable-autoexpire TABLE=SECONDS``) a new cell expires ``autoexpire`` seconds
  later and a SET of an existing one restarts that (Kamailio's default
  ``updateexpire=1``); elsewhere a cell never expires by itself.
* SET_EXPIRE (action 3) changes a cell's expiry only in an ``autoexpire`` table, as
  Kamailio does (``ht_set_cell_expire`` ignores the others). A table is taken to have
  ``autoexpire`` when it is declared, or when a sync answer carried one of its cells
  with an expiry (only such a table has them).
* a sync answer's cells are set with their absolute expiry; a cell that is already the
  same changes nothing (a donor answering twice costs no duplicate events).
* DEL and the removals by regex (POSIX ERE, case-insensitive) or prefix, on names or
  string values.
* expiries are whole Unix seconds, as Kamailio keeps them, and a cell is gone once
  the clock's whole seconds are past its expiry (Kamailio's ``expire < time(NULL)``):
  readers no longer see it, and :meth:`HtableReplica.expire` reports it then.

This module has no I/O, clock or event loop (the mirror around it,
:class:`app.kamailio.htable.HtableMirror`, has them), so that it is compiled with the
core (setup.py): every KDMQ SET of peer ``htable`` goes through :meth:`HtableReplica.set`.
For that, :class:`Entry` is a plain class rather than a dataclass (a compiled dataclass
is built through a Python ``__init__``, and stores an ``int`` given for a ``float``
field as a float: an expiry in a change frame would read ``60.0`` for ``60``), with a
dataclass's equality and repr; :class:`Change` stays a NamedTuple (callers unpack it)
and is built with ``tuple.__new__``.

The cells themselves are held as plain tuples (:data:`Stored`), not as :class:`Entry`
objects: a replica holds up to ``MAX_CELLS`` of them for as long as the gateway runs,
and the cyclic collector walks every object that can hold a reference on each full
pass, so two million ``Entry`` objects made each such pass a pause of a tenth of a
second. A tuple of strings and numbers is taken off the collector's lists at its
first pass. :meth:`HtableReplica.get` and :meth:`HtableReplica.items` hand out
:class:`Entry` objects made from them.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any, Final, NamedTuple, final

from app.kamailio.htable_codec import (
    Cell,
    DeleteCell,
    HtableMessage,
    RemoveCells,
    SetCell,
    SetCellExpire,
    SyncAnswer,
    Value,
    compile_regex,
    matches,
)

#: Tables a replica holds at most (Kamailio's are declared in its configuration: a
#: few); the mirror counts streams for tables not seen yet against it too.
MAX_TABLES: Final = 64
#: Cells a replica holds at most, all tables together; beyond it new cells are
#: refused (counted, logged once) rather than the gateway's memory.
MAX_CELLS: Final = 2_000_000


@final
class Entry:
    """One cell of the replica.

    ``expires`` keeps the number it was given (an ``int`` from a SET, a ``float`` from
    a sync answer), as the change frames and the API show it."""

    __slots__ = ("expires", "sender", "updated", "value")

    def __init__(
        self, value: Value, expires: int | float, updated: float, sender: str | None
    ) -> None:
        self.value = value
        #: Absolute Unix time (whole seconds) it expires at; 0: never.
        self.expires = expires
        #: Unix time it was last set.
        self.updated = updated
        #: The node whose message set it (None: this gateway's own PUT).
        self.sender = sender

    def __eq__(self, other: object) -> bool:
        # A dataclass's: the same class and equal fields, in order.
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Entry)
        return (self.value, self.expires, self.updated, self.sender) == (
            other.value,
            other.expires,
            other.updated,
            other.sender,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__qualname__}(value={self.value!r}, expires={self.expires!r}, "
            f"updated={self.updated!r}, sender={self.sender!r})"
        )

    def as_data(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "type": "str" if isinstance(self.value, str) else "int",
            "expires": self.expires or None,
        }


#: A cell as the replica holds it: (value, expires, updated, sender), Entry's fields.
Stored = tuple[Value, int | float, float, str | None]
#: Where each of Entry's fields is in a Stored cell.
_VALUE: Final = 0
_EXPIRES: Final = 1


def _entry(stored: Stored) -> Entry:
    return Entry(stored[0], stored[1], stored[2], stored[3])


def _expired(expires: int | float, now: float) -> bool:
    """Kamailio's test: expiries are whole seconds, and a cell is gone once the clock's
    whole seconds are past it (``it->expire < time(NULL)``)."""
    return bool(expires) and expires < int(now)


class Change(NamedTuple):
    """What one application of a message changed."""

    event: str
    table: str
    key: str
    entry: Entry | None


def _change(event: str, table: str, key: str, entry: Entry | None) -> Change:
    # tuple.__new__ with Change's fields in order: the NamedTuple's own __new__ is a
    # Python function taking keywords, called once per SET.
    change: Change = tuple.__new__(Change, (event, table, key, entry))
    return change


@final
class HtableReplica:
    """Kamailio's htables as one 5.6 node holds them (see the module)."""

    def __init__(
        self,
        autoexpire: dict[str, int] | None = None,
        *,
        max_tables: int = MAX_TABLES,
        max_cells: int = MAX_CELLS,
    ) -> None:
        #: Table name -> key -> cell (see :data:`Stored`).
        self.tables: dict[str, dict[str, Stored]] = {}
        #: The bounds (MAX_TABLES, MAX_CELLS unless a test makes them small).
        self.max_tables = max_tables
        self.max_cells = max_cells
        #: Declared autoexpire seconds per table.
        self.autoexpire: dict[str, int] = dict(autoexpire or {})
        #: Tables seen with expiring cells in a sync answer (autoexpire, unknown value).
        self.expiring: set[str] = set()
        #: (expires + 1, table, key) of cells that expire; stale items are skipped.
        self._deadlines: list[tuple[int | float, str, str]] = []
        #: Cells refused because MAX_CELLS was reached.
        self.refused = 0
        self._cells = 0

    # ------------------------------------------------------------------ reading

    @property
    def cells(self) -> int:
        return self._cells

    def get(self, table: str, key: str, now: float) -> Entry | None:
        cells = self.tables.get(table)
        if cells is None:
            return None
        stored = cells.get(key)
        if stored is None or _expired(stored[_EXPIRES], now):
            return None
        return _entry(stored)

    def keys(self, table: str, now: float) -> Iterator[str]:
        """The keys of ``table``'s cells not expired at ``now``."""
        for key, stored in self.tables.get(table, {}).items():
            if not _expired(stored[_EXPIRES], now):
                yield key

    def items(self, table: str, now: float) -> Iterator[tuple[str, Entry]]:
        for key, stored in self.tables.get(table, {}).items():
            if not _expired(stored[_EXPIRES], now):
                yield key, _entry(stored)

    def has_autoexpire(self, table: str) -> bool:
        return table in self.autoexpire or table in self.expiring

    def next_deadline(self) -> int | float | None:
        return self._deadlines[0][0] if self._deadlines else None

    # ------------------------------------------------------------------ writing

    def _table(self, name: str) -> dict[str, Stored] | None:
        table = self.tables.get(name)
        if table is None:
            if len(self.tables) >= self.max_tables:
                return None
            table = self.tables[name] = {}
        return table

    def _put(
        self,
        table: str,
        key: str,
        value: Value,
        expires: int | float,
        now: float,
        sender: str | None,
    ) -> Change | None:
        cells = self._table(table)
        if cells is None:
            self.refused += 1
            return None
        return self._store(cells, cells.get(key), table, key, value, expires, now, sender)

    def _store(
        self,
        cells: dict[str, Stored],
        old: Stored | None,
        table: str,
        key: str,
        value: Value,
        expires: int | float,
        now: float,
        sender: str | None,
    ) -> Change | None:
        """Set ``key`` of ``cells`` (table ``table``), whose cell is ``old`` now."""
        if old is None:
            if self._cells >= self.max_cells:
                self.refused += 1
                return None
            self._cells += 1
        else:
            old_value = old[_VALUE]
            old_expires = old[_EXPIRES]
            if (
                not _expired(old_expires, now)  # an expired one is replaced by a new cell
                and old_value == value
                and type(old_value) is type(value)
                and old_expires == expires
            ):
                return None  # the same cell again (a sync answered twice): no change
        cells[key] = (value, expires, now, sender)
        entry = Entry(value, expires, now, sender)
        if expires:
            heapq.heappush(self._deadlines, (expires + 1, table, key))
        return _change("set", table, key, entry)

    def _delete(self, table: str, key: str, event: str = "delete") -> Change | None:
        cells = self.tables.get(table)
        if cells is None or key not in cells:
            return None
        del cells[key]
        self._cells -= 1
        return _change(event, table, key, None)

    def set(
        self, table: str, key: str, value: Value, now: float, sender: str | None = None
    ) -> Change | None:
        """Apply a SET (action 2) as a 5.6 node would; return what changed.

        The cell is looked up once, for its expiry and its replacement (every KDMQ SET
        comes here)."""
        cells = self._table(table)
        if cells is None:
            self.refused += 1
            return None
        old = cells.get(key)
        expires: int | float = 0
        seconds = self.autoexpire.get(table)
        if seconds:
            expires = int(now) + seconds  # new, or updateexpire=1
        elif old is not None and not _expired(old[_EXPIRES], now):
            expires = old[_EXPIRES]
        return self._store(cells, old, table, key, value, expires, now, sender)

    def apply(self, message: HtableMessage, now: float, sender: str | None = None) -> list[Change]:
        """Apply one message as a 5.6 node would; return what changed.

        Raises re.error for a removal regex that does not compile (Kamailio answers
        500 then, and removes nothing)."""
        changes: list[Change] = []
        if isinstance(message, SetCell):
            change = self.set(message.htname, message.cname, message.value, now, sender)
            if change is not None:
                changes.append(change)
        elif isinstance(message, SetCellExpire):
            entry = self.get(message.htname, message.cname, now)
            if entry is not None and self.has_autoexpire(message.htname):
                expires = int(now) + message.seconds if message.seconds > 0 else 0
                change = self._put(message.htname, message.cname, entry.value, expires, now, sender)
                if change is not None:
                    changes.append(change)
        elif isinstance(message, DeleteCell):
            change = self._delete(message.htname, message.cname)
            if change is not None:
                changes.append(change)
        elif isinstance(message, RemoveCells):
            regex = compile_regex(message.pattern) if message.op == "re" else None
            cells = self.tables.get(message.htname, {})
            doomed = [
                key for key, stored in cells.items() if matches(message, key, stored[_VALUE], regex)
            ]
            for key in doomed:
                change = self._delete(message.htname, key)
                if change is not None:
                    changes.append(change)
        elif isinstance(message, SyncAnswer):
            for cell in message.cells:
                changes.extend(self._apply_cell(cell, now, sender))
        return changes

    def _apply_cell(self, cell: Cell, now: float, sender: str | None) -> list[Change]:
        if cell.expire:
            self.expiring.add(cell.htname)
            if cell.expire < int(now):
                return []  # expired on the way: Kamailio would drop it at once too
        change = self._put(cell.htname, cell.cname, cell.value, float(cell.expire), now, sender)
        return [change] if change is not None else []

    def expire(self, now: float) -> list[Change]:
        """Remove every cell whose expiry has passed; return the ``expire`` changes."""
        changes = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, table, key = heapq.heappop(deadlines)
            stored = self.tables.get(table, {}).get(key)
            if stored is None or stored[_EXPIRES] + 1 != deadline:
                continue  # deleted, or set again since
            change = self._delete(table, key, "expire")
            if change is not None:
                changes.append(change)
        return changes
