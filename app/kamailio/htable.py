"""The htable mirror: a live replica of every replicated htable on the bus.

The replica itself, :class:`HtableReplica` (with :class:`Entry` and :class:`Change`),
applies Kamailio's htable actions as a 5.6 node would, sans I/O, with the time given:
it lives in :mod:`app.kamailio.replica`, compiled with the core, and is imported here
under the same names. Its rules, in short: SET replaces a value and restarts an
``autoexpire`` table's expiry; SET_EXPIRE applies only in such a table; a sync answer's
cells keep their absolute expiry and the same cell again changes nothing; removals by
regex or prefix on names or string values; expiries are whole Unix seconds, and a cell
is gone once the clock's whole seconds are past its expiry, when the mirror's timer
publishes an ``expire`` change.

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
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from app.dmq.peers import PeerMessage, PeerReply
from app.dmq.sip import SipUri
from app.gateway.hub import Ending
from app.kamailio.bootstrap import MIRROR_REPLY, SyncBootstrap
from app.kamailio.htable_codec import (
    HtableMessage,
    MalformedBody,
    SyncAnswer,
    SyncRequest,
    Unsupported,
    build,
    parse,
    read_set,
)
from app.kamailio.malformed import MalformedBodies
from app.kamailio.replica import MAX_CELLS, MAX_TABLES, Change, Entry, HtableReplica
from app.kamailio.stream import ChangeStream
from app.kamailio.ws import NoSuchStream

if TYPE_CHECKING:
    from app.gateway.service import Gateway

log = logging.getLogger("dmq.kamailio")

PEER_ID = "htable"
#: Changes each table's stream keeps for resuming clients: with MAX_TABLES, at most
#: about 260 000 frames (some 50 MB) however many changes a bus sends.
STREAM_CAPACITY = 4096
#: A table or key name longer than this is not one Kamailio's API would take.
MAX_NAME = 1024
#: Sender URIs whose text is kept (a bus has a few nodes; more only clears it).
MAX_SENDERS = 256

#: The names this module offers, the replica's among them (imported from replica.py,
#: where they are compiled; the API and the tests read them from here).
__all__ = [
    "MAX_CELLS",
    "MAX_NAME",
    "MAX_SENDERS",
    "MAX_TABLES",
    "PEER_ID",
    "STREAM_CAPACITY",
    "Change",
    "Entry",
    "HtableMirror",
    "HtableReplica",
]

_SERVER_ERROR = PeerReply(500, "Server Internal Error")
_OK = PeerReply()


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
            # The usual SET, applied without a message object and its one change
            # published without a list (what apply and _publish do, per message).
            table, key, value, _ = usual
            change = self.replica.set(table, key, value, self.clock(), sender)
            self.applied += 1
            if change is not None:
                entry = change.entry
                stream = self.streams.get(table) or self._stream(table)
                if stream is not None:
                    stream.publish("set", key, None if entry is None else entry.as_data(), sender)
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
