"""Per-node outboxes: store-and-forward for messages a node could not take yet.

A message for a node that is ``disabled``, or whose transaction for it timed out (or
met a transport error), waits in that node's outbox instead of being lost (a node that
is ``not_active``, asked and not answered yet, is tried first). While an
outbox holds anything, newer messages for the node queue behind it, so that the node
gets them in the order they were sent. When the node answers again the outbox is sent
in order, a window of requests at a time, each a new transaction with the same body
and headers.

A node removed because it missed pings (or after it said it left and then missed a
ping) does not lose its outbox: the outbox is *parked* under the node's address for up
to ``outbox_max_age`` seconds. The node list stops naming the node, as Kamailio's rules
want, but broadcasts go on queueing for it, and it is still pinged; when it comes back
(it answers a ping, or joins again, or a third party lists it and it then answers us)
it is taken back into the list and its outbox is sent in order. So a false verdict, a
partition or a crash and restart costs latency, not data.

A message is dropped only for a reason a caller can see: an operator removed its node,
the node stopped, a park expired, or a bound was hit (count, bytes, age, parked nodes;
:class:`~app.dmq.config.NodeConfig` sets them). Each drop is counted by reason and
reported as :class:`~app.dmq.events.OutboxDropped`.

One :class:`OutboxMessage` is shared by the outboxes of every node a broadcast missed,
so a bus-wide outage costs one body per message plus a reference per node.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from app.dmq.nodes import Node
from app.dmq.sip import SipUri

#: Why messages left an outbox without being delivered.
DROP_REMOVED: Final = "removed"
DROP_COUNT: Final = "count"
DROP_BYTES: Final = "bytes"
DROP_AGE: Final = "age"
DROP_STOPPED: Final = "stopped"
#: A parked node did not come back within ``outbox_max_age`` of its removal.
DROP_EXPIRED: Final = "expired"
#: More nodes were parked than ``max_nodes``: the one parked longest was let go.
DROP_PARK_LIMIT: Final = "park_limit"
DROP_REASONS: Final = (
    DROP_REMOVED,
    DROP_COUNT,
    DROP_BYTES,
    DROP_AGE,
    DROP_STOPPED,
    DROP_EXPIRED,
    DROP_PARK_LIMIT,
)


@dataclass(slots=True, eq=False)
class OutboxMessage:
    """What it takes to send a message again: body, headers and when it was first sent."""

    id: int
    peer_id: str
    body: bytes
    content_type: str | None
    #: Extra header lines, already validated and rendered.
    extra: tuple[str, ...]
    max_forwards: int
    #: The ``now`` of the broadcast or send; the age bound counts from here.
    created_at: float
    #: What the message counts for against the byte bound: body and headers.
    size: int

    def __init__(
        self,
        id: int,
        peer_id: str,
        body: bytes,
        content_type: str | None,
        extra: tuple[str, ...],
        max_forwards: int,
        created_at: float,
        size: int,
    ) -> None:
        # Written out (the decorator keeps it): see "explicit __init__" in setup.py.
        self.id = id
        self.peer_id = peer_id
        self.body = body
        self.content_type = content_type
        self.extra = extra
        self.max_forwards = max_forwards
        self.created_at = created_at
        self.size = size


@dataclass(slots=True, eq=False)
class Outbox:
    """The messages waiting for one node, oldest first."""

    messages: deque[OutboxMessage] = field(default_factory=deque)
    #: Sum of the messages' sizes.
    size: int = 0
    #: Ids of messages resent and not answered yet (at most the window).
    in_flight: set[int] = field(default_factory=set)
    #: A transaction to the node failed: nothing is resent until the node answers
    #: something (a ping, a request), so a dead node is not sent the window again and
    #: again.
    paused: bool = False
    #: Dropped as a whole: answers to resends still in flight change nothing.
    dropped: bool = False
    #: The node the outbox belongs to now: a parked outbox moves to the new
    #: :class:`Node` of its address when the node comes back.
    owner: Node | None = None


class OutboxInfo(NamedTuple):
    """One node's outbox, for metrics (:meth:`~app.dmq.node.DmqNode.outboxes`)."""

    node: SipUri
    messages: int
    bytes: int
    in_flight: int
    #: ``created_at`` of the oldest message (driver clock).
    oldest: float
    #: The node was removed after missed pings and is out of the node list; its
    #: outbox waits for it to come back (until the park expires).
    parked: bool = False
