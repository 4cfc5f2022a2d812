"""The ``usrloc`` peer of Kamailio 5.6 (module ``dmq_usrloc``): its bodies, typed.

Sans-IO and pure: :func:`parse` turns a KDMQ body into one of the message types below
or raises :class:`~app.kamailio._json.BodyError` saying what is wrong; :func:`build`
writes the bytes Kamailio 5.6 writes for the same message (same keys, same order,
compact), so that ``parse(build(m)) == m`` and a captured body built again is the same
bytes.

Actions (``usrloc_sync.c``): 0 none, 1 UPDATE (insert or update a contact, matched by
``ruid``), 2 RM (the full contact; matched by ``ruid``), 3 SYNC (a request: the node
sends back every contact it holds). Every contact message carries every field below;
``sock`` only when the sender sets ``replicate_socket_info``. A sync answer is one
message per contact, or with ``batch_msg_contacts`` > 1 an object
``{"multi": {"1": {contact}, "2": {...}}}`` whose members each carry their own action.

Strictness: the exact 5.6 field set, each of its JSON type, integers in the range
Kamailio reads them into (``SRJSON_GET_UINT``); anything else is refused, so that the
replica never stores a half-read contact. (Kamailio 5.6's own receiver logs an unknown
field and carries on; the fields later versions add, such as 5.8's ``xavps``, are
refused here: DMQ is meant for nodes of one major version.)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal

from app.kamailio._json import (
    INT32_MAX,
    UINT32_MAX,
    BodyError,
    Pairs,
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
    "Contact",
    "ContactMessage",
    "Multi",
    "Nop",
    "SyncRequest",
    "UsrlocMessage",
    "build",
    "parse",
]

#: The peer id dmq_usrloc registers (fixed in 5.6).
PEER_ID = "usrloc"

#: ``methods`` when the contact did not say which methods it accepts.
ALL_METHODS = UINT32_MAX
#: ``q`` when the contact has no q-value.
Q_UNSET = -1


class Action(IntEnum):
    NONE = 0
    UPDATE = 1
    RM = 2
    SYNC = 3


@dataclass(frozen=True, slots=True)
class Contact:
    """One contact of an AOR as dmq_usrloc replicates it (``ucontact_t``)."""

    aor: str
    #: The record's unique id: what an UPDATE and an RM are matched by.
    ruid: str
    #: The Contact URI.
    c: str
    received: str
    path: str
    callid: str
    user_agent: str
    instance: str
    #: Absolute Unix time the contact expires at; 0 for a permanent contact.
    expires: int
    cseq: int
    flags: int
    cflags: int
    #: 0..1000, or -1 when unset.
    q: int
    last_modified: int
    methods: int
    reg_id: int
    server_id: int
    #: ``proto:ip:port`` of the socket it was registered on, only with
    #: ``replicate_socket_info``.
    sock: str | None = None


@dataclass(frozen=True, slots=True)
class ContactMessage:
    """UPDATE (register or refresh) or RM (unregister) of one contact."""

    action: Literal[Action.UPDATE, Action.RM]
    contact: Contact


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """``{"action":3}``: send me every contact you hold."""


@dataclass(frozen=True, slots=True)
class Nop:
    """``{"action":0}``: accepted and ignored by Kamailio (never sent by it)."""


@dataclass(frozen=True, slots=True)
class Multi:
    """A batched sync answer: several contact messages in one body, in order."""

    items: tuple[ContactMessage, ...]


UsrlocMessage = ContactMessage | SyncRequest | Nop | Multi

_STRINGS = ("aor", "ruid", "c", "received")
_STRINGS_AFTER_SOCK = ("path", "callid", "user_agent", "instance")
# Name, low, high: the integers in the order Kamailio writes them.
_INTEGERS: tuple[tuple[str, int, int], ...] = (
    ("expires", 0, UINT32_MAX),
    ("cseq", 0, INT32_MAX),
    ("flags", 0, UINT32_MAX),
    ("cflags", 0, UINT32_MAX),
    ("q", Q_UNSET, 1000),
    ("last_modified", 0, UINT32_MAX),
    ("methods", 0, UINT32_MAX),
    ("reg_id", 0, UINT32_MAX),
    ("server_id", 0, INT32_MAX),
)
_CONTACT_KEYS = (
    "action",
    *_STRINGS,
    *_STRINGS_AFTER_SOCK,
    *(name for name, _, _ in _INTEGERS),
)


def parse(body: bytes) -> UsrlocMessage:
    """Read one usrloc body; raise BodyError (Kamailio answers 400 to such a body)."""
    top = fields(loads(body), "the body")
    if "multi" in top:
        if len(top) != 1:
            others = sorted(k for k in top if k != "multi")
            raise BodyError("field", f"a multi body has one key, 'multi'; it also has {others}")
        batch = top["multi"]
        if not isinstance(batch, Pairs):
            raise BodyError("shape", "'multi' must be an object of contacts keyed '1', '2', ...")
        items = []
        for key, member in batch:
            message = _parse_action(fields(member, f"multi[{key!r}]"), f"multi[{key!r}]")
            if not isinstance(message, ContactMessage):
                raise BodyError(
                    "action", f"multi[{key!r}]: a batch holds contact updates and removals"
                )
            items.append(message)
        return Multi(tuple(items))
    return _parse_action(top, "the body")


def _parse_action(found: dict[str, Any], what: str) -> UsrlocMessage:
    if "action" not in found:
        raise BodyError("missing", f"{what}: missing 'action'")
    action = integer(found, "action", what, 0, UINT32_MAX)
    if action in (Action.NONE, Action.SYNC):
        exact_keys(found, ["action"], f"{what} (action {action})")
        return SyncRequest() if action == Action.SYNC else Nop()
    if action not in (Action.UPDATE, Action.RM):
        raise BodyError(
            "action", f"{what}: unknown action {action} (0 none, 1 update, 2 rm, 3 sync)"
        )
    exact_keys(found, _CONTACT_KEYS, f"{what} (action {action})", optional=("sock",))
    values: dict[str, Any] = {k: string(found, k, what) for k in (*_STRINGS, *_STRINGS_AFTER_SOCK)}
    for name, low, high in _INTEGERS:
        values[name] = integer(found, name, what, low, high)
    values["sock"] = string(found, "sock", what) if "sock" in found else None
    kind: Literal[Action.UPDATE, Action.RM] = Action.UPDATE if action == 1 else Action.RM
    return ContactMessage(kind, Contact(**values))


def build(message: UsrlocMessage) -> bytes:
    """The body Kamailio 5.6 sends for ``message`` (keys in its order, compact)."""
    if isinstance(message, SyncRequest):
        return b'{"action":3}'
    if isinstance(message, Nop):
        return b'{"action":0}'
    if isinstance(message, Multi):
        members = ",".join(
            f'"{index}":{_contact_json(item)}' for index, item in enumerate(message.items, 1)
        )
        return ('{"multi":{' + members + "}}").encode()
    return _contact_json(message).encode()


def _contact_json(message: ContactMessage) -> str:
    contact = message.contact
    pairs: list[tuple[str, Any]] = [("action", int(message.action))]
    pairs += [(k, getattr(contact, k)) for k in _STRINGS]
    if contact.sock is not None:
        pairs.append(("sock", contact.sock))
    pairs += [(k, getattr(contact, k)) for k in _STRINGS_AFTER_SOCK]
    pairs += [(name, getattr(contact, name)) for name, _, _ in _INTEGERS]
    return dumps_pairs(pairs)
