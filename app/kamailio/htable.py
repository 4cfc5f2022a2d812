"""The htable mirror: a live replica of every replicated htable on the bus.

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
  readers no longer see it, and the mirror's timer publishes an ``expire`` change then.

Every change is published to the table's :class:`~app.kamailio.stream.ChangeStream`
(events ``set``, ``delete``, ``expire``).

:class:`HtableMirror` is the tap on peer ``htable``: it parses each body (400 and the
replica untouched for one it cannot read, counted per sender), answers a sync request
with :data:`~app.kamailio.bootstrap.MIRROR_REPLY` (a replica donates nothing), and
bootstraps with one sync request to one node (:class:`SyncBootstrap`).

What the replica cannot see (Kamailio does not replicate it): ``htable.flush`` /
``sht_reset``, iterator writes, DB loads, and sets that failed locally on their node.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from app.dmq.peers import PeerMessage, PeerReply
from app.dmq.sip import SipUri
from app.gateway.hub import Ending
from app.kamailio.bootstrap import MIRROR_REPLY, SyncBootstrap
from app.kamailio.htable_codec import (
    Cell,
    DeleteCell,
    HtableMessage,
    MalformedBody,
    RemoveCells,
    SetCell,
    SetCellExpire,
    SyncAnswer,
    SyncRequest,
    Unsupported,
    Value,
    build,
    compile_regex,
    matches,
    parse,
    read_set,
)
from app.kamailio.malformed import MalformedBodies
from app.kamailio.stream import ChangeStream
from app.kamailio.ws import NoSuchStream

if TYPE_CHECKING:
    from app.gateway.service import Gateway

log = logging.getLogger("dmq.kamailio")

PEER_ID = "htable"
#: Tables a replica holds at most (Kamailio's are declared in its configuration: a
#: few); streams for tables not seen yet count too.
MAX_TABLES = 64
#: Changes each table's stream keeps for resuming clients: with MAX_TABLES, at most
#: about 260 000 frames (some 50 MB) however many changes a bus sends.
STREAM_CAPACITY = 4096
#: Cells a replica holds at most, all tables together; beyond it new cells are
#: refused (counted, logged once) rather than the gateway's memory.
MAX_CELLS = 2_000_000
#: A table or key name longer than this is not one Kamailio's API would take.
MAX_NAME = 1024
#: Sender URIs whose text is kept (a bus has a few nodes; more only clears it).
MAX_SENDERS = 256

_SERVER_ERROR = PeerReply(500, "Server Internal Error")
_OK = PeerReply()


@dataclass(slots=True)
class Entry:
    """One cell of the replica."""

    value: Value
    #: Absolute Unix time (whole seconds) it expires at; 0: never.
    expires: float
    #: Unix time it was last set.
    updated: float
    #: The node whose message set it (None: this gateway's own PUT).
    sender: str | None

    def as_data(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "type": "str" if isinstance(self.value, str) else "int",
            "expires": self.expires or None,
        }


def _expired(entry: Entry, now: float) -> bool:
    """Kamailio's test: expiries are whole seconds, and a cell is gone once the clock's
    whole seconds are past it (``it->expire < time(NULL)``)."""
    return bool(entry.expires) and entry.expires < int(now)


class Change(NamedTuple):
    """What one application of a message changed."""

    event: str
    table: str
    key: str
    entry: Entry | None


class HtableReplica:
    """Kamailio's htables as one 5.6 node holds them (see the module)."""

    def __init__(self, autoexpire: dict[str, int] | None = None) -> None:
        self.tables: dict[str, dict[str, Entry]] = {}
        #: Declared autoexpire seconds per table.
        self.autoexpire: dict[str, int] = dict(autoexpire or {})
        #: Tables seen with expiring cells in a sync answer (autoexpire, unknown value).
        self.expiring: set[str] = set()
        #: (expires, table, key) of cells that expire; stale items are skipped.
        self._deadlines: list[tuple[float, str, str]] = []
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
        entry = cells.get(key)
        if entry is None or (entry.expires and entry.expires < int(now)):
            return None  # expired: see _expired
        return entry

    def items(self, table: str, now: float) -> Iterator[tuple[str, Entry]]:
        for key, entry in self.tables.get(table, {}).items():
            if not _expired(entry, now):
                yield key, entry

    def has_autoexpire(self, table: str) -> bool:
        return table in self.autoexpire or table in self.expiring

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    # ------------------------------------------------------------------ writing

    def _table(self, name: str) -> dict[str, Entry] | None:
        table = self.tables.get(name)
        if table is None:
            if len(self.tables) >= MAX_TABLES:
                return None
            table = self.tables[name] = {}
        return table

    def _put(
        self, table: str, key: str, value: Value, expires: float, now: float, sender: str | None
    ) -> Change | None:
        cells = self._table(table)
        if cells is None:
            self.refused += 1
            return None
        old = cells.get(key)
        if old is None:
            if self._cells >= MAX_CELLS:
                self.refused += 1
                return None
            self._cells += 1
        elif (
            not _expired(old, now)  # an expired one is replaced by a new cell
            and old.value == value
            and type(old.value) is type(value)
            and old.expires == expires
        ):
            return None  # the same cell again (a sync answered twice): no change
        entry = Entry(value, expires, now, sender)
        cells[key] = entry
        if expires:
            heapq.heappush(self._deadlines, (expires + 1, table, key))
        return Change("set", table, key, entry)

    def _delete(self, table: str, key: str, event: str = "delete") -> Change | None:
        cells = self.tables.get(table)
        if cells is None or key not in cells:
            return None
        del cells[key]
        self._cells -= 1
        return Change(event, table, key, None)

    def set(
        self, table: str, key: str, value: Value, now: float, sender: str | None = None
    ) -> Change | None:
        """Apply a SET (action 2) as a 5.6 node would; return what changed."""
        expires: float = 0
        seconds = self.autoexpire.get(table)
        if seconds:
            expires = int(now) + seconds  # new, or updateexpire=1
        else:
            old = self.get(table, key, now)
            if old is not None:
                expires = old.expires
        return self._put(table, key, value, expires, now, sender)

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
                key for key, entry in cells.items() if matches(message, key, entry.value, regex)
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
            entry = self.tables.get(table, {}).get(key)
            if entry is None or entry.expires + 1 != deadline:
                continue  # deleted, or set again since
            change = self._delete(table, key, "expire")
            if change is not None:
                changes.append(change)
        return changes


class HtableMirror:
    """The tap on peer ``htable``: replica, change streams, bootstrap, bad bodies."""

    name = "htable"
    peer_id = PEER_ID
    description = "typed mirror of Kamailio's htable (the gateway's replica)"

    def __init__(
        self,
        gateway: Gateway,
        *,
        autoexpire: dict[str, int] | None = None,
        clock: Callable[[], float] = time.time,
        queue_limit: int = 1000,
    ) -> None:
        self.gateway = gateway
        self.replica = HtableReplica(autoexpire)
        self.malformed = MalformedBodies(PEER_ID)
        self.bootstrap = SyncBootstrap(gateway, PEER_ID, build(SyncRequest()))
        self.streams: dict[str, ChangeStream] = {}
        self.clock = clock
        self.queue_limit = queue_limit
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        #: Messages applied, sync cells received, sync requests answered (metrics).
        self.applied = 0
        self.sync_cells = 0
        self.sync_requests_answered = 0
        self.unsupported = 0
        #: Sender URI -> its text in changes (see _sender).
        self._senders: dict[SipUri, str] = {}

    # ------------------------------------------------------------------ the tap

    def handle(self, message: PeerMessage) -> PeerReply:
        """Every KDMQ message of peer ``htable``; the reply counts when no raw peer
        ``htable`` is registered (see :meth:`Gateway.attach_tap`)."""
        self.bootstrap.observe(message)
        sender = self._senders.get(message.sender)
        if sender is None:
            sender = self._sender(message.sender)
        usual = read_set(message.body)
        if usual is not None:
            # The usual SET, applied without a message object (what apply does).
            table, key, value, _ = usual
            now = self.clock()
            change = self.replica.set(table, key, value, now, sender)
            self.applied += 1
            if change is not None:
                self._publish((change,), sender)
            self._arm()
            return _OK
        try:
            parsed = parse(message.body)
        except MalformedBody as exc:
            return self.malformed.refuse(sender, exc.kind, exc.detail)
        if isinstance(parsed, SyncRequest):
            self.sync_requests_answered += 1
            return MIRROR_REPLY
        if isinstance(parsed, Unsupported):
            self.unsupported += 1
            return _SERVER_ERROR  # "unrecognized action", as a 5.6 node answers
        if isinstance(parsed, SyncAnswer):
            self.bootstrap.answer_seen(message.sender)
            self.sync_cells += len(parsed.cells)
            # Answered at once, applied in the loop's next turn: a donor sends its
            # chunks (60 KB, hundreds of cells) in a burst and retransmits each one
            # not answered within its T1. Messages that arrive later are handled in
            # later turns, so the order of application is kept.
            try:
                asyncio.get_running_loop().call_soon(self.apply, parsed, sender)
            except RuntimeError:
                self.apply(parsed, sender)  # no loop (a unit test)
            return _OK
        try:
            self.apply(parsed, sender)
        except re.error as exc:
            self.malformed.refuse(sender, "regex", f"removal regex does not compile: {exc}")
            return _SERVER_ERROR
        return _OK

    def _sender(self, uri: SipUri) -> str:
        """A sender's URI as changes name it (without its user part), written once per
        sending node rather than per message."""
        senders = self._senders
        if len(senders) >= MAX_SENDERS:
            senders.clear()
        sender = senders[uri] = str(uri.with_user(None))
        return sender

    def init(self) -> None:
        self.bootstrap.init()

    def apply(self, message: HtableMessage, sender: str | None) -> int:
        """Apply a message (from the bus, or this gateway's own write) and publish
        what changed; return how many cells changed."""
        now = self.clock()
        changes = self.replica.apply(message, now, sender)
        self.applied += 1
        self._publish(changes, sender)
        self._arm()
        return len(changes)

    def _publish(self, changes: Iterable[Change], sender: str | None) -> None:
        streams = self.streams
        for event, table, key, entry in changes:
            stream = streams.get(table) or self._stream(table)
            if stream is not None:
                stream.publish(event, key, None if entry is None else entry.as_data(), sender)

    # ------------------------------------------------------------------ expiry

    def _arm(self) -> None:
        deadline = self.replica.next_deadline()
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a unit test): expire() is called by hand
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, deadline - self.clock())
        self._timer_at = deadline
        self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.expire_due()

    def expire_due(self) -> None:
        """Expire what is due now, publish it, and arm the timer for the next."""
        self._publish(self.replica.expire(self.clock()), None)
        self._arm()

    # ------------------------------------------------------------------ streams

    def _stream(self, table: str) -> ChangeStream | None:
        stream = self.streams.get(table)
        if stream is None:
            if len(self.streams) >= MAX_TABLES:
                return None
            stream = self.streams[table] = ChangeStream(
                f"htable/{table}",
                capacity=STREAM_CAPACITY,
                queue_limit=self.queue_limit,
                clock=self.clock,
            )
        return stream

    def stream_for(self, table: str) -> ChangeStream:
        """The change stream of ``table`` (made on first use: a client may subscribe
        before the table's first change); raises NoSuchStream beyond MAX_TABLES."""
        if not table or len(table) > MAX_NAME:
            raise NoSuchStream(f"{table[:40]!r} is not an htable name")
        stream = self._stream(table)
        if stream is None:
            raise NoSuchStream(f"the mirror already follows {MAX_TABLES} tables")
        return stream

    def close(self) -> None:
        """The gateway is stopping: end every subscription, stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.bootstrap.cancel()
        for stream in self.streams.values():
            stream.end_all(Ending.STOPPING)

    def stats(self) -> dict[str, float]:
        """Gauges and counters for /metrics (names without the mirror's prefix)."""
        return {
            "cells": self.replica.cells,
            "tables": len(self.replica.tables),
            "applied": self.applied,
            "sync_cells": self.sync_cells,
            "sync_requests_sent": self.bootstrap.status.requests_sent,
            "sync_requests_answered": self.sync_requests_answered,
            "unsupported": self.unsupported,
            "refused": self.replica.refused,
        }
