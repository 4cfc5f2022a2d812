"""Events the core hands to its driver through :meth:`DmqNode.next_event`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from app.dmq.nodes import NodeStatus
from app.dmq.sip import SipUri


@dataclass(frozen=True, slots=True)
class NodeStatusChanged:
    """A node was added (``old`` is None), changed status, or was removed (``new`` is
    None)."""

    node: SipUri
    old: NodeStatus | None
    new: NodeStatus | None
    reason: str = ""


class Delivery(enum.Enum):
    """What became of a message for one node, as far as its operation is concerned."""

    #: The node answered, whatever the code.
    DELIVERED = "delivered"
    #: It waits in the node's outbox and will be resent when the node answers again;
    #: its later delivery (or drop, see :class:`OutboxDropped`) does not complete the
    #: operation again.
    QUEUED = "queued"
    #: It was not delivered and will not be: the node was removed, the node stopped, or
    #: an outbox bound was hit (the reason says which).
    DROPPED = "dropped"


@dataclass(frozen=True, slots=True)
class NodeResult:
    """How one node answered one of our requests.

    A message queued or dropped without a transaction (the node was not active, or its
    outbox was already in use or full) has ``code`` 0 and a ``reason`` that says why;
    one queued or dropped after its transaction failed keeps the local 408."""

    node: SipUri
    code: int
    reason: str
    body: bytes = b""
    content_type: str | None = None
    #: No answer before Timer F (the code is then a local 408).
    timed_out: bool = False
    #: The transport could not reach the node (the code is then a local 408).
    transport_error: bool = False
    outcome: Delivery = Delivery.DELIVERED

    def __init__(
        self,
        node: SipUri,
        code: int,
        reason: str,
        body: bytes = b"",
        content_type: str | None = None,
        timed_out: bool = False,
        transport_error: bool = False,
        outcome: Delivery = Delivery.DELIVERED,
    ) -> None:
        # Written out (the decorator keeps it): see "explicit __init__" in setup.py.
        object.__setattr__(self, "node", node)
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "body", body)
        object.__setattr__(self, "content_type", content_type)
        object.__setattr__(self, "timed_out", timed_out)
        object.__setattr__(self, "transport_error", transport_error)
        object.__setattr__(self, "outcome", outcome)


@dataclass(slots=True, eq=False)
class SendOperation:
    """One broadcast or send: its targets and, as they come in, their results."""

    id: int
    peer_id: str
    targets: tuple[SipUri, ...]
    results: list[NodeResult] = field(default_factory=list)

    def __init__(
        self,
        id: int,
        peer_id: str,
        targets: tuple[SipUri, ...],
        results: list[NodeResult] | None = None,
    ) -> None:
        # Written out (the decorator keeps it): see "explicit __init__" in setup.py.
        self.id = id
        self.peer_id = peer_id
        self.targets = targets
        self.results = [] if results is None else results

    @property
    def done(self) -> bool:
        return len(self.results) >= len(self.targets)


@dataclass(frozen=True, slots=True)
class SendCompleted:
    """Every target of an operation has answered or timed out."""

    operation: SendOperation

    def __init__(self, operation: SendOperation) -> None:
        # Written out (the decorator keeps it): see "explicit __init__" in setup.py.
        object.__setattr__(self, "operation", operation)


@dataclass(frozen=True, slots=True)
class OutboxDropped:
    """``count`` messages of ``peer_id`` for ``node`` left its outbox undelivered.

    ``reason`` is one of :data:`app.dmq.outbox.DROP_REASONS`: ``removed`` (an operator
    removed the node), ``count``, ``bytes`` or ``age`` (an outbox bound was hit),
    ``stopped`` (this node stopped), ``expired`` (a node parked after missed pings did
    not come back within the age bound) or ``park_limit`` (more nodes were parked than
    the bound allows, and the one parked longest was let go). The receiver sees each
    dropped message as a gap; ``/metrics`` counts them by reason."""

    node: SipUri
    peer_id: str
    count: int
    reason: str


@dataclass(frozen=True, slots=True)
class PeerReplyTimedOut:
    """A message whose handler deferred its answer got none within the peer's
    ``reply_timeout``; the node has answered it 408 and will refuse a late reply."""

    message_id: int
    peer_id: str


@dataclass(frozen=True, slots=True)
class HostLookupNeeded:
    """The node met a host name (in a node list, say) whose address its resolver does
    not know yet. It holds the node by name meanwhile; the driver looks the name up
    without blocking and answers with :meth:`~app.dmq.node.DmqNode.host_resolved`
    (with ``None`` when the look-up failed). Asked once per name until answered."""

    host: str


Event = NodeStatusChanged | SendCompleted | PeerReplyTimedOut | HostLookupNeeded | OutboxDropped
