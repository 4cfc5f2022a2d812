"""The DMQ node list: who is on the bus, and in what state.

A node is identified by host, port and transport. Unlike Kamailio, which compares the
URI strings (so ``sip:h`` and ``sip:h:5060`` are two nodes, and a DNS name and its
address are two nodes, Kamailio issue #3642), the list compares the *resolved* address
and the effective port, so one node is never held twice. The URI text we first learned
for a node is kept and is what we announce for it, because Kamailio matches senders by
string.

The node-list body (``text/plain``, one ``sip:host:port[;transport=..];status=..`` per
line) is parsed leniently: a bad line is reported and skipped, the rest is kept.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from app.dmq.sip import SipUri

#: Maps a host name to the address that identifies it, without waiting: the address
#: when known, the name itself when the name is to stand for the node (no DNS, or a
#: look-up that failed), or ``None`` for "unknown yet". On ``None`` the node asks its
#: driver (:class:`~app.dmq.events.HostLookupNeeded`) and holds the node by name until
#: :meth:`~app.dmq.node.DmqNode.host_resolved` tells it the address. Injected so that
#: the sans-IO core never does I/O and can be tested without DNS.
Resolver = Callable[[str], str | None]

#: Kamailio's receive buffer for a node-list body (notification_peer.c).
KAMAILIO_BODY_LIMIT = 1024


class NodeStatus(enum.Enum):
    """The three statuses of a node, as Kamailio 6.x names them."""

    ACTIVE = "active"
    NOT_ACTIVE = "not_active"
    DISABLED = "disabled"


#: The union of 5.6 (active, timeout, disabled, pending) and 6.x (active, not_active,
#: disabled) status words.
STATUS_WORDS = {
    "active": NodeStatus.ACTIVE,
    "not_active": NodeStatus.NOT_ACTIVE,
    "pending": NodeStatus.NOT_ACTIVE,
    "timeout": NodeStatus.NOT_ACTIVE,
    "disabled": NodeStatus.DISABLED,
}

NodeKey = tuple[str, int, str]


def literal_resolver(host: str) -> str:
    """A resolver that knows only IP literals (normalised) and keeps names as they are."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


def node_uri(uri: SipUri) -> SipUri:
    """The node part of a URI: no user part, only the transport parameter."""
    params = tuple((k, v) for k, v in uri.params if k == "transport")
    return SipUri(uri.host, uri.port, None, params, uri.scheme)


@dataclass(slots=True, eq=False)
class Node:
    """One member of the bus as this node sees it."""

    uri: SipUri
    key: NodeKey
    status: NodeStatus
    local: bool = False
    #: Added because it is one of our notification addresses.
    notification_address: bool = False
    #: ``now`` (driver clock) of the last final reply from it, if any.
    last_reply: float | None = None
    #: Consecutive pings it failed to answer.
    failures: int = 0
    #: ``now`` of the last sign of life from it: any answer to one of our requests,
    #: or a request of its own.
    last_heard: float | None = None
    #: What it says it runs (the User-Agent of its requests, the Server header of its
    #: answers, at most 128 characters): a Kamailio node or a gateway, for mirrors
    #: that ask a node holding data for a sync.
    agent: str = ""
    #: The SIP option tags of the ``Supported`` header in the last request or answer
    #: it sent: what it understands beyond plain KDMQ. Empty until it has sent one,
    #: and empty again after a message without one (another program may have taken
    #: over its address, e.g. a Kamailio node replacing a gateway).
    option_tags: frozenset[str] = frozenset()

    def note_supported(self, value: str | None) -> None:
        """Take the option tags of the ``Supported`` header value (or its absence) in
        a message it sent."""
        if not value:
            if self.option_tags:
                self.option_tags = frozenset()
            return
        tags = {tag.strip().lower() for tag in value[:512].split(",")}
        tags.discard("")
        if tags != self.option_tags:
            self.option_tags = frozenset(tags)

    @property
    def host(self) -> str:
        return self.uri.host

    @property
    def port(self) -> int:
        return self.uri.effective_port

    @property
    def transport(self) -> str:
        return self.uri.transport

    @property
    def resolved_ip(self) -> str:
        return self.key[0]

    def line(self, status: NodeStatus | None = None) -> str:
        """This node as a line of a node-list body."""
        return f"{self.uri};status={(status or self.status).value}"


@dataclass(frozen=True, slots=True)
class NodeLine:
    uri: SipUri
    status: NodeStatus


@dataclass(slots=True)
class ParsedNodeList:
    lines: list[NodeLine] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def parse_node_list(body: bytes) -> ParsedNodeList:
    """Parse a node-list body; bad lines go to ``errors`` instead of failing the body.

    No ``status`` means ``active`` (6.x reading; 5.6 would say pending, but only our
    own and Kamailio's lines reach here and both always carry a status).
    """
    result = ParsedNodeList()
    text = body.decode("utf-8", "replace")
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        try:
            uri = SipUri.parse(line)
        except ValueError as exc:
            result.errors.append(str(exc))
            continue
        word = uri.param("status")
        if word is None or word == "":
            status = NodeStatus.ACTIVE
        else:
            found = STATUS_WORDS.get(word.lower())
            if found is None:
                result.errors.append(f"{line!r}: unknown status {word!r}")
                continue
            status = found
        result.lines.append(NodeLine(node_uri(uri), status))
    return result


class NodeList:
    """The set of known nodes, with the local node always first."""

    def __init__(
        self,
        local_uri: SipUri,
        resolver: Resolver = literal_resolver,
        on_unknown: Callable[[str], None] | None = None,
    ) -> None:
        self.resolver = resolver
        #: Called with a host name the resolver does not know yet (it is then held by
        #: name until :meth:`rekey`).
        self.on_unknown = on_unknown
        self._nodes: dict[NodeKey, Node] = {}
        local = node_uri(local_uri)
        self.local = Node(local, self.key_of(local), NodeStatus.ACTIVE, local=True)
        self._nodes[self.local.key] = self.local

    def key_of(self, uri: SipUri, *, ask: bool = True) -> NodeKey:
        """Identity of a node: resolved address, effective port, transport.

        A name whose address is not known yet stands for itself (lower case) until
        :meth:`rekey` is called for it; with ``ask`` the name is also handed to
        ``on_unknown`` (without, when the node may not be kept anyway).
        """
        address = self.resolver(uri.host)
        if address is None:
            address = uri.host.lower()
            if ask and self.on_unknown is not None:
                self.on_unknown(address)
        return (address, uri.effective_port, uri.transport)

    def rekey(self, host: str) -> list[tuple[Node, Node]]:
        """Identify again every node named ``host``, now that its address is known.

        A node that turns out to be one already held (the same node by address, or
        ourselves) is dropped; each such ``(dropped, kept)`` pair is returned.
        """
        name = host.lower()
        duplicates: list[tuple[Node, Node]] = []
        for node in [n for n in self._nodes.values() if n.uri.host.lower() == name]:
            key = self.key_of(node.uri)
            if key == node.key:
                continue
            del self._nodes[node.key]
            kept = self._nodes.get(key)
            if kept is not None and not node.local:
                duplicates.append((node, kept))
                continue
            if kept is not None:
                # We are the node held by address: it goes, we stay.
                duplicates.append((kept, node))
            node.key = key
            self._nodes[key] = node
        return duplicates

    def get(self, key: NodeKey) -> Node | None:
        return self._nodes.get(key)

    def find(self, uri: SipUri) -> Node | None:
        return self._nodes.get(self.key_of(uri))

    def is_local(self, uri: SipUri) -> bool:
        return self.key_of(uri) == self.local.key

    def add(
        self, uri: SipUri, status: NodeStatus, *, notification_address: bool = False
    ) -> Node | None:
        """Add a node unless it is known or is us; return the new node or ``None``."""
        clean = node_uri(uri)
        key = self.key_of(clean)
        if key in self._nodes:
            existing = self._nodes[key]
            if notification_address and not existing.local:
                existing.notification_address = True
            return None
        node = Node(clean, key, status, notification_address=notification_address)
        self._nodes[key] = node
        return node

    def remove(self, node: Node) -> bool:
        if node.local or self._nodes.get(node.key) is not node:
            return False
        del self._nodes[node.key]
        return True

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._nodes.values()))

    def __len__(self) -> int:
        return len(self._nodes)

    def others(self) -> list[Node]:
        return [node for node in self._nodes.values() if not node.local]

    def active_others(self) -> list[Node]:
        return [
            node
            for node in self._nodes.values()
            if not node.local and node.status is NodeStatus.ACTIVE
        ]

    def body(self) -> bytes:
        """Our node-list body: ourselves and the nodes we hold as active."""
        lines = [self.local.line()]
        lines.extend(node.line() for node in self.active_others())
        return ("\r\n".join(lines) + "\r\n").encode()

    def leave_body(self) -> bytes:
        """The body of a graceful leave: only ourselves, disabled."""
        return (self.local.line(NodeStatus.DISABLED) + "\r\n").encode()

    def join_body(self) -> bytes:
        """The body of a join: only ourselves (what Kamailio sends with Max-Forwards 2)."""
        return (self.local.line() + "\r\n").encode()
