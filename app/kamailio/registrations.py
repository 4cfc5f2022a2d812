"""A replica of the registrations the ``usrloc`` peer replicates, keyed by ``ruid``.

Sans-IO: :meth:`Registrations.apply` takes a parsed message, the node that sent it and
the current Unix time, and returns what changed as :class:`RegistrationEvent` values;
:meth:`Registrations.expire` is called at :meth:`Registrations.next_expiry` (or any
time later) by whoever owns the clock.

Why it expires contacts itself: Kamailio 5.6 does not replicate an expiry (each node
drops its own contacts at their ``expires``), so a contact leaves the replica at its
``expires`` unless a refresh moved it. ``expires`` 0 is a permanent contact.

Why a repeated UPDATE is silent: a 5.6 sync answer sends a contact of an AOR with N
contacts N(N+1)/2 times, and every node that holds a replicated contact sends it again,
so an UPDATE that changes nothing is not an event. An UPDATE of a known ``ruid`` that
changes something is a ``refresh``; an RM is an ``unregister``.

What it cannot know: the body does not say which node a contact registered on (the
``node`` kept is the one that told us last, which after a sync is the donor), nor the
socket, unless the nodes set ``replicate_socket_info``. Kamailio's own de-duplication
on save (``max_contacts``, a new Call-ID replacing an old contact) is not replicated
either: such a replaced contact lingers here, as on the other Kamailio nodes, until
it expires.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from app.dmq.peers import PeerMessage, PeerReply
from app.gateway.hub import Ending
from app.kamailio.bootstrap import MIRROR_REPLY, SyncBootstrap
from app.kamailio.malformed import MalformedBodies
from app.kamailio.stream import ChangeStream
from app.kamailio.usrloc import (
    PEER_ID,
    Action,
    BodyError,
    Contact,
    ContactMessage,
    Multi,
    SyncRequest,
    UsrlocMessage,
    build,
    parse,
)

if TYPE_CHECKING:
    from app.gateway.service import Gateway

#: Contacts the replica holds at most; beyond it new ones are refused (counted)
#: rather than the gateway's memory.
MAX_CONTACTS = 1_000_000
#: The name of the change stream (``GET /v1/registrations/changes``).
STREAM = "registrations"
_OK = PeerReply()
_SERVER_ERROR = PeerReply(500, "Server Internal Error")
log = logging.getLogger("dmq.kamailio")


class RegistrationEventKind(StrEnum):
    REGISTER = "register"
    REFRESH = "refresh"
    UNREGISTER = "unregister"
    EXPIRE = "expire"


@dataclass(slots=True)
class Registration:
    """One contact as the replica holds it."""

    contact: Contact
    #: The node that told us last (its SIP URI).
    node: str
    #: Unix time of the last change.
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        c = self.contact
        return {
            "aor": c.aor,
            "ruid": c.ruid,
            "contact": c.c,
            "expires": c.expires,
            "received": c.received,
            "path": c.path,
            "callid": c.callid,
            "cseq": c.cseq,
            "user_agent": c.user_agent,
            "instance": c.instance,
            "q": None if c.q < 0 else c.q / 1000,
            "flags": c.flags,
            "cflags": c.cflags,
            "methods": c.methods,
            "reg_id": c.reg_id,
            "server_id": c.server_id,
            "last_modified": c.last_modified,
            "socket": c.sock,
            "node": self.node,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class RegistrationEvent:
    kind: RegistrationEventKind
    registration: Registration
    #: Unix time of the change.
    at: float

    def to_json(self) -> dict[str, Any]:
        return {"event": self.kind.value, "at": self.at, **self.registration.to_json()}


class Registrations:
    """Every contact the bus replicated to us, by ``ruid`` and by AOR."""

    def __init__(self, limit: int = MAX_CONTACTS) -> None:
        self.limit = limit
        #: New contacts refused because the replica held ``limit`` already.
        self.refused = 0
        self._by_ruid: dict[str, Registration] = {}
        self._by_aor: dict[str, dict[str, Registration]] = {}
        #: Every AOR held, sorted: pages and prefix filters walk it.
        self._aors: list[str] = []
        #: (expires, ruid), lazily cleaned: an entry whose contact moved is skipped.
        self._deadlines: list[tuple[int, str]] = []

    # ---------------------------------------------------------------- reading

    def __len__(self) -> int:
        return len(self._by_ruid)

    @property
    def aor_count(self) -> int:
        return len(self._aors)

    def get(self, ruid: str) -> Registration | None:
        return self._by_ruid.get(ruid)

    def contacts_of(self, aor: str) -> list[Registration]:
        """Every contact of ``aor``, best q first, then the latest to expire."""
        contacts = self._by_aor.get(aor, {})
        return sorted(contacts.values(), key=_contact_order)

    def page(
        self, prefix: str = "", after: str | None = None, limit: int = 100
    ) -> tuple[list[tuple[str, list[Registration]]], str | None, int]:
        """AORs starting with ``prefix`` in order, after ``after``; at most ``limit``.

        Returns the page, the cursor of the next page (None at the end) and how many
        AORs match the prefix in all.
        """
        aors = self._aors
        first = bisect.bisect_left(aors, prefix)
        last = bisect.bisect_left(aors, prefix + "\U0010ffff") if prefix else len(aors)
        start = first if after is None else max(first, bisect.bisect_right(aors, after))
        chosen = aors[start : min(start + limit, last)]
        more = start + len(chosen) < last
        page = [(aor, self.contacts_of(aor)) for aor in chosen]
        return page, (chosen[-1] if more and chosen else None), last - first

    def next_expiry(self) -> int | None:
        """The earliest ``expires`` of a held contact (stale entries are dropped)."""
        deadlines = self._deadlines
        while deadlines:
            expires, ruid = deadlines[0]
            held = self._by_ruid.get(ruid)
            if held is not None and held.contact.expires == expires:
                return expires
            heapq.heappop(deadlines)
        return None

    # ---------------------------------------------------------------- changing

    def apply(self, message: UsrlocMessage, node: str, now: float) -> list[RegistrationEvent]:
        """Apply one usrloc message from ``node`` at Unix time ``now``."""
        if isinstance(message, Multi):
            events: list[RegistrationEvent] = []
            for item in message.items:
                events += self._apply_one(item, node, now)
            return events
        if isinstance(message, ContactMessage):
            return self._apply_one(message, node, now)
        return []  # a sync request or a no-op changes nothing here

    def _apply_one(self, message: ContactMessage, node: str, now: float) -> list[RegistrationEvent]:
        contact = message.contact
        held = self._by_ruid.get(contact.ruid)
        if message.action == Action.RM:
            if held is None:
                return []
            self._remove(held)
            return [RegistrationEvent(RegistrationEventKind.UNREGISTER, held, now)]
        if contact.expires != 0 and contact.expires <= now:
            # Already expired (a stale sync entry): Kamailio would not keep it either.
            if held is None:
                return []
            self._remove(held)
            return [RegistrationEvent(RegistrationEventKind.EXPIRE, held, now)]
        if held is not None and held.contact == contact:
            return []  # a repeat: sync answers send contacts many times
        if held is None and len(self._by_ruid) >= self.limit:
            self.refused += 1
            return []
        registration = Registration(contact, node, now)
        if held is not None:
            self._remove(held)
        self._insert(registration)
        kind = RegistrationEventKind.REGISTER if held is None else RegistrationEventKind.REFRESH
        return [RegistrationEvent(kind, registration, now)]

    def expire(self, now: float) -> list[RegistrationEvent]:
        """Drop every contact whose ``expires`` is at or before ``now``."""
        events = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            expires, ruid = heapq.heappop(deadlines)
            held = self._by_ruid.get(ruid)
            if held is None or held.contact.expires != expires:
                continue
            self._remove(held)
            events.append(RegistrationEvent(RegistrationEventKind.EXPIRE, held, now))
        return events

    def _insert(self, registration: Registration) -> None:
        contact = registration.contact
        self._by_ruid[contact.ruid] = registration
        contacts = self._by_aor.get(contact.aor)
        if contacts is None:
            contacts = self._by_aor[contact.aor] = {}
            bisect.insort(self._aors, contact.aor)
        contacts[contact.ruid] = registration
        if contact.expires:
            heapq.heappush(self._deadlines, (contact.expires, contact.ruid))

    def _remove(self, registration: Registration) -> None:
        contact = registration.contact
        del self._by_ruid[contact.ruid]
        contacts = self._by_aor[contact.aor]
        del contacts[contact.ruid]
        if not contacts:
            del self._by_aor[contact.aor]
            index = bisect.bisect_left(self._aors, contact.aor)
            del self._aors[index]


def _contact_order(registration: Registration) -> tuple[int, int, str]:
    contact = registration.contact
    expires = contact.expires or 2**63  # permanent contacts last
    return (-contact.q, -expires, contact.ruid)


class RegistrationsMirror:
    """The tap on peer ``usrloc``: replica, change stream, bootstrap, bad bodies.

    It applies every UPDATE and RM (a batched ``multi`` answer item by item), answers
    a body it cannot read 400 (counted per sender and kind, logged once), a sync
    request with :data:`~app.kamailio.bootstrap.MIRROR_REPLY` (a replica donates
    nothing), and bootstraps by asking one node for a sync
    (:class:`~app.kamailio.bootstrap.SyncBootstrap`): that node answers with every
    contact it holds, one message per contact or in ``multi`` batches, and both are
    applied the same way. Contacts expire on the mirror's own timer.
    """

    name = "usrloc"
    peer_id = PEER_ID
    description = "typed mirror of Kamailio's registrations (dmq_usrloc)"

    def __init__(
        self,
        gateway: Gateway,
        *,
        clock: Callable[[], float] = time.time,
        queue_limit: int = 1000,
        limit: int = MAX_CONTACTS,
    ) -> None:
        self.gateway = gateway
        self.clock = clock
        self.replica = Registrations(limit)
        self.malformed = MalformedBodies(PEER_ID)
        self.bootstrap = SyncBootstrap(gateway, PEER_ID, build(SyncRequest()))
        self.stream = ChangeStream(STREAM, queue_limit=queue_limit, clock=clock)
        self.streams = {STREAM: self.stream}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        #: Messages applied, contacts received (batched ones each), sync requests
        #: answered (metrics).
        self.applied = 0
        self.contacts_received = 0
        self.sync_requests_answered = 0

    def handle(self, message: PeerMessage) -> PeerReply:
        """Every KDMQ message of peer ``usrloc``; the reply counts when no raw peer
        ``usrloc`` is registered (see :meth:`Gateway.attach_tap`)."""
        self.bootstrap.observe(message)
        sender = str(message.sender.with_user(None))
        try:
            parsed = parse(message.body)
        except BodyError as exc:
            return self.malformed.refuse(sender, exc.kind, exc.detail)
        if isinstance(parsed, SyncRequest):
            self.sync_requests_answered += 1
            return MIRROR_REPLY
        if isinstance(parsed, Multi | ContactMessage):
            self.bootstrap.answer_seen(message.sender)
            self.contacts_received += len(parsed.items) if isinstance(parsed, Multi) else 1
        self.applied += 1
        try:
            events = self.replica.apply(parsed, sender, self.clock())
        except Exception:  # a bug, not the sender's fault: the replica keeps serving
            log.exception("usrloc: applying a message from %s failed", sender)
            return _SERVER_ERROR
        self._publish(events, sender)
        self._arm()
        return _OK

    def init(self) -> None:
        self.bootstrap.init()

    def _publish(self, events: list[RegistrationEvent], sender: str | None) -> None:
        for event in events:
            registration = event.registration
            self.stream.publish(
                event.kind.value, registration.contact.ruid, registration.to_json(), sender
            )

    def _arm(self) -> None:
        deadline = self.replica.next_expiry()
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a unit test): expire_due() is called by hand
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = loop.call_later(max(0.0, deadline - self.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.expire_due()

    def expire_due(self) -> None:
        """Expire what is due now, publish it, arm the timer for the next."""
        self._publish(self.replica.expire(self.clock()), None)
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.bootstrap.cancel()
        self.stream.end_all(Ending.STOPPING)

    def stats(self) -> dict[str, float]:
        return {
            "contacts": len(self.replica),
            "aors": self.replica.aor_count,
            "applied": self.applied,
            "contacts_received": self.contacts_received,
            "sync_requests_sent": self.bootstrap.status.requests_sent,
            "sync_requests_answered": self.sync_requests_answered,
            "refused": self.replica.refused,
        }
