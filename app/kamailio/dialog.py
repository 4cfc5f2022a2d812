"""The ``dialog`` peer of Kamailio 5.6 (module ``dialog`` with ``enable_dmq``): its
bodies, typed.

Sans-IO and pure: :func:`parse` turns a KDMQ body into one of the message types below
or raises :class:`~app.kamailio._json.BodyError`; :func:`build` writes the bytes
Kamailio 5.6 writes (``dlg_dmq.c``: same keys, same order, compact), so that
``parse(build(m)) == m`` and a captured body built again is the same bytes.

Actions: 0 none, 1 UPDATE (a dialog's identity, variables and profiles, then its
state), 2 STATE (a state change), 3 RM (the dialog is gone), 4 SYNC (a request: every
node that receives it broadcasts every dialog it holds, one UPDATE each, to every
node). A dialog is named by ``h_entry``/``h_id`` in the hash table of the node that
created it; nothing in a body says which node that is.

What follows the ``state`` depends on the state: EARLY (2) adds ``start_ts``,
``lifetime`` and the caller's leg (``tag1``, ``cseq1``, ``route_set1``,
``contact1``); CONFIRMED (4) adds both legs; the others add nothing. An UPDATE writes
the caller's leg before the state too, so in states 2 and 4 Kamailio 5.6 sends those
four keys **twice** (the same values): :func:`parse` accepts the repetition there only,
the last value winning as in Kamailio's reader, and :func:`build` repeats them as 5.6
does. ``profiles`` is a JSON document inside a JSON string
(``{"profiles":[{"name","value"?,"puid"?,"expires"?,"flags"?}]}``), read and written
as such.

Strictness: the exact field set of each action and state, each of its JSON type,
integers in Kamailio's ranges; anything else is refused (Kamailio 5.6 logs an unknown
field and carries on; master's ``last_modified`` and ``iflags`` are refused here).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from app.kamailio._json import (
    UINT32_MAX,
    BodyError,
    Pairs,
    RawObject,
    dumps_pairs,
    exact_keys,
    fields,
    integer,
    loads,
    string,
)

__all__ = [
    "PEER_ID",
    "Action",
    "BodyError",
    "DialogMessage",
    "DialogState",
    "Leg",
    "Nop",
    "Profile",
    "Removal",
    "StateChange",
    "SyncRequest",
    "Timing",
    "Update",
    "build",
    "parse",
]

#: The peer id the dialog module registers (fixed in 5.6).
PEER_ID = "dialog"

UINT64_MAX = 2**64 - 1


class Action(IntEnum):
    NONE = 0
    UPDATE = 1
    STATE = 2
    RM = 3
    SYNC = 4


class DialogState(IntEnum):
    """``DLG_STATE_*``: 3 (confirmed, no ACK yet) is never replicated live."""

    UNCONFIRMED = 1
    EARLY = 2
    CONFIRMED_NA = 3
    CONFIRMED = 4
    DELETED = 5

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Leg:
    """One side of the dialog: 1 is the caller's, 2 the callee's."""

    tag: str
    #: A string, as Kamailio keeps it.
    cseq: str
    route_set: str
    contact: str


@dataclass(frozen=True, slots=True)
class Timing:
    """``start_ts`` (Unix time the dialog was confirmed, 0 before) and ``lifetime`` (s)."""

    start_ts: int
    lifetime: int


@dataclass(frozen=True, slots=True)
class Profile:
    """A dialog profile the dialog belongs to (``value`` for profiles with values)."""

    name: str
    value: str | None = None
    puid: str | None = None
    expires: int | None = None
    flags: int | None = None


@dataclass(frozen=True, slots=True)
class Update:
    """UPDATE: the dialog as its node holds it (sent on creation, on profile changes,
    and for every dialog in answer to a sync)."""

    h_entry: int
    h_id: int
    init_ts: int
    callid: str
    from_uri: str
    to_uri: str
    req_uri: str
    caller: Leg
    #: ``$dlg_var`` values, in the order sent; None when the dialog has none.
    vars: tuple[tuple[str, str], ...] | None
    profiles: tuple[Profile, ...] | None
    state: int
    #: Present exactly in states EARLY and CONFIRMED.
    timing: Timing | None = None
    #: Present exactly in state CONFIRMED.
    callee: Leg | None = None


@dataclass(frozen=True, slots=True)
class StateChange:
    """STATE: the dialog moved to ``state`` (EARLY, CONFIRMED or DELETED live)."""

    h_entry: int
    h_id: int
    state: int
    #: EARLY and CONFIRMED: timing and the caller's leg; CONFIRMED: the callee's too.
    timing: Timing | None = None
    caller: Leg | None = None
    callee: Leg | None = None


@dataclass(frozen=True, slots=True)
class Removal:
    """RM: the dialog was destroyed on its node (some seconds after DELETED)."""

    h_entry: int
    h_id: int
    state: int


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """``{"action":4}``: every node that gets it broadcasts every dialog it holds."""


@dataclass(frozen=True, slots=True)
class Nop:
    """``{"action":0}``: accepted and ignored (never sent by Kamailio)."""


DialogMessage = Update | StateChange | Removal | SyncRequest | Nop

_LEG1 = ("tag1", "cseq1", "route_set1", "contact1")
_TIMED_STATES = (DialogState.EARLY, DialogState.CONFIRMED)
_IDENTITY = ("callid", "from_uri", "to_uri", "req_uri")


def parse(body: bytes) -> DialogMessage:
    """Read one dialog body; raise BodyError (Kamailio answers 400 to bad JSON)."""
    root = loads(body)
    # The caller's leg may repeat in an UPDATE (see the module's docstring).
    found = fields(root, "the body", repeatable=frozenset(_LEG1))
    if "action" not in found:
        raise BodyError("missing", "the body: missing 'action'")
    action = integer(found, "action", "the body", 0, UINT32_MAX)
    if action not in tuple(Action):
        raise BodyError(
            "action", f"unknown action {action} (0 none, 1 update, 2 state, 3 rm, 4 sync)"
        )
    what = f"the body (action {action})"
    if action in (Action.NONE, Action.SYNC):
        _no_repeats(root, what)
        exact_keys(found, ["action"], what)
        return SyncRequest() if action == Action.SYNC else Nop()
    for key in ("h_entry", "h_id", "state"):
        if key not in found:
            raise BodyError("missing", f"{what}: missing {key!r}")
    h_entry = integer(found, "h_entry", what, 0, UINT32_MAX)
    h_id = integer(found, "h_id", what, 0, UINT32_MAX)
    state = integer(found, "state", what, DialogState.UNCONFIRMED, DialogState.DELETED)
    what = f"{what}, state {state}"
    tail = _state_keys(state)
    if action == Action.RM:
        _no_repeats(root, what)
        exact_keys(found, ["action", "h_entry", "h_id", "state"], what)
        return Removal(h_entry, h_id, state)
    if action == Action.STATE:
        _no_repeats(root, what)
        exact_keys(found, ["action", "h_entry", "h_id", "state", *tail], what)
        return StateChange(
            h_entry,
            h_id,
            state,
            _timing(found, what) if tail else None,
            _leg(found, 1, what) if tail else None,
            _leg(found, 2, what) if state == DialogState.CONFIRMED else None,
        )
    head = ["action", "h_entry", "h_id", "init_ts", *_IDENTITY, *_LEG1, "state", *tail]
    exact_keys(found, head, what, optional=("vars", "profiles"))
    _repeats_only_in_timed_states(root, state, what)
    return Update(
        h_entry,
        h_id,
        integer(found, "init_ts", what, 0, UINT32_MAX),
        callid=string(found, "callid", what),
        from_uri=string(found, "from_uri", what),
        to_uri=string(found, "to_uri", what),
        req_uri=string(found, "req_uri", what),
        caller=_leg(found, 1, what),
        vars=_vars(found["vars"], what) if "vars" in found else None,
        profiles=_profiles(string(found, "profiles", what), what) if "profiles" in found else None,
        state=state,
        timing=_timing(found, what) if tail else None,
        callee=_leg(found, 2, what) if state == DialogState.CONFIRMED else None,
    )


def _state_keys(state: int) -> tuple[str, ...]:
    if state == DialogState.EARLY:
        return ("start_ts", "lifetime", *_LEG1)
    if state == DialogState.CONFIRMED:
        return ("start_ts", "lifetime", *_LEG1, "tag2", "cseq2", "route_set2", "contact2")
    return ()


def _no_repeats(root: Pairs, what: str) -> None:
    fields(root, what)  # raises on the first repeated key


def _repeats_only_in_timed_states(root: Pairs, state: int, what: str) -> None:
    if state not in _TIMED_STATES:
        _no_repeats(root, what)
        return
    counts: dict[str, int] = {}
    for key, _ in root:
        counts[key] = counts.get(key, 0) + 1
        if counts[key] > 2:
            raise BodyError("duplicate", f"{what}: key {key!r} appears more than twice")


def _leg(found: dict[str, Any], side: int, what: str) -> Leg:
    return Leg(*(string(found, f"{key}{side}", what) for key in _LEG_FIELDS))


_LEG_FIELDS = ("tag", "cseq", "route_set", "contact")


def _timing(found: dict[str, Any], what: str) -> Timing:
    return Timing(
        integer(found, "start_ts", what, 0, UINT32_MAX),
        integer(found, "lifetime", what, 0, UINT32_MAX),
    )


def _vars(value: Any, what: str) -> tuple[tuple[str, str], ...]:
    found = fields(value, f"{what}: 'vars'")
    return tuple((key, string(found, key, f"{what}: 'vars'")) for key in found)


def _profiles(text: str, what: str) -> tuple[Profile, ...]:
    what = f"{what}: 'profiles'"
    try:
        inner = loads(text.encode())
    except BodyError as exc:
        raise BodyError("type", f"{what} must hold a JSON document ({exc})") from None
    top = fields(inner, what)
    exact_keys(top, ["profiles"], what)
    entries = top["profiles"]
    if not isinstance(entries, list):
        raise BodyError("type", f"{what}: 'profiles' must be an array")
    profiles = []
    for index, entry in enumerate(entries):
        where = f"{what}[{index}]"
        found = fields(entry, where)
        exact_keys(found, ["name"], where, optional=("value", "puid", "expires", "flags"))
        profiles.append(
            Profile(
                string(found, "name", where),
                string(found, "value", where) if "value" in found else None,
                string(found, "puid", where) if "puid" in found else None,
                integer(found, "expires", where, 1, UINT64_MAX) if "expires" in found else None,
                integer(found, "flags", where, 1, UINT32_MAX) if "flags" in found else None,
            )
        )
    return tuple(profiles)


def build(message: DialogMessage) -> bytes:
    """The body Kamailio 5.6 sends for ``message`` (keys in its order, compact)."""
    if isinstance(message, SyncRequest):
        return b'{"action":4}'
    if isinstance(message, Nop):
        return b'{"action":0}'
    if isinstance(message, Removal):
        pairs: list[tuple[str, Any]] = [
            ("action", int(Action.RM)),
            ("h_entry", message.h_entry),
            ("h_id", message.h_id),
            ("state", message.state),
        ]
        return dumps_pairs(pairs).encode()
    if isinstance(message, StateChange):
        pairs = [("action", int(Action.STATE)), ("h_entry", message.h_entry)]
        pairs.append(("h_id", message.h_id))
        pairs += _state_pairs(message.state, message.timing, message.caller, message.callee)
        return dumps_pairs(pairs).encode()
    pairs = [
        ("action", int(Action.UPDATE)),
        ("h_entry", message.h_entry),
        ("h_id", message.h_id),
        ("init_ts", message.init_ts),
        ("callid", message.callid),
        ("from_uri", message.from_uri),
        ("to_uri", message.to_uri),
        ("req_uri", message.req_uri),
        *_leg_pairs(message.caller, 1),
    ]
    if message.vars is not None:
        pairs.append(("vars", RawObject(message.vars)))
    if message.profiles is not None:
        pairs.append(("profiles", _profiles_text(message.profiles)))
    pairs += _state_pairs(message.state, message.timing, message.caller, message.callee)
    return dumps_pairs(pairs).encode()


def _leg_pairs(leg: Leg, side: int) -> list[tuple[str, Any]]:
    return [(f"{key}{side}", getattr(leg, key)) for key in _LEG_FIELDS]


def _state_pairs(
    state: int, timing: Timing | None, caller: Leg | None, callee: Leg | None
) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = [("state", state)]
    if state not in _TIMED_STATES:
        return pairs
    if timing is None or caller is None or (state == DialogState.CONFIRMED and callee is None):
        raise ValueError(f"a dialog in state {state} carries its timing and legs")
    pairs += [("start_ts", timing.start_ts), ("lifetime", timing.lifetime)]
    if state == DialogState.EARLY:
        return pairs + _leg_pairs(caller, 1)
    assert callee is not None
    for key in _LEG_FIELDS:  # 5.6 interleaves the legs: tag1, tag2, cseq1, cseq2, ...
        pairs += [(f"{key}1", getattr(caller, key)), (f"{key}2", getattr(callee, key))]
    return pairs


def _profiles_text(profiles: tuple[Profile, ...]) -> str:
    entries = []
    for profile in profiles:
        entry: list[tuple[str, Any]] = [("name", profile.name)]
        for key in ("value", "puid", "expires", "flags"):
            if (value := getattr(profile, key)) is not None:
                entry.append((key, value))
        entries.append(dumps_pairs(entry))
    return '{"profiles":[' + ",".join(entries) + "]}"


def state_label(state: int) -> str:
    """``confirmed``, ``early``...: the name the API gives a state number."""
    try:
        return DialogState(state).label
    except ValueError:
        return str(state)
