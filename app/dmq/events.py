"""Events the core hands to its driver through :meth:`DmqNode.next_event`."""

from __future__ import annotations

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


@dataclass(frozen=True, slots=True)
class NodeResult:
    """How one node answered one of our requests."""

    node: SipUri
    code: int
    reason: str
    body: bytes = b""
    content_type: str | None = None
    #: No answer before Timer F (the code is then a local 408).
    timed_out: bool = False
    #: The transport could not reach the node (the code is then a local 408).
    transport_error: bool = False


@dataclass(slots=True, eq=False)
class SendOperation:
    """One broadcast or send: its targets and, as they come in, their results."""

    id: int
    peer_id: str
    targets: tuple[SipUri, ...]
    results: list[NodeResult] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.results) >= len(self.targets)


@dataclass(frozen=True, slots=True)
class SendCompleted:
    """Every target of an operation has answered or timed out."""

    operation: SendOperation


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


Event = NodeStatusChanged | SendCompleted | PeerReplyTimedOut | HostLookupNeeded
