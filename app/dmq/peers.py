"""Peers: the named channels of a DMQ bus, and the messages that arrive on them.

A peer is what Kamailio's ``register_dmq_peer`` registers: a peer id (the user part of
the Request-URI), a handler for requests that arrive for it, and an optional *init*
hook run once when the node first reaches an active peer node (htable uses it to ask
for a full sync). The handler answers with a :class:`PeerReply` at once, or returns
``None`` and answers later through :meth:`app.dmq.node.DmqNode.reply`, which is how a
driver lets a handler wait for something (a WebSocket client's answer). The node alone
decides how long "later" may be: the peer's ``reply_timeout``, after which it answers
408 and refuses the late reply, so there is one timeout and one place that enforces it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from app.dmq.sip import SipUri

#: The header a gateway puts on each message it originates (``<sip:HOST:PORT>;epoch=E;
#: seq=N``) so that receivers can tell a resent message from a new one. Its meaning is
#: the gateway's; the core only carries it (and Kamailio ignores headers it does not
#: know).
ORIGIN_HEADER = "X-DMQ-Origin"


class PeerMessage(NamedTuple):
    """A KDMQ request delivered to a peer, exactly once.

    A NamedTuple rather than a frozen dataclass: one is built for every request, and
    a tuple is immutable at a fraction of the cost."""

    #: Handle for :meth:`DmqNode.reply` when the handler answers later.
    id: int
    peer_id: str
    body: bytes
    content_type: str | None
    #: The sending node, from the From URI (Kamailio identifies senders the same way).
    sender: SipUri
    call_id: str
    #: Driver clock when it arrived.
    received_at: float
    max_forwards: int
    #: The raw value of the :data:`ORIGIN_HEADER` of the request, if it had one.
    origin: str | None = None


@dataclass(frozen=True, slots=True)
class PeerReply:
    """The SIP reply a peer gives. Custom channels answer an empty 200 by default,
    because a Kamailio script reuses the membership reply handler for them and would
    read a 200 body as a node list (protocol notes, section 2)."""

    code: int = 200
    reason: str = "OK"
    content_type: str | None = None
    body: bytes = b""

    def __init__(
        self,
        code: int = 200,
        reason: str = "OK",
        content_type: str | None = None,
        body: bytes = b"",
    ) -> None:
        # Written out (the decorator keeps it): see "explicit __init__" in setup.py.
        if not 200 <= code <= 699:
            raise ValueError(f"a peer reply needs a final status code (200-699), not {code}")
        if "\r" in reason or "\n" in reason:
            raise ValueError("a reply reason must be a single line")
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "content_type", content_type)
        object.__setattr__(self, "body", body)


PeerHandler = Callable[[PeerMessage], PeerReply | None]
PeerInit = Callable[[], None]


@dataclass(slots=True)
class Peer:
    peer_id: str
    handler: PeerHandler
    init: PeerInit | None = None
    description: str = ""
    #: Seconds the handler may take to answer a message it deferred (returned
    #: ``None`` for) before the node answers 408 itself; ``None`` means Timer F, after
    #: which the sending node has given up anyway.
    reply_timeout: float | None = None
    init_done: bool = False
