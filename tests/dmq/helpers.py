"""In-memory wires and a fake clock for driving sans-IO DMQ cores in tests."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from app.dmq.config import NodeConfig
from app.dmq.events import Event, NodeStatusChanged, SendCompleted
from app.dmq.node import DmqNode
from app.dmq.nodes import NodeStatus
from app.dmq.peers import PeerMessage, PeerReply
from app.dmq.sip import SipUri
from app.dmq.transaction import Endpoint, TimerSettings

FAST_TIMERS = TimerSettings(t1=0.5, t2=4.0, t4=5.0)


def uri(port: int, transport: str = "udp") -> SipUri:
    text = f"sip:127.0.0.1:{port}"
    if transport != "udp":
        text += f";transport={transport}"
    return SipUri.parse(text)


@dataclass
class Wire:
    """A datagram in flight: the bytes, where it comes from and goes to."""

    data: bytes
    source: Endpoint
    destination: Endpoint


@dataclass
class Member:
    node: DmqNode
    port: int
    events: list[Event] = field(default_factory=list)
    received: list[PeerMessage] = field(default_factory=list)
    up: bool = True

    def statuses(self) -> dict[int, NodeStatus]:
        return {n.port: n.status for n in self.node.nodes.others()}


class Cluster:
    """Several cores joined by perfect (or lossy) in-memory wires, one fake clock.

    ``drop`` decides, per wire, whether it is lost; a node that is ``up = False``
    neither receives nor sends, like a process killed with SIGKILL.
    """

    def __init__(self, seed: int = 1) -> None:
        self.now = 1000.0
        self.members: dict[int, Member] = {}
        self.in_flight: list[Wire] = []
        self.drop: Callable[[Wire], bool] = lambda wire: False
        self.rng = random.Random(seed)
        self.delivered = 0

    def add(
        self,
        port: int,
        notify: list[int] | None = None,
        *,
        ping_interval: float = 10.0,
        timers: TimerSettings = FAST_TIMERS,
        peers: tuple[str, ...] = ("htable",),
        start: bool = True,
        transport: str = "udp",
    ) -> Member:
        config = NodeConfig(
            server_address=uri(port, transport),
            notification_addresses=tuple(uri(p, transport) for p in notify or []),
            ping_interval=ping_interval,
            timers=timers,
        )
        node = DmqNode(config, rng=random.Random(self.rng.random()))
        member = Member(node, port)
        for peer_id in peers:
            node.register_peer(peer_id, self._recorder(member))
        self.members[port] = member
        if start:
            node.start(self.now)
            self.flush()
        return member

    @staticmethod
    def _recorder(member: Member) -> Callable[[PeerMessage], PeerReply]:
        def handler(message: PeerMessage) -> PeerReply:
            member.received.append(message)
            return PeerReply()

        return handler

    def collect(self) -> None:
        """Move every core's outbox onto the wires and its events to its member."""
        for member in self.members.values():
            out = member.node.datagrams_to_send()
            while (event := member.node.next_event()) is not None:
                member.events.append(event)
            if not member.up:
                continue
            source = Endpoint(member.node.nodes.local.transport, "127.0.0.1", member.port)
            for data, destination in out:
                self.in_flight.append(Wire(data, source, destination))

    def flush(self, limit: int = 100_000) -> None:
        """Deliver everything in flight (and what it causes) at the current instant."""
        self.collect()
        steps = 0
        while self.in_flight:
            steps += 1
            assert steps < limit, "messages keep bouncing"
            wire = self.in_flight.pop(0)
            target = self.members.get(wire.destination.port)
            if target is None or not target.up or self.drop(wire):
                continue
            self.delivered += 1
            target.node.receive(wire.data, wire.source, self.now)
            self.collect()

    def advance(self, seconds: float, step: float | None = None) -> None:
        """Move the clock forward, firing every timer on the way, in order."""
        end = self.now + seconds
        while True:
            deadlines = [
                d for m in self.members.values() if (d := m.node.get_timer()) is not None
            ]
            next_at = min(deadlines, default=None)
            if next_at is None or next_at > end:
                break
            self.now = max(self.now, next_at)
            for member in self.members.values():
                deadline = member.node.get_timer()
                if deadline is not None and deadline <= self.now:
                    member.node.handle_timer(self.now)
            self.flush()
        self.now = end

    def completed(self, member: Member) -> list[SendCompleted]:
        return [e for e in member.events if isinstance(e, SendCompleted)]

    def status_events(self, member: Member) -> list[NodeStatusChanged]:
        return [e for e in member.events if isinstance(e, NodeStatusChanged)]
