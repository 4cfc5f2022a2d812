"""A replica of the dialogs the ``dialog`` peer replicates, from UPDATE, STATE and RM.

Sans-IO: :meth:`Dialogs.apply` takes a parsed message, the node that sent it and the
current Unix time, and returns the state changes as :class:`DialogEvent` values;
:meth:`Dialogs.expire` is called at :meth:`Dialogs.next_deadline` by the clock's owner.

Keys. Kamailio names a dialog by ``h_entry``/``h_id`` in the hash table of the node
that created it, and **no body says which node that is**. The replica keys a dialog by
(origin, h_entry, h_id), the origin being the node we first heard it from: the creating
node for a dialog seen live (a node broadcasts the UPDATE when ``dlg_manage`` runs on
it), but possibly another node for a dialog first learnt from a sync answer, since every
node answers a sync with every dialog it holds, its replicas included. A later message
for the same h_entry/h_id from another node is matched to the dialog already held (by
Call-ID for an UPDATE), so a dialog relayed by several nodes is held once; only nodes
that really reuse the same h_entry/h_id (no ``h_id_start``/``h_id_step`` set) make two.
A STATE or RM that matches no dialog (we joined after its UPDATE) is answered 500, as
Kamailio answers it, and counted.

Lifecycle. A BYE makes the dialog DELETED (a ``state`` event) and it leaves the live
list at once; Kamailio destroys it some seconds later (RM, a ``removed`` event). A
DELETED dialog whose RM never comes is dropped after :data:`DELETED_GRACE` s, and a
confirmed dialog whose node never said it ended is dropped (``expired``) when its
``start_ts + lifetime`` has passed by :data:`LIFETIME_GRACE` s: the node that held it
may be gone. A dialog not yet confirmed (unconfirmed, early, or confirmed without ACK,
which Kamailio never replicates live but a sync answer may carry) is dropped
(``expired``) :data:`EARLY_TIMEOUT` + :data:`EARLY_GRACE` s after its last update:
Kamailio's dialog module destroys a dialog still early ``early_timeout`` s (300 by
default) after it began, and tells nobody, so without a bound a call whose node went
away before the answer would stay in the replica for ever.

Bootstrap. A dialog sync in 5.6 makes **every** node broadcast **every** dialog it
holds to **every** node, one message per dialog; by default the mirror never asks for
one, and so holds only the dialogs created (or re-sent for a profile change) after the
gateway joined, and those it sees when a Kamailio node joins and asks for a sync itself.
With ``--dialog-sync`` (``DMQ_DIALOG_SYNC``) it asks ONE node, once, as the other
mirrors do (:class:`~app.kamailio.bootstrap.SyncBootstrap`): that node still broadcasts
every dialog it holds to every node (5.6 has no way to answer only the asker), but
only one node does, where a Kamailio node joining makes each node do it.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from app.dmq.peers import PeerMessage, PeerReply
from app.gateway.hub import Ending
from app.kamailio.bootstrap import MIRROR_REPLY, BootstrapStatus, SyncBootstrap
from app.kamailio.dialog import (
    PEER_ID,
    BodyError,
    DialogMessage,
    DialogState,
    Leg,
    Profile,
    Removal,
    StateChange,
    SyncRequest,
    Timing,
    Update,
    build,
    parse,
    state_label,
)
from app.kamailio.malformed import MalformedBodies
from app.kamailio.stream import ChangeStream

if TYPE_CHECKING:
    from app.gateway.service import Gateway

#: Dialogs the replica holds at most; beyond it new ones are refused (counted).
MAX_DIALOGS = 1_000_000
#: The name of the change stream (``GET /v1/dialogs/changes``).
STREAM = "dialogs"
_OK = PeerReply()
#: What Kamailio answers to a STATE or RM for a dialog it does not hold.
_SERVER_ERROR = PeerReply(500, "Server Internal Error")
log = logging.getLogger("dmq.kamailio")

#: Seconds a DELETED dialog is kept waiting for its RM (Kamailio's is about 5 s).
DELETED_GRACE = 30.0
#: Seconds past ``start_ts + lifetime`` before a confirmed dialog is dropped.
LIFETIME_GRACE = 30.0
#: Kamailio's ``early_timeout`` default: a dialog still early this long after it began
#: is destroyed on its node (without a message on the bus).
EARLY_TIMEOUT = 300.0
#: Seconds past :data:`EARLY_TIMEOUT` (counted from the last update the replica got)
#: before a dialog never confirmed is dropped.
EARLY_GRACE = 30.0


class DialogEventKind(StrEnum):
    CREATED = "created"
    STATE = "state"
    REMOVED = "removed"
    EXPIRED = "expired"


@dataclass(slots=True)
class Dialog:
    origin: str
    h_entry: int
    h_id: int
    callid: str
    from_uri: str
    to_uri: str
    req_uri: str
    state: int
    init_ts: int
    start_ts: int = 0
    lifetime: int = 0
    caller: Leg | None = None
    callee: Leg | None = None
    vars: tuple[tuple[str, str], ...] = ()
    profiles: tuple[Profile, ...] = ()
    #: Unix time of the last change, and of the move to DELETED (0 before).
    updated_at: float = 0.0
    deleted_at: float = 0.0
    #: The nodes that sent us something about it.
    seen_from: set[str] = field(default_factory=set)

    @property
    def id(self) -> str:
        """``h_entry:h_id@origin``: the replica's name for it (and the page cursor)."""
        return f"{self.h_entry}:{self.h_id}@{self.origin}"

    @property
    def live(self) -> bool:
        return self.state != DialogState.DELETED

    def deadline(self) -> float | None:
        if self.state == DialogState.DELETED:
            return self.deleted_at + DELETED_GRACE
        if self.state == DialogState.CONFIRMED:
            if self.lifetime and self.start_ts:
                return self.start_ts + self.lifetime + LIFETIME_GRACE
            return None
        # Not confirmed yet: Kamailio gives up on it after early_timeout.
        return self.updated_at + EARLY_TIMEOUT + EARLY_GRACE

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "origin": self.origin,
            "h_entry": self.h_entry,
            "h_id": self.h_id,
            "callid": self.callid,
            "from_uri": self.from_uri,
            "to_uri": self.to_uri,
            "req_uri": self.req_uri,
            "state": state_label(self.state),
            "init_ts": self.init_ts,
            "start_ts": self.start_ts,
            "lifetime": self.lifetime,
            "caller": _leg_json(self.caller),
            "callee": _leg_json(self.callee),
            "vars": dict(self.vars),
            "profiles": [
                {k: v for k, v in _profile_json(p).items() if v is not None} for p in self.profiles
            ],
            "seen_from": sorted(self.seen_from),
            "updated_at": self.updated_at,
        }


def _leg_json(leg: Leg | None) -> dict[str, str] | None:
    if leg is None:
        return None
    return {
        "tag": leg.tag,
        "cseq": leg.cseq,
        "route_set": leg.route_set,
        "contact": leg.contact,
    }


def _profile_json(profile: Profile) -> dict[str, Any]:
    return {
        "name": profile.name,
        "value": profile.value,
        "puid": profile.puid,
        "expires": profile.expires,
        "flags": profile.flags,
    }


@dataclass(frozen=True, slots=True)
class DialogEvent:
    kind: DialogEventKind
    dialog: Dialog
    #: The state before (a ``state`` event), as a label.
    previous: str | None
    at: float

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"event": self.kind.value, "at": self.at}
        if self.previous is not None:
            data["previous"] = self.previous
        data.update(self.dialog.to_json())
        return data


class ApplyResult(StrEnum):
    """How a message was taken: Kamailio answers 500 to a STATE or RM it cannot match."""

    APPLIED = "applied"
    UNKNOWN_DIALOG = "unknown_dialog"


class Dialogs:
    """Every dialog the bus told us of, by (origin, h_entry, h_id)."""

    def __init__(self, limit: int = MAX_DIALOGS) -> None:
        self.limit = limit
        #: New dialogs refused because the replica held ``limit`` already.
        self.refused = 0
        self._dialogs: dict[tuple[str, int, int], Dialog] = {}
        self._by_id: dict[tuple[int, int], list[Dialog]] = {}
        self._deadlines: list[tuple[float, str, int, int]] = []
        #: STATE/RM messages that matched no dialog held (we joined after its UPDATE).
        self.unknown = 0

    def __len__(self) -> int:
        return len(self._dialogs)

    def dialogs(self, state: int | None = None) -> list[Dialog]:
        """Held dialogs sorted by id; live ones only unless a ``state`` is asked for."""
        chosen = [
            d for d in self._dialogs.values() if (d.live if state is None else d.state == state)
        ]
        chosen.sort(key=lambda d: d.id)
        return chosen

    def counts(self) -> dict[str, int]:
        """How many dialogs are held in each state (every state named, zeros too)."""
        counts = {s.label: 0 for s in DialogState}
        for dialog in self._dialogs.values():
            counts[state_label(dialog.state)] = counts.get(state_label(dialog.state), 0) + 1
        return counts

    def find(self, dialog_id: str) -> Dialog | None:
        for dialog in self._dialogs.values():
            if dialog.id == dialog_id:
                return dialog
        return None

    def next_deadline(self) -> float | None:
        deadlines = self._deadlines
        while deadlines:
            at, origin, h_entry, h_id = deadlines[0]
            held = self._dialogs.get((origin, h_entry, h_id))
            if held is not None and held.deadline() == at:
                return at
            heapq.heappop(deadlines)
        return None

    # ---------------------------------------------------------------- changing

    def apply(
        self, message: DialogMessage, node: str, now: float
    ) -> tuple[ApplyResult, list[DialogEvent]]:
        if isinstance(message, Update):
            return ApplyResult.APPLIED, self._update(message, node, now)
        if isinstance(message, StateChange | Removal):
            held = self._match(message.h_entry, message.h_id, node)
            if held is None:
                self.unknown += 1
                return ApplyResult.UNKNOWN_DIALOG, []
            held.seen_from.add(node)
            if isinstance(message, Removal):
                self._drop(held)
                return ApplyResult.APPLIED, [DialogEvent(DialogEventKind.REMOVED, held, None, now)]
            return ApplyResult.APPLIED, self._state(held, message, now)
        return ApplyResult.APPLIED, []  # a sync request or a no-op

    def expire(self, now: float) -> list[DialogEvent]:
        events = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            at, origin, h_entry, h_id = heapq.heappop(deadlines)
            held = self._dialogs.get((origin, h_entry, h_id))
            if held is None or held.deadline() != at:
                continue
            self._drop(held)
            kind = DialogEventKind.REMOVED if not held.live else DialogEventKind.EXPIRED
            events.append(DialogEvent(kind, held, None, now))
        return events

    def _match(self, h_entry: int, h_id: int, node: str) -> Dialog | None:
        held = self._dialogs.get((node, h_entry, h_id))
        if held is not None:
            return held
        same = self._by_id.get((h_entry, h_id), [])
        return same[0] if len(same) == 1 else None

    def _update(self, message: Update, node: str, now: float) -> list[DialogEvent]:
        held = self._dialogs.get((node, message.h_entry, message.h_id))
        if held is None:
            same = self._by_id.get((message.h_entry, message.h_id), [])
            held = next((d for d in same if d.callid == message.callid), None)
        events: list[DialogEvent] = []
        if held is not None and held.callid != message.callid:
            # The node reused the h_entry/h_id for a new call: the old one is over.
            self._drop(held)
            events.append(DialogEvent(DialogEventKind.REMOVED, held, None, now))
            held = None
        if held is None:
            if len(self._dialogs) >= self.limit:
                self.refused += 1
                return events
            dialog = Dialog(
                node,
                message.h_entry,
                message.h_id,
                message.callid,
                message.from_uri,
                message.to_uri,
                message.req_uri,
                message.state,
                message.init_ts,
                caller=message.caller,
                vars=message.vars or (),
                profiles=message.profiles or (),
                updated_at=now,
                seen_from={node},
            )
            _take_state(dialog, message.state, message.timing, message.caller, message.callee)
            if dialog.state == DialogState.DELETED:
                dialog.deleted_at = now
            self._insert(dialog)
            return [*events, DialogEvent(DialogEventKind.CREATED, dialog, None, now)]
        held.seen_from.add(node)
        held.init_ts = message.init_ts
        held.vars = message.vars or ()
        held.profiles = message.profiles or ()
        before = held.deadline()
        held.updated_at = now
        change = StateChange(
            message.h_entry,
            message.h_id,
            message.state,
            message.timing,
            message.caller,
            message.callee,
        )
        events = self._state(held, change, now)
        if not events and held.deadline() != before:
            self._schedule(held)  # not confirmed yet, updated now: a later bound
        return events

    def _state(self, held: Dialog, change: StateChange, now: float) -> list[DialogEvent]:
        if change.state <= held.state:
            return []  # a repeat, or backwards (Kamailio ignores those too)
        previous = state_label(held.state)
        _take_state(held, change.state, change.timing, change.caller, change.callee)
        held.updated_at = now
        if held.state == DialogState.DELETED:
            held.deleted_at = now
        self._schedule(held)
        return [DialogEvent(DialogEventKind.STATE, held, previous, now)]

    def _insert(self, dialog: Dialog) -> None:
        self._dialogs[(dialog.origin, dialog.h_entry, dialog.h_id)] = dialog
        self._by_id.setdefault((dialog.h_entry, dialog.h_id), []).append(dialog)
        self._schedule(dialog)

    def _schedule(self, dialog: Dialog) -> None:
        at = dialog.deadline()
        if at is not None:
            heapq.heappush(self._deadlines, (at, dialog.origin, dialog.h_entry, dialog.h_id))

    def _drop(self, dialog: Dialog) -> None:
        del self._dialogs[(dialog.origin, dialog.h_entry, dialog.h_id)]
        same = self._by_id[(dialog.h_entry, dialog.h_id)]
        same.remove(dialog)
        if not same:
            del self._by_id[(dialog.h_entry, dialog.h_id)]


def _take_state(
    dialog: Dialog, state: int, timing: Timing | None, caller: Leg | None, callee: Leg | None
) -> None:
    dialog.state = state
    if timing is not None:
        dialog.start_ts = timing.start_ts
        dialog.lifetime = timing.lifetime
    if caller is not None:
        dialog.caller = caller
    if callee is not None:
        dialog.callee = callee


class DialogsMirror:
    """The tap on peer ``dialog``: replica, change stream, bad bodies.

    It applies UPDATE, STATE and RM; answers a body it cannot read 400 (counted per
    sender and kind, logged once), a STATE or RM for a dialog it does not hold 500 as
    Kamailio does, and a sync request :data:`~app.kamailio.bootstrap.MIRROR_REPLY`.
    It asks one node for a sync only when built with ``sync=True`` (``--dialog-sync``;
    see the module: in 5.6 a dialog sync is a broadcast storm).
    """

    name = "dialog"
    peer_id = PEER_ID
    description = "typed mirror of Kamailio's dialogs (dialog enable_dmq)"

    def __init__(
        self,
        gateway: Gateway | None = None,
        *,
        clock: Callable[[], float] = time.time,
        queue_limit: int = 1000,
        limit: int = MAX_DIALOGS,
        sync: bool = False,
    ) -> None:
        self.gateway = gateway
        self.clock = clock
        self.replica = Dialogs(limit)
        #: The one-donor bootstrap, with --dialog-sync only.
        self.bootstrap = (
            SyncBootstrap(gateway, PEER_ID, build(SyncRequest()))
            if sync and gateway is not None
            else None
        )
        self.malformed = MalformedBodies(PEER_ID)
        # Rendered when published: a dialog's data nests legs, vars and profiles,
        # which a lazy stream would keep in the cyclic collector's sight.
        self.stream = ChangeStream(STREAM, queue_limit=queue_limit, clock=clock, lazy=False)
        self.streams = {STREAM: self.stream}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.applied = 0
        self.sync_requests_answered = 0

    def handle(self, message: PeerMessage) -> PeerReply:
        if self.bootstrap is not None:
            self.bootstrap.observe(message)
        sender = str(message.sender.with_user(None))
        try:
            parsed = parse(message.body)
        except BodyError as exc:
            return self.malformed.refuse(sender, exc.kind, exc.detail)
        if isinstance(parsed, SyncRequest):
            self.sync_requests_answered += 1
            return MIRROR_REPLY
        if isinstance(parsed, Update) and self.bootstrap is not None:
            self.bootstrap.answer_seen(message.sender)  # a sync answer is UPDATEs
        try:
            result, events = self.replica.apply(parsed, sender, self.clock())
        except Exception:  # a bug, not the sender's fault: the replica keeps serving
            log.exception("dialog: applying a message from %s failed", sender)
            return _SERVER_ERROR
        if result is ApplyResult.UNKNOWN_DIALOG:
            return _SERVER_ERROR
        self.applied += 1
        self._publish(events, sender)
        self._arm()
        return _OK

    def init(self) -> None:
        """Ask one node for a dialog sync with --dialog-sync; else nothing (in 5.6 a
        dialog sync is a broadcast storm)."""
        if self.bootstrap is not None:
            self.bootstrap.init()

    @property
    def sync_status(self) -> BootstrapStatus:
        """How the bootstrap went: state ``off`` without --dialog-sync."""
        if self.bootstrap is None:
            return BootstrapStatus(state="off")
        return self.bootstrap.status

    def _publish(self, events: list[DialogEvent], sender: str | None) -> None:
        for event in events:
            data = event.dialog.to_json()
            if event.previous is not None:
                data["previous"] = event.previous
            self.stream.publish(event.kind.value, event.dialog.id, data, sender)

    def _arm(self) -> None:
        deadline = self.replica.next_deadline()
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = loop.call_later(max(0.0, deadline - self.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.expire_due()

    def expire_due(self) -> None:
        self._publish(self.replica.expire(self.clock()), None)
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.bootstrap is not None:
            self.bootstrap.cancel()
        self.stream.end_all(Ending.STOPPING)

    def stats(self) -> dict[str, float]:
        stats: dict[str, float] = {
            "dialogs": len(self.replica),
            "applied": self.applied,
            "unknown": self.replica.unknown,
            "sync_requests_answered": self.sync_requests_answered,
            "sync_requests_sent": self.sync_status.requests_sent,
            "refused": self.replica.refused,
        }
        for state, count in self.replica.counts().items():
            stats[f"state_{state}"] = count
        return stats
