"""In-memory wires and a fake clock for driving sans-IO DMQ cores in tests."""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

from app.dmq.config import NodeConfig
from app.dmq.events import Event, NodeStatusChanged, SendCompleted
from app.dmq.node import DmqNode
from app.dmq.nodes import NodeStatus, Resolver, literal_resolver
from app.dmq.peers import PeerMessage, PeerReply
from app.dmq.sip import SipRequest, SipUri, parse_message
from app.dmq.transaction import Endpoint, TimerSettings

FAST_TIMERS = TimerSettings(t1=0.5, t2=4.0, t4=5.0)


def vectors_dir() -> Path:
    """Kamailio's captured messages: ``$DMQ_VECTORS_DIR``, or ``tests/dmq/vectors``.

    The captures live in the repository, byte-exact (``.gitattributes`` keeps git from
    touching their CRLF line ends), so a fresh clone tests the codec against them.
    """
    override = os.environ.get("DMQ_VECTORS_DIR")
    if override:
        return Path(override)
    return Path(__file__).parent / "vectors"


def load_vectors(directory: Path) -> dict[str, bytes]:
    """Every ``*.sip`` capture in ``directory`` by file name, in name order.

    An empty set is an error, not an empty result: the tests parametrized over the
    vectors would otherwise vanish from the run instead of failing.
    """
    files = sorted(directory.glob("*.sip"))
    if not files:
        raise RuntimeError(
            f"no Kamailio vectors (*.sip) in {directory}: "
            "restore tests/dmq/vectors or point DMQ_VECTORS_DIR at a directory of captures"
        )
    return {path.name: path.read_bytes() for path in files}


VECTORS = load_vectors(vectors_dir())
VECTOR_FILES = [vectors_dir() / name for name in VECTORS]

#: Bytes that matter to the parser, for insertion into otherwise valid messages.
INTERESTING = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n ",
    b"\r\n\r\n",
    b":",
    b",",
    b";",
    b" ",
    b"<",
    b">",
    b'"',
    b"\xff",
    "\u00b2".encode(),
    "\uff15".encode(),
    b"-",
    b"0",
    b"SIP/2.0",
]


@st.composite
def mutated(draw: st.DrawFn, sources: list[bytes]) -> bytes:
    """A valid message with random byte flips, truncations, insertions and deletions."""
    data = bytearray(draw(st.sampled_from(sources)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.one_of(st.sampled_from(INTERESTING), st.binary(max_size=6)))
        else:
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


def uri(port: int, transport: str = "udp", host: str = "127.0.0.1") -> SipUri:
    text = f"sip:{host}:{port}"
    if transport != "udp":
        text += f";transport={transport}"
    return SipUri.parse(text)


@dataclass
class Wire:
    """A datagram in flight: the bytes, where it comes from and goes to."""

    data: bytes
    source: Endpoint
    destination: Endpoint
    #: The fake clock when it was put on the wire.
    at: float = 0.0

    def request(self) -> SipRequest | None:
        """The wire's message if it is a request (every wire holds a valid message)."""
        message = parse_message(self.data)
        return message if isinstance(message, SipRequest) else None


@dataclass
class Member:
    node: DmqNode
    port: int
    events: list[Event] = field(default_factory=list)
    received: list[PeerMessage] = field(default_factory=list)
    #: How many times each peer's init hook ran.
    init_calls: Counter[str] = field(default_factory=Counter)
    up: bool = True

    def statuses(self) -> dict[int, NodeStatus]:
        return {n.port: n.status for n in self.node.nodes.others()}


class Cluster:
    """Several cores joined by perfect (or lossy) in-memory wires, one fake clock.

    ``drop`` decides, per wire, whether it is lost; a node that is ``up = False``
    neither receives nor sends, like a process killed with SIGKILL. Every wire put in
    flight (lost or not) is kept in ``trace``.
    """

    def __init__(self, seed: int = 1) -> None:
        self.now = 1000.0
        self.members: dict[int, Member] = {}
        self.in_flight: list[Wire] = []
        self.trace: list[Wire] = []
        self.drop: Callable[[Wire], bool] = lambda wire: False
        self.rng = random.Random(seed)
        self.delivered = 0

    def add(
        self,
        port: int,
        notify: list[int | SipUri] | None = None,
        *,
        ping_interval: float = 10.0,
        timers: TimerSettings = FAST_TIMERS,
        peers: tuple[str, ...] = ("htable",),
        start: bool = True,
        transport: str = "udp",
        host: str = "127.0.0.1",
        resolver: Resolver = literal_resolver,
        **settings: object,
    ) -> Member:
        """Add (or replace, like a restarted process) the node listening on ``port``.

        ``notify`` holds ports (``sip:127.0.0.1:PORT``) or whole URIs; ``host`` is how
        the node names itself in its ``server_address``; ``settings`` are further
        :class:`NodeConfig` fields (outbox bounds...). Every wire is routed by port.
        """
        config = NodeConfig(
            server_address=uri(port, transport, host),
            notification_addresses=tuple(
                uri(p, transport) if isinstance(p, int) else p for p in notify or []
            ),
            ping_interval=ping_interval,
            timers=timers,
            **settings,  # type: ignore[arg-type]
        )
        node = DmqNode(config, resolver=resolver, rng=random.Random(self.rng.random()))
        member = Member(node, port)
        for peer_id in peers:
            node.register_peer(
                peer_id, self._recorder(member), init=self._init_counter(member, peer_id)
            )
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

    @staticmethod
    def _init_counter(member: Member, peer_id: str) -> Callable[[], None]:
        def init() -> None:
            member.init_calls[peer_id] += 1

        return init

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
                wire = Wire(data, source, destination, self.now)
                self.in_flight.append(wire)
                self.trace.append(wire)

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
        self.advance_to(self.now + seconds)

    def advance_to(self, end: float) -> None:
        """Move the clock to ``end``, firing every timer due on the way, in order."""
        while True:
            deadlines = [d for m in self.members.values() if (d := m.node.get_timer()) is not None]
            next_at = min(deadlines, default=None)
            if next_at is None or next_at > end:
                break
            self.now = max(self.now, next_at)
            for member in self.members.values():
                deadline = member.node.get_timer()
                if deadline is not None and deadline <= self.now:
                    member.node.handle_timer(self.now)
            self.flush()
        self.now = max(self.now, end)
        self.collect()

    def completed(self, member: Member) -> list[SendCompleted]:
        return [e for e in member.events if isinstance(e, SendCompleted)]

    def status_events(self, member: Member) -> list[NodeStatusChanged]:
        return [e for e in member.events if isinstance(e, NodeStatusChanged)]

    def notifications(self, since: int = 0) -> list[tuple[int, int, int]]:
        """``(from port, to port, Max-Forwards)`` of each membership request put on a
        wire since ``trace[since]``."""
        out = []
        for wire in self.trace[since:]:
            request = wire.request()
            if request is None or not request.uri.startswith("sip:notification_peer@"):
                continue
            out.append(
                (
                    wire.source.port,
                    wire.destination.port,
                    int(request.headers.get("max-forwards") or "-1"),
                )
            )
        return out
