"""The gateway's domain models that more than one layer uses (kept apart to avoid
import cycles between the hub, the peer store and the API)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

#: Bytes of message bodies a peer's history keeps by default (``history_bytes``): with
#: the default count of 1 000 messages, bodies of up to 16 KiB each fit; larger bodies
#: make the byte bound the one that trims first, so a peer of large messages cannot make
#: the history (held in memory as well as in the store) grow to gigabytes.
DEFAULT_HISTORY_BYTES = 16 * 1024 * 1024


class ReplyMode(StrEnum):
    AUTO = "auto"
    SUBSCRIBER = "subscriber"


@dataclass(slots=True)
class PeerSettings:
    """How a peer behaves; what ``PUT /v1/peers/{peer_id}`` sets and the store keeps."""

    description: str = ""
    reply: ReplyMode = ReplyMode.AUTO
    #: Seconds to wait for a subscriber's reply (subscriber mode).
    reply_timeout: float = 5.0
    #: Messages kept for replay.
    history: int = 1000
    #: Seconds a message is kept for replay (0: no age limit).
    history_max_age: float = 0.0
    #: Bytes of message bodies kept for replay: the oldest entries go first once the
    #: sum passes it (the newest message is always kept, however large).
    history_bytes: int = DEFAULT_HISTORY_BYTES

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["reply"] = self.reply.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PeerSettings:
        return cls(
            description=str(data.get("description", "")),
            reply=ReplyMode(data.get("reply", "auto")),
            reply_timeout=float(data.get("reply_timeout", 5.0)),
            history=int(data.get("history", 1000)),
            history_max_age=float(data.get("history_max_age", 0.0)),
            history_bytes=int(data.get("history_bytes", DEFAULT_HISTORY_BYTES)),
        )


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node of the bus as the gateway reports it."""

    uri: str
    host: str
    port: int
    transport: str
    status: str
    local: bool
    #: Unix time of the node's last reply to us, or None if it never replied.
    last_reply: float | None
    failures: int


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """One registered peer: its settings and where its history stands."""

    peer_id: str
    description: str
    reply: ReplyMode
    reply_timeout: float
    history: int
    history_max_age: float
    history_bytes: int
    epoch: str
    offset: int
    history_size: int
    subscribers: int
    received: int
    persistent: bool


@dataclass(frozen=True, slots=True)
class HealthInfo:
    node: str
    status: str
    uptime: float
    active_nodes: int


@dataclass(frozen=True, slots=True)
class NodeOutcome:
    """How one target node answered a broadcast or send (``code`` None: no final
    answer in time, or none at all for a message queued or dropped before it was sent).

    ``outcome``: ``delivered`` (the node answered, whatever the code), ``queued`` (it
    waits in the node's outbox and is resent when the node answers again), ``dropped``
    (it will never be delivered; ``reason`` says why), or None (no result within the
    caller's ``?timeout=``: still in flight)."""

    node: str
    code: int | None
    reason: str | None
    content_type: str | None = None
    body: bytes = b""
    outcome: str | None = None
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A broadcast or send the gateway started; ``outcomes`` only when waited for."""

    id: str
    peer: str
    targets: tuple[str, ...]
    outcomes: tuple[NodeOutcome, ...] | None = None


@dataclass(frozen=True, slots=True)
class PeerStats:
    peer_id: str
    subscribers: int
    overflows: int
    history_size: int
    received: int


@dataclass(frozen=True, slots=True)
class GatewayStats:
    """Every counter and gauge ``/metrics`` exports, read in one step."""

    #: (peer_id, code) -> KDMQ received and the code answered / sent and the final code.
    received: dict[tuple[str, int], int]
    sent: dict[tuple[str, int], int]
    retransmissions_sent: int
    retransmissions_absorbed: int
    responses_resent: int
    transaction_timeouts: int
    transport_errors: int
    malformed_answered: int
    malformed_dropped: int
    forbidden: int
    reply_timeouts: int
    #: NodeStatus value -> other nodes in it (every status, zeros included).
    nodes_by_status: dict[str, int]
    peers: tuple[PeerStats, ...]
    #: Store-and-forward at the sender: node URI -> (messages, bytes) waiting for it.
    outboxes: dict[str, tuple[int, int]] = field(default_factory=dict)
    outbox_queued: int = 0
    outbox_resent: int = 0
    outbox_delivered: int = 0
    #: Drop reason -> messages that left an outbox undelivered.
    outbox_dropped: dict[str, int] = field(default_factory=dict)
    #: At the receiver: stamped copies answered but not delivered again, gap entries
    #: written, and stamped messages held for the ones before them now.
    duplicates: int = 0
    gaps: int = 0
    held: int = 0
    #: Holes in stamped streams that filled: (upper bound in seconds, count) per bucket
    #: of the time from the first message held behind the hole to the missing one
    #: (not cumulative; the last bound is infinity), and their sum.
    hole_fills: tuple[tuple[float, int], ...] = ()
    hole_fill_seconds: float = 0.0
    #: Copies of messages declared lost (a gap) that arrived afterwards.
    late_after_gap: int = 0
    #: The most messages one stream has held at once since the start.
    held_peak: int = 0
    #: Nodes removed after missed pings whose outbox was kept (parked) for them, and
    #: parked nodes that came back and were taken into the node list again.
    outbox_parked: int = 0
    outbox_unparked: int = 0
    #: The SIP driver's refusals and gauges (``TransportStats``, field name -> value):
    #: every connection or look-up a bound refused, and the TCP connections open now.
    transport: dict[str, int] = field(default_factory=dict)
