"""The DMQ node: a sans-IO state machine that a Kamailio bus takes for one of its own.

Theory of operation
-------------------
Three kinds of input, each with the current time ``now`` from the driver's clock:

* :meth:`DmqNode.receive` - one whole SIP message (a UDP datagram or a framed TCP
  message) and where it came from;
* :meth:`DmqNode.handle_timer` - the deadline from :meth:`get_timer` has passed;
* calls: :meth:`start`, :meth:`broadcast`, :meth:`send`, :meth:`reply`,
  :meth:`add_node`, :meth:`remove_node`, :meth:`host_resolved`, :meth:`stop`.

Three kinds of output, which the driver collects after every input:

* :meth:`datagrams_to_send` - ``(bytes, Endpoint)`` pairs;
* :meth:`get_timer` - the one deadline to arm;
* :meth:`next_event` - :mod:`app.dmq.events` (status changes, finished sends, reply
  timeouts, host names to look up).

DNS never happens inside the node. Its resolver answers from what is already known;
a host name it does not know yet (a node list naming ``sip:kamailio2.example:5060``)
is held by name and handed out as :class:`HostLookupNeeded`; the driver resolves it
however it likes (asynchronously, with a timeout and a negative cache) and calls
:meth:`host_resolved`, upon which the node identifies its nodes again, by address.

Peer handlers (:mod:`app.dmq.peers`) are plain callables run inside :meth:`receive`.

The node has no clock: time enters only as the ``now`` of an input, and reaches timer
and transaction callbacks as their ``now`` argument, so a callback can never act on a
stale instant kept from an earlier input.

Membership follows Kamailio's ``notification_peer`` (protocol notes, section 4): join
with Max-Forwards 2, answer a notification with our list and pass a changed list one
hop on, ping every node every ``ping_interval``, a node is disabled on its first
missed ping and removed on its second. Where Kamailio has known faults we do better:
retransmissions are never delivered twice, a node's own word about itself outranks a
third party's (so a node we removed is not brought back as a ghost by another node's
stale list), we never add ourselves, and a graceful stop tells every active node. A
missed ping counts only when the node showed no other sign of life meanwhile (see
``probe_before_disabling``), and the node list is bounded (``max_nodes``, and new nodes
per list and per second), so no neighbour can make us allocate or forward without end.

Nothing is lost silently: a broadcast is meant for every node held, whatever its
status, and for every node removed after missed pings whose outbox is still parked; a
message a node cannot take now waits in that node's outbox (:mod:`app.dmq.outbox`)
until it answers again, or is dropped for a reason that is counted and reported. A
removal after missed pings follows Kamailio's rules on the wire (our list stops naming
the node) but keeps the node's outbox parked for ``outbox_max_age``: the node is still
pinged, and taken back when it answers, so a false verdict costs latency, not data.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from app.dmq.cache import BoundedCache
from app.dmq.config import NodeConfig, is_valid_peer_id
from app.dmq.errors import (
    InvalidHeaderError,
    InvalidPeerIdError,
    InvalidReplyTimeoutError,
    MessageTooLargeError,
    NodeListFullError,
    NodeStoppedError,
    ReplyNotPendingError,
    ReservedPeerError,
    UnknownNodeError,
    UnknownPeerError,
)
from app.dmq.events import (
    Delivery,
    Event,
    HostLookupNeeded,
    NodeResult,
    NodeStatusChanged,
    OutboxDropped,
    PeerReplyTimedOut,
    SendCompleted,
    SendOperation,
)
from app.dmq.nodes import (
    KAMAILIO_BODY_LIMIT,
    Node,
    NodeKey,
    NodeLine,
    NodeList,
    NodeStatus,
    Resolver,
    literal_resolver,
    node_uri,
    parse_node_list,
)
from app.dmq.outbox import (
    DROP_AGE,
    DROP_BYTES,
    DROP_COUNT,
    DROP_EXPIRED,
    DROP_PARK_LIMIT,
    DROP_REMOVED,
    DROP_STOPPED,
    Outbox,
    OutboxInfo,
    OutboxMessage,
)
from app.dmq.peers import ORIGIN_HEADER, Peer, PeerHandler, PeerInit, PeerMessage, PeerReply
from app.dmq.sip import (
    MAX_UDP_MESSAGE,
    Headers,
    NameAddr,
    SipParseError,
    SipRequest,
    SipResponse,
    SipUri,
    Via,
    parse_cseq,
    parse_message,
    via_param,
)
from app.dmq.timers import TimerHandle, TimerQueue
from app.dmq.transaction import (
    MAGIC_COOKIE,
    Endpoint,
    FinalResult,
    Recipe,
    ServerTransaction,
    TransactionLayer,
)

log = logging.getLogger("dmq.node")

#: Reason phrases for the codes the node generates itself.
REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "User Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Request Entity Too Large",
    483: "Too Many Hops",
    500: "Server Internal Error",
    503: "Service Unavailable",
    505: "Version Not Supported",
    513: "Message Too Large",
}

#: Entries kept by each cache of the hot path (source hosts, Request-URIs, From URIs,
#: peer ids). A bus uses a handful of each; the bound is for the keys others choose.
CACHE_SIZE = 1024

#: What a cache answers for a key it does not hold, where ``None`` is a value.
_MISSING = object()

_ORIGIN = Headers.canonical(ORIGIN_HEADER)

#: The one peer id under which requests for peers we do not have are counted (in
#: ``NodeStats.received``): the ids are the sender's choice, and a series per id would
#: let any sender grow the counters, and the metrics, without bound.
UNKNOWN_PEER = "(unknown)"
#: Recipes of plain answers (a code and a reason) kept to be shared (_respond): a
#: handful in use; a handler inventing reasons only starts the table over.
_MAX_RECIPES = 64

#: Refused nodes are logged at most once per this many seconds (with a count).
REFUSAL_LOG_INTERVAL = 60.0

#: KDMQ refused 403 for an untrusted source is logged at most once per source per this
#: many seconds (the driver sets its own log interval); every refusal is counted.
UNTRUSTED_LOG_INTERVAL = 10.0

#: KDMQ is sent with this CSeq number on every request, as Kamailio does.
CSEQ_NUMBER = 10

#: Deferred messages whose fate is remembered after they were answered, so that a late
#: :meth:`DmqNode.reply` can be told what happened (a 408, a 404...) rather than only
#: "not pending". At 10 000 messages per second this covers the last second.
FINISHED_RECORD_LIMIT = 10_000

#: Extra headers as the caller gives them: ``(name, value)`` pairs.
ExtraHeaders = Sequence[tuple[str, str]]

#: Headers the node writes on every KDMQ request itself (canonical names); an extra
#: header may not replace or repeat one of them.
_OWN_HEADERS = frozenset(
    Headers.canonical(name)
    for name in (
        "Via",
        "To",
        "From",
        "CSeq",
        "Call-ID",
        "Max-Forwards",
        "User-Agent",
        "Content-Type",
        "Content-Length",
        "Route",
        "Record-Route",
        "Contact",
    )
)

#: A SIP token, and a character a header value may not hold (a control character
#: but tab). Regular expressions: a check character by character in Python cost more
#: than the rest of building a request.
_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

#: Header lines after the fixed ones, as they go on the wire (validated).
HeaderLines = tuple[str, ...]


#: Extra header names :func:`header_lines` has accepted: a service sends the same few on
#: every message (the gateway's origin stamp), checked once each.
_ACCEPTED_NAMES: set[str] = set()


def header_lines(headers: ExtraHeaders) -> HeaderLines:
    """Check extra headers and render them as ``Name: value`` lines.

    Raises :class:`InvalidHeaderError` naming the header and what is wrong with it: a
    name must be a SIP token and not one of the headers the node writes itself; a
    value must be one line of printable text (tabs allowed), because a line break
    would let a caller inject headers or end the head early."""
    lines = []
    for item in headers:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise InvalidHeaderError(f"an extra header must be a (name, value) pair, not {item!r}")
        name, value = item
        if not isinstance(name, str) or name not in _ACCEPTED_NAMES:
            if not isinstance(name, str) or not _TOKEN.fullmatch(name):
                raise InvalidHeaderError(
                    f"header name {name!r} must be a SIP token "
                    "(letters, digits, - . ! % * _ + ` ' ~)"
                )
            if Headers.canonical(name) in _OWN_HEADERS:
                raise InvalidHeaderError(
                    f"header {name!r} is written by the DMQ node itself and cannot be given"
                )
            if len(_ACCEPTED_NAMES) >= CACHE_SIZE:
                _ACCEPTED_NAMES.clear()
            _ACCEPTED_NAMES.add(name)
        if not isinstance(value, str) or _CONTROL.search(value):
            raise InvalidHeaderError(
                f"header {name} value {value!r} must be a single line of text without "
                "control characters"
            )
        lines.append(f"{name}: {value.strip()}")
    return tuple(lines)


@dataclass(slots=True)
class NodeStats:
    """Counters for metrics and tests; all monotonic."""

    #: (peer_id, code) -> requests received and the code we answered.
    received: Counter[tuple[str, int]]
    #: (peer_id, code) -> requests sent and the final code (local 408 included).
    sent: Counter[tuple[str, int]]
    #: Malformed requests answered with an error (400, 505, 513...).
    malformed_answered: int = 0
    #: Messages dropped because they could not be answered (no usable Via...).
    malformed_dropped: int = 0
    #: Requests refused because the source is not trusted.
    forbidden: int = 0
    #: Deferred peer replies that did not come within the peer's reply_timeout and
    #: were answered 408 by the node (each also emits :class:`PeerReplyTimedOut`).
    reply_timeouts: int = 0
    #: Messages put in a node's outbox (one per node a message waits for).
    outbox_queued: int = 0
    #: Transactions started to resend a message from an outbox.
    outbox_resent: int = 0
    #: Messages from an outbox that the node answered (delivered after a retry).
    outbox_delivered: int = 0
    #: reason (``removed``, ``count``, ``bytes``, ``age``, ``stopped``, ``expired``,
    #: ``park_limit``) -> messages dropped undelivered (each drop also emits
    #: :class:`OutboxDropped`).
    outbox_dropped: Counter[str] = field(default_factory=Counter)
    #: Nodes removed after missed pings whose outbox was parked for them.
    outbox_parked: int = 0
    #: Parked nodes that came back and were taken into the node list again.
    outbox_unparked: int = 0
    #: Second pings sent halfway through a ping's Timer F (probe_before_disabling).
    probes_sent: int = 0
    #: Missed pings not held against a node because it showed life meanwhile (an
    #: answer to a probe or to anything else, or a request of its own).
    verdicts_spared: int = 0
    #: bound (``max_nodes``, ``max_new_nodes_per_list``, ``max_new_nodes_per_second``)
    #: -> nodes named in node lists that were not added because of it.
    nodes_refused: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True, eq=False)
class _Parked:
    """A node removed after missed pings, out of the node list, whose outbox waits."""

    #: The node as it was held (its outbox is keyed by this object).
    node: Node
    #: Fires when the park expires (``outbox_max_age`` after the removal).
    expiry: TimerHandle


@dataclass(slots=True, eq=False)
class _Lane:
    """One node's user messages in flight, and those waiting for their turn."""

    in_flight: int = 0
    waiting: deque[tuple[SendOperation, OutboxMessage]] = field(default_factory=deque)

    def __init__(
        self,
        in_flight: int = 0,
        waiting: deque[tuple[SendOperation, OutboxMessage]] | None = None,
    ) -> None:
        # Written out (the decorator keeps it): see "explicit __init__" in setup.py.
        self.in_flight = in_flight
        self.waiting = deque() if waiting is None else waiting


@dataclass(slots=True, eq=False)
class _Pending:
    """A request delivered to a peer whose handler will answer later."""

    st: ServerTransaction
    request: SipRequest
    peer_id: str
    destination: Endpoint
    #: When it is answered 408 unless answered before.
    deadline: float
    #: The seconds ``deadline`` is after its arrival: its deadline queue, and what a
    #: 408 says.
    reply_timeout: float

    def __init__(
        self,
        st: ServerTransaction,
        request: SipRequest,
        peer_id: str,
        destination: Endpoint,
        deadline: float,
        reply_timeout: float,
    ) -> None:
        # Written out (the decorator keeps it): see "explicit __init__" in setup.py.
        self.st = st
        self.request = request
        self.peer_id = peer_id
        self.destination = destination
        self.deadline = deadline
        self.reply_timeout = reply_timeout


class DmqNode:
    """One DMQ node. See the module docstring for how to drive it."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        resolver: Resolver = literal_resolver,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.timers = TimerQueue()
        self.transactions = TransactionLayer(
            self.timers, config.timers, self._transmit, self._rebuild
        )
        #: (code, reason) -> the recipe of that answer with nothing else (_respond).
        self._recipes: dict[tuple[int, str], Recipe] = {}
        self._outbox: list[tuple[bytes, Endpoint]] = []
        self._events: deque[Event] = deque()
        self._resolver = resolver
        #: Host name -> address, as told by :meth:`host_resolved` (names come from
        #: other nodes' lists, hence the bound).
        self._addresses: BoundedCache[str, str] = BoundedCache(CACHE_SIZE)
        #: Host names asked for (HostLookupNeeded) and not answered yet.
        self._lookups: set[str] = set()
        #: What literal_resolver said for each host text (see _resolve).
        self._literals: BoundedCache[str, str] = BoundedCache(CACHE_SIZE)
        self.nodes = NodeList(config.server_address, self._resolve, self._lookup_needed)
        self.peers: dict[str, Peer] = {}
        self.stats = NodeStats(Counter(), Counter())
        self.started = False
        self.stopped = False
        self._pending: dict[int, _Pending] = {}
        #: Deferred message ids by reply timeout, in arrival order, so also in order of
        #: deadline: one timer per queue, at its head's deadline, rather than a timer
        #: armed and cancelled per message. An answered id leaves its queue when it
        #: reaches the head (at once, when answered in order, as group commits do).
        self._deadlines: dict[float, deque[int]] = {}
        #: The armed timer of each deadline queue.
        self._deadline_timers: dict[float, TimerHandle] = {}
        #: message id -> how a deferred message was answered (bounded, oldest first).
        self._finished: BoundedCache[int, str] = BoundedCache(FINISHED_RECORD_LIMIT)
        self._ids = 0
        self._ping_timer: TimerHandle | None = None
        #: Messages waiting for nodes that could not take them yet (app.dmq.outbox).
        self._outboxes: dict[Node, Outbox] = {}
        #: Nodes removed after missed pings whose outboxes are parked, by address,
        #: oldest first (at most ``max_nodes``).
        self._parked: dict[NodeKey, _Parked] = {}
        self._age_timer: TimerHandle | None = None
        #: Per node: user messages in flight, and those waiting for their turn
        #: (NodeConfig.max_in_flight_per_node).
        self._lanes: dict[Node, _Lane] = {}
        #: New nodes that may still be taken in now (max_new_nodes_per_second).
        self._new_node_tokens = float(config.max_new_nodes_per_list)
        self._new_node_tokens_at: float | None = None
        self._refusals_unlogged = 0
        self._refusal_logged_at: float | None = None
        #: Nodes removed after missed pings (or by an operator): a third party's stale
        #: list does not bring them back until this time or until they speak for
        #: themselves.
        self._tombstones: dict[NodeKey, float] = {}
        self._trust_cache: BoundedCache[str, bool] = BoundedCache(CACHE_SIZE)
        #: Seconds between two log lines about one untrusted source.
        self.untrusted_log_interval = UNTRUSTED_LOG_INTERVAL
        #: Untrusted source host -> (time of its last log line, refusals left out since).
        self._untrusted_logged: BoundedCache[str, tuple[float, int]] = BoundedCache(CACHE_SIZE)
        self._uri_cache: BoundedCache[str, str | None] = BoundedCache(CACHE_SIZE)
        self._sender_cache: BoundedCache[str, SipUri] = BoundedCache(CACHE_SIZE)
        self._from_cache: BoundedCache[str, str] = BoundedCache(CACHE_SIZE)
        self._tag = f"{self.rng.getrandbits(64):016x}"
        local = self.nodes.local.uri
        self._local_hostport = (
            f"[{local.host}]:{local.effective_port}"
            if ":" in local.host
            else f"{local.host}:{local.effective_port}"
        )
        self._max_message = (
            MAX_UDP_MESSAGE if local.transport == "udp" else config.max_stream_message
        )
        #: ``Supported`` on what we send, when the embedding service has option tags.
        tags = ", ".join(config.option_tags)
        self._supported_lines = (f"Supported: {tags}",) if tags else ()
        self._supported_head = f"Supported: {tags}\r\n" if tags else ""
        # What every request we send is made of (_send_request): its Via, Call-ID and
        # From tag are this node's random tag and a count of the requests it made,
        # unique in space (the tag) and time (the count) as RFC 3261 asks of a branch,
        # and the rest is the same for every request to one node for one peer.
        self._requests_made = 0
        self._call_id_tail = f".{self._tag}@{self._local_hostport}"
        self._request_middle = (
            f"\r\nCSeq: {CSEQ_NUMBER} KDMQ\r\nCall-ID: ",
            f"\r\nUser-Agent: {config.user_agent}\r\n{self._supported_head}",
        )
        #: (node URI, peer id) -> the request line and Via up to the branch's count,
        #: and the To and From up to the tag's count.
        self._request_heads: dict[tuple[SipUri, str], tuple[str, str]] = {}
        #: Node key -> where its requests go.
        self._endpoints: dict[NodeKey, Endpoint] = {}
        #: Peer ids a send has checked already (is_valid_peer_id), at most CACHE_SIZE.
        self._valid_peer_ids: set[str] = set()

    # ------------------------------------------------------------------ outputs

    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint]]:
        """Everything queued for sending since the last call."""
        out = self._outbox
        self._outbox = []
        return out

    def get_timer(self) -> float | None:
        """The instant at which :meth:`handle_timer` must be called next."""
        return self.timers.next_deadline()

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # ------------------------------------------------------------------ peers

    def register_peer(
        self,
        peer_id: str,
        handler: PeerHandler,
        *,
        init: PeerInit | None = None,
        description: str = "",
        reply_timeout: float | None = None,
    ) -> Peer:
        """Register (or replace) the handler of a peer id.

        ``reply_timeout`` bounds how long a message the handler deferred (returned
        ``None`` for) waits for :meth:`reply`; ``None`` means Timer F. If the bus is
        already up, the new peer's init hook runs at once: it would otherwise never
        run, since the node has already reached its peer nodes.
        """
        self._check_peer_id(peer_id)
        self._check_reply_timeout(reply_timeout)
        previous = self.peers.get(peer_id)
        peer = Peer(peer_id, handler, init, description, reply_timeout)
        if previous is not None:
            peer.init_done = previous.init_done
        self.peers[peer_id] = peer
        if not peer.init_done and self.nodes.active_others():
            self._run_init(peer)
        return peer

    def update_peer(
        self,
        peer_id: str,
        *,
        description: str | None = None,
        reply_timeout: float | None = None,
    ) -> Peer:
        """Change a registered peer's description or reply timeout (``None`` leaves a
        setting as it is). Messages already waiting keep the deadline they were given."""
        peer = self.peers.get(peer_id)
        if peer is None:
            raise UnknownPeerError(f"no peer is registered as {peer_id!r}")
        self._check_reply_timeout(reply_timeout)
        if description is not None:
            peer.description = description
        if reply_timeout is not None:
            peer.reply_timeout = reply_timeout
        return peer

    def unregister_peer(self, peer_id: str, now: float) -> Peer:
        """Remove a peer; the messages still waiting for its answer are answered 404
        User Not Found now, as a request for an unknown peer would be, rather than
        being left to time out."""
        peer = self.peers.pop(peer_id, None)
        if peer is None:
            raise UnknownPeerError(f"no peer is registered as {peer_id!r}")
        waiting = [mid for mid, pending in self._pending.items() if pending.peer_id == peer_id]
        for message_id in waiting:
            self._finish(
                message_id,
                PeerReply(404, "User Not Found"),
                now,
                f"answered 404 User Not Found when peer {peer_id} was unregistered",
            )
        return peer

    def _check_peer_id(self, peer_id: str) -> None:
        """Refuse the notification channel and a peer id that is not a SIP user name
        (checked once per id: a service sends to the same few)."""
        if peer_id == self.config.notification_channel:
            raise ReservedPeerError(
                f"{peer_id!r} is the notification channel and carries membership only"
            )
        if peer_id not in self._valid_peer_ids:
            if not is_valid_peer_id(peer_id):
                raise InvalidPeerIdError(
                    f"peer id {peer_id!r} must be 1-128 letters, digits or - _ . ! ~ * ' ( )"
                )
            if len(self._valid_peer_ids) >= CACHE_SIZE:
                self._valid_peer_ids.clear()
            self._valid_peer_ids.add(peer_id)

    def _check_reply_timeout(self, reply_timeout: float | None) -> None:
        if reply_timeout is None:
            return
        if not reply_timeout > 0:  # also refuses NaN
            raise InvalidReplyTimeoutError(
                f"reply_timeout {reply_timeout!r} must be a positive number of seconds"
            )
        timer_f = self.config.timers.timer_f_value
        if reply_timeout > timer_f:
            raise InvalidReplyTimeoutError(
                f"reply_timeout {reply_timeout:g} s is longer than Timer F ({timer_f:g} s): "
                "the sending node gives up at its Timer F, so a longer wait cannot be "
                "honoured"
            )

    def _run_init(self, peer: Peer) -> None:
        peer.init_done = True
        if peer.init is None:
            return
        try:
            peer.init()
        except Exception:
            log.exception("init hook of peer %s failed", peer.peer_id)

    def _maybe_run_inits(self) -> None:
        for peer in list(self.peers.values()):
            if not peer.init_done:
                self._run_init(peer)

    # ------------------------------------------------------------------ lifecycle

    def start(self, now: float) -> None:
        """Join the bus through the notification addresses and start pinging."""
        if self.started:
            return
        self.started = True
        for address in self.config.notification_addresses:
            self.add_notification_address(address)
        self._join(now)
        self._ping_timer = self.timers.call_at(now + self.config.ping_interval, self._ping)

    def add_notification_address(self, uri: SipUri) -> Node | None:
        """Add a node to join through (already resolved by the driver, if need be).

        A notification address that names ourselves is skipped with a warning: a node
        listing itself (Kamailio issue #1109) must not hold itself twice or ping itself.
        """
        if self.nodes.is_local(uri):
            log.warning("notification address %s is this node itself; skipped", uri)
            return None
        if self.nodes.find(uri) is None and len(self.nodes) - 1 >= self.config.max_nodes:
            log.warning("notification address %s skipped: the node list is full", uri)
            return None
        node = self.nodes.add(uri, NodeStatus.NOT_ACTIVE, notification_address=True)
        if node is not None:
            self._unpark(node)
            self._emit_status(node, None, node.status, "notification address")
        return node

    def stop(self, now: float) -> SendOperation:
        """Leave gracefully: tell every active node we are disabled, stop pinging.

        Requests still waiting for a peer's answer get 503. Returns the operation of
        the leave message so that the driver can wait for the answers (or Timer F).
        """
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        for pending_id in list(self._pending):
            self._finish(
                pending_id,
                PeerReply(503, "Service Unavailable"),
                now,
                "answered 503 Service Unavailable when the node stopped",
            )
        targets = self.nodes.active_others() if not self.stopped else []
        self.stopped = True
        for park in self._parked.values():
            park.expiry.cancel()
        self._parked.clear()
        for node in list(self._outboxes):
            self._drop_outbox(node, DROP_STOPPED)
        for node, lane in list(self._lanes.items()):
            # Every message still waiting its turn is dropped, and its operation
            # completes with that result.
            while lane.waiting:
                operation, _ = lane.waiting.popleft()
                self._add_result(
                    operation,
                    NodeResult(node.uri, 0, "dropped: node stopped", outcome=Delivery.DROPPED),
                )
        return self._operation(
            self.config.notification_channel,
            targets,
            self.nodes.leave_body(),
            "text/plain",
            1,
            now,
        )

    # ------------------------------------------------------------------ sending

    def broadcast(
        self,
        peer_id: str,
        body: bytes,
        content_type: str | None,
        now: float,
        *,
        exclude: SipUri | None = None,
        max_forwards: int = 1,
        headers: ExtraHeaders = (),
        only: Callable[[Node], bool] | None = None,
    ) -> SendOperation:
        """Send to every node of the list but us (and ``exclude``), whatever its
        status; one result per node. ``only`` narrows the targets to the nodes it
        accepts (the gateway sends bundles to the nodes that read them, and single
        messages to the others).

        A node that is active or not active yet is sent the message now, and one that
        does not answer it gets it through its outbox (:mod:`app.dmq.outbox`); for a
        disabled node, or one whose outbox is in use, the message goes to the outbox at
        once. Either way its result says :attr:`Delivery.QUEUED`. A node removed after
        missed pings whose outbox is parked is a target too: the message waits in that
        outbox (a removal is not a node's leaving for good). ``headers`` are extra
        ``(name, value)`` headers put on each request as given (:func:`header_lines`
        says which are refused), and on every resend of it."""
        extra = header_lines(headers)
        self._check_user_send(peer_id, body, extra)
        targets = self.broadcast_targets(exclude)
        if only is not None:
            targets = [node for node in targets if only(node)]
        return self._operation(
            peer_id, targets, body, content_type, max_forwards, now, extra, store=True
        )

    def broadcast_targets(self, exclude: SipUri | None = None) -> list[Node]:
        """The nodes a broadcast goes to now: every node of the list but us (and
        ``exclude``), and the nodes whose outboxes are parked."""
        excluded = self.nodes.key_of(exclude) if exclude is not None else None
        targets = [n for n in self.nodes.others() if n.key != excluded]
        targets.extend(p.node for key, p in self._parked.items() if key != excluded)
        return targets

    def send_target(self, node: SipUri) -> Node | None:
        """The node a send to ``node`` goes to (a node of the list, or one whose
        outbox is parked), or None when there is none."""
        target = self.nodes.find(node)
        if target is None:
            park = self._parked.get(self.nodes.key_of(node, ask=False))
            target = park.node if park is not None else None
        return None if target is None or target.local else target

    def send(
        self,
        peer_id: str,
        body: bytes,
        content_type: str | None,
        node: SipUri,
        now: float,
        *,
        max_forwards: int = 1,
        headers: ExtraHeaders = (),
    ) -> SendOperation:
        """Send to one node of the list, whatever its status: now, or through its
        outbox when it is disabled, as :meth:`broadcast` does. A node removed after
        missed pings whose outbox is parked is a target too, as for a broadcast: the
        message waits in that outbox and is sent, in order, when the node answers."""
        extra = header_lines(headers)
        self._check_user_send(peer_id, body, extra)
        target = self.nodes.find(node)
        if target is None:
            park = self._parked.get(self.nodes.key_of(node, ask=False))
            target = park.node if park is not None else None
        if target is None or target.local:
            raise UnknownNodeError(f"{node} is not a node of this bus (see the node list)")
        return self._operation(
            peer_id, [target], body, content_type, max_forwards, now, extra, store=True
        )

    def send_once(
        self, peer_id: str, body: bytes, content_type: str | None, node: SipUri, now: float
    ) -> SendOperation:
        """Send to one node exactly once: no UDP retransmission, no outbox, no resend.

        For a request the receiver does not deduplicate and answers with work of its
        own for every copy: a Kamailio 5.6 node dumps its whole table to the sender for
        each copy of a sync request that reaches it. The result is the node's answer,
        or a timeout at Timer F when the one datagram (or its answer) was lost; the
        caller decides whether to ask again, and whom."""
        self._check_user_send(peer_id, body)
        target = self.nodes.find(node)
        if target is None or target.local:
            raise UnknownNodeError(f"{node} is not a node of this bus (see the node list)")
        return self._operation(peer_id, [target], body, content_type, 1, now, retransmit=False)

    def reserve_ids(self, count: int) -> int:
        """Take ``count`` consecutive message ids (the first is returned) for messages
        the caller sends inside others (bundled), so that their ids never clash with
        those of the node's operations and received messages."""
        first = self._ids + 1
        self._ids += count
        return first

    def _check_user_send(self, peer_id: str, body: bytes, extra: HeaderLines = ()) -> None:
        if self.stopped:
            raise NodeStoppedError("this node has left the bus")
        self._check_peer_id(peer_id)
        limit = self.max_body_size
        extra_size = sum(len(line.encode()) + 2 for line in extra)
        if len(body) + extra_size > limit:
            with_headers = f" with {extra_size} bytes of extra headers" if extra else ""
            raise MessageTooLargeError(
                f"a body of {len(body)} bytes{with_headers} does not fit in one message "
                f"on this transport (at most {limit} bytes)"
            )

    @property
    def max_body_size(self) -> int:
        """The largest body that fits in one message with our headers (about 600 bytes
        of headers are kept in reserve)."""
        return self._max_message - 600

    def _operation(
        self,
        peer_id: str,
        targets: list[Node],
        body: bytes,
        content_type: str | None,
        max_forwards: int,
        now: float,
        extra: HeaderLines = (),
        *,
        store: bool = False,
        retransmit: bool = True,
    ) -> SendOperation:
        """Send one message to ``targets``; with ``store``, a target that cannot take
        it now gets it through its outbox (never for membership messages)."""
        self._ids += 1
        operation = SendOperation(self._ids, peer_id, tuple(node.uri for node in targets))
        if not targets:
            self._events.append(SendCompleted(operation))
            return operation
        message: OutboxMessage | None = None
        if store:
            size = len(body) + sum(len(line) + 2 for line in extra) + len(content_type or "")
            message = OutboxMessage(
                self._ids, peer_id, body, content_type, extra, max_forwards, now, size
            )
        cap = self.config.max_in_flight_per_node
        for node in targets:
            if message is not None:
                lane = self._lanes.get(node)
                if lane is None:
                    lane = self._lanes[node] = _Lane()
                if lane.waiting or lane.in_flight >= cap:
                    # Behind the messages already waiting, so that order is kept.
                    lane.waiting.append((operation, message))
                    continue
                self._deliver(node, lane, operation, message, now)
                if not lane.in_flight:
                    del self._lanes[node]  # into the outbox: nothing to keep a turn for
                continue
            self._send_request(
                node,
                peer_id,
                body,
                content_type,
                max_forwards,
                now,
                self._operation_result(operation, node, message),
                extra,
                retransmit=retransmit,
            )
        return operation

    def _deliver(
        self, node: Node, lane: _Lane, operation: SendOperation, message: OutboxMessage, now: float
    ) -> None:
        """Send a user message to one node now (its turn has come), or into its outbox."""
        # A disabled node is known not to answer: its copy waits. A node that is
        # not active yet (we asked it, it has not answered) is tried now, like an
        # active one: if it does not answer either, the copy waits all the same.
        if node.status is NodeStatus.DISABLED or node in self._outboxes:
            dropped = self._enqueue(node, message, now)
            outcome = Delivery.QUEUED if dropped is None else Delivery.DROPPED
            why = (
                f"queued: node is {node.status.value}"
                if dropped is None
                else (f"dropped: outbox bound ({dropped})")
            )
            self._add_result(operation, NodeResult(node.uri, 0, why, outcome=outcome))
            if dropped is None:
                self._drain(node, now)
            return
        lane.in_flight += 1
        self._send_request(
            node,
            operation.peer_id,
            message.body,
            message.content_type,
            message.max_forwards,
            now,
            self._lane_result(node, lane, self._operation_result(operation, node, message)),
            message.extra,
        )

    def _lane_result(
        self, node: Node, lane: _Lane, on_result: Callable[[FinalResult, float], None]
    ) -> Callable[[FinalResult, float], None]:
        def done(result: FinalResult, now: float) -> None:
            lane.in_flight -= 1
            on_result(result, now)
            self._release(node, lane, now)

        return done

    def _release(self, node: Node, lane: _Lane, now: float) -> None:
        """Send the messages waiting for a node, oldest first, while it has room."""
        cap = self.config.max_in_flight_per_node
        waiting = lane.waiting
        while waiting and lane.in_flight < cap:
            operation, message = waiting.popleft()
            if self.stopped or not self._held(node):
                why = "dropped: node stopped" if self.stopped else "dropped: node removed"
                self._add_result(operation, NodeResult(node.uri, 0, why, outcome=Delivery.DROPPED))
                continue
            self._deliver(node, lane, operation, message, now)
        if not waiting and lane.in_flight == 0 and self._lanes.get(node) is lane:
            del self._lanes[node]

    def _add_result(self, operation: SendOperation, result: NodeResult) -> None:
        operation.results.append(result)
        if operation.done:
            self._events.append(SendCompleted(operation))

    def _operation_result(
        self, operation: SendOperation, node: Node, message: OutboxMessage | None
    ) -> Callable[[FinalResult, float], None]:
        uri = node.uri
        membership = operation.peer_id == self.config.notification_channel
        key = node.key

        def on_result(result: FinalResult, now: float) -> None:
            response = result.response
            outcome = Delivery.DELIVERED
            if result.local:
                outcome = Delivery.DROPPED
                if message is not None:
                    outcome = self._store_failed(node, message, now)
            elif not membership:
                self._node_answered(node, now)
                if response is not None:
                    node.note_supported(response.headers.get("supported"))
            self._add_result(
                operation,
                NodeResult(
                    uri,
                    result.code,
                    result.reason,
                    response.body if response is not None else b"",
                    response.headers.get("content-type") if response is not None else None,
                    result.timed_out,
                    result.transport_error,
                    outcome,
                ),
            )
            if membership:
                self._on_notification_result(key, result, now)

        return on_result

    # ------------------------------------------------------------------ outboxes

    def outboxes(self) -> list[OutboxInfo]:
        """Every outbox that holds messages, for metrics."""
        return [
            OutboxInfo(
                node.uri,
                len(box.messages),
                box.size,
                len(box.in_flight),
                min(m.created_at for m in box.messages),
                self._is_parked(node),
            )
            for node, box in self._outboxes.items()
            if box.messages
        ]

    def _is_parked(self, node: Node) -> bool:
        """The node was removed after missed pings and its outbox waits for it."""
        park = self._parked.get(node.key)
        return park is not None and park.node is node

    def _held(self, node: Node) -> bool:
        """The node is still in the list (not removed, not replaced by a duplicate)."""
        return self.nodes.get(node.key) is node

    def _store_failed(self, node: Node, message: OutboxMessage, now: float) -> Delivery:
        """A message sent at once got no answer: keep it for the node (held again
        under a new :class:`Node` if it was removed and came back, or parked), unless
        an operator removed it or we stopped."""
        target = self._current(node)
        if self.stopped or target is None:
            reason = DROP_STOPPED if self.stopped else DROP_REMOVED
            self.stats.outbox_dropped[reason] += 1
            self._events.append(OutboxDropped(node.uri, message.peer_id, 1, reason))
            return Delivery.DROPPED
        node = target
        dropped = self._enqueue(node, message, now)
        box = self._outboxes.get(node)
        if box is not None:
            box.paused = True
        return Delivery.QUEUED if dropped is None else Delivery.DROPPED

    def _current(self, node: Node) -> Node | None:
        """The node now standing for ``node``'s address: itself while held, the node
        that replaced it after a removal and a return, its parked self, or None."""
        if self._held(node):
            return node
        held = self.nodes.get(node.key)
        if held is not None and not held.local:
            return held
        park = self._parked.get(node.key)
        return park.node if park is not None else None

    def _enqueue(self, node: Node, message: OutboxMessage, now: float) -> str | None:
        """Put a message in a node's outbox, in the order the messages were sent (a
        message that timed out may come after newer ones queued at once); return the
        drop reason when a bound refuses it (the newest message is the one refused,
        so what callers were told is queued stays queued, in order)."""
        box = self._outboxes.get(node)
        held = len(box.messages) if box is not None else 0
        held_bytes = box.size if box is not None else 0
        config = self.config
        reason = None
        if held >= config.outbox_max_messages:
            reason = DROP_COUNT
        elif held_bytes + message.size > config.outbox_max_bytes:
            reason = DROP_BYTES
        if reason is not None:
            self.stats.outbox_dropped[reason] += 1
            self._events.append(OutboxDropped(node.uri, message.peer_id, 1, reason))
            log.warning(
                "outbox of %s is full (%s bound): a message of %s was dropped",
                node.uri,
                reason,
                message.peer_id,
            )
            return reason
        if box is None:
            box = self._outboxes[node] = Outbox(owner=node)
        messages = box.messages
        if messages and messages[-1].id > message.id:
            at = len(messages)
            while at > 0 and messages[at - 1].id > message.id:
                at -= 1
            messages.insert(at, message)
        else:
            messages.append(message)
        box.size += message.size
        self.stats.outbox_queued += 1
        if self._age_timer is None:
            self._age_timer = self.timers.call_at(
                message.created_at + config.outbox_max_age, self._expire
            )
        return None

    def _node_answered(self, node: Node, now: float) -> None:
        """The node answered something: resume its outbox."""
        node.last_heard = now
        box = self._outboxes.get(node)
        if box is not None:
            box.paused = False
            self._drain(node, now)

    def _drain(self, node: Node, now: float) -> None:
        """Resend the head of an active node's outbox, up to the window in flight."""
        box = self._outboxes.get(node)
        if box is None or box.paused or self.stopped or node.status is not NodeStatus.ACTIVE:
            return
        window = self.config.outbox_window
        in_flight = box.in_flight
        if len(in_flight) >= window:
            return
        for message in list(box.messages):
            if len(in_flight) >= window:
                break
            if message.id in in_flight:
                continue
            in_flight.add(message.id)
            self.stats.outbox_resent += 1
            self._send_request(
                node,
                message.peer_id,
                message.body,
                message.content_type,
                message.max_forwards,
                now,
                self._resend_result(node, box, message),
                message.extra,
            )

    def _resend_result(
        self, node: Node, box: Outbox, message: OutboxMessage
    ) -> Callable[[FinalResult, float], None]:
        def on_result(result: FinalResult, now: float) -> None:
            box.in_flight.discard(message.id)
            if box.dropped:
                return  # the outbox was dropped (and counted) meanwhile
            if result.local:
                box.paused = True
                return
            box.messages.remove(message)
            box.size -= message.size
            self.stats.outbox_delivered += 1
            # The outbox may have moved to a new Node of the same address meanwhile.
            owner = box.owner or node
            if not box.messages:
                if self._outboxes.get(owner) is box:
                    del self._outboxes[owner]
                return
            self._node_answered(owner, now)

        return on_result

    def _drop_outbox(self, node: Node, reason: str) -> None:
        """Drop everything a node's outbox holds (the node was removed, or we stop)."""
        box = self._outboxes.pop(node, None)
        if box is None:
            return
        box.dropped = True
        if box.messages:
            self._report_drops(node, list(box.messages), reason)

    # ------------------------------------------------------------------ parked outboxes

    def _park(self, node: Node, now: float) -> None:
        """``node`` was just removed after missed pings: keep its outbox (and queue
        broadcasts for it) until it comes back, for at most ``outbox_max_age``."""
        config = self.config
        if self.stopped or config.outbox_max_messages == 0:
            self._drop_outbox(node, DROP_REMOVED)
            return
        previous = self._parked.pop(node.key, None)
        if previous is not None:  # cannot happen: a returning node is unparked first
            previous.expiry.cancel()
            self._drop_outbox(previous.node, DROP_REMOVED)
        while len(self._parked) >= config.max_nodes:
            oldest = next(iter(self._parked))
            evicted = self._parked.pop(oldest)
            evicted.expiry.cancel()
            log.warning(
                "more than max_nodes (%d) nodes parked: %s is let go",
                config.max_nodes,
                evicted.node.uri,
            )
            self._drop_outbox(evicted.node, DROP_PARK_LIMIT)
        box = self._outboxes.get(node)
        if box is not None:
            box.paused = True
        expiry = self.timers.call_at(now + config.outbox_max_age, self._park_expired, node.key)
        self._parked[node.key] = _Parked(node, expiry)
        self.stats.outbox_parked += 1

    def _park_expired(self, now: float, key: NodeKey) -> None:
        park = self._parked.pop(key, None)
        if park is None:
            return
        log.info(
            "%s did not come back within outbox_max_age (%g s): its outbox is dropped",
            park.node.uri,
            self.config.outbox_max_age,
        )
        self._drop_outbox(park.node, DROP_EXPIRED)

    def _unpark(self, node: Node) -> None:
        """``node`` was just added to the list: if its address was parked, its outbox
        becomes the new node's, paused until the node answers us (a third party's word
        that it is back is not enough to start sending)."""
        park = self._parked.pop(node.key, None)
        if park is None:
            return
        park.expiry.cancel()
        self.stats.outbox_unparked += 1
        box = self._outboxes.pop(park.node, None)
        if box is not None and node not in self._outboxes:
            box.owner = node
            box.paused = True
            self._outboxes[node] = box

    def _ping_parked(self, now: float) -> None:
        """Ping every parked node: one that answers is taken back (a partition healed,
        a crashed node restarted, or a false verdict)."""
        if not self._parked:
            return
        channel = self.config.notification_channel
        body = self._list_body()
        for key, park in list(self._parked.items()):
            self._send_request(
                park.node, channel, body, "text/plain", 1, now, self._parked_ping_callback(key)
            )

    def _parked_ping_callback(self, key: NodeKey) -> Callable[[FinalResult, float], None]:
        def on_result(result: FinalResult, now: float) -> None:
            self._on_parked_ping_result(key, result, now)

        return on_result

    def _on_parked_ping_result(self, key: NodeKey, result: FinalResult, now: float) -> None:
        park = self._parked.get(key)
        if park is None or self.stopped or result.code != 200:
            return
        if self.nodes.get(key) is not None:
            return  # back by another way already
        if self._refuse_new_node(None, now) is not None:
            return  # the list is full: it stays parked, and is asked again next time
        node = self.nodes.add(park.node.uri, NodeStatus.ACTIVE)
        if node is None:
            return
        self._tombstones.pop(key, None)
        self._unpark(node)
        node.last_reply = now
        self._emit_status(node, None, NodeStatus.ACTIVE, "answered again after its removal")
        if result.response is not None:
            self._merge(parse_node_list(result.response.body).lines, key, now)
        self._maybe_run_inits()
        self._node_answered(node, now)

    def _report_drops(self, node: Node, messages: list[OutboxMessage], reason: str) -> None:
        by_peer = Counter([message.peer_id for message in messages])
        self.stats.outbox_dropped[reason] += len(messages)
        for peer_id, count in by_peer.items():
            self._events.append(OutboxDropped(node.uri, peer_id, count, reason))
        log.warning("%d messages waiting for %s dropped (%s)", len(messages), node.uri, reason)

    def _expire(self, now: float) -> None:
        """Drop messages older than the age bound (not those being resent right now:
        their answer is on its way)."""
        self._age_timer = None
        max_age = self.config.outbox_max_age
        limit = now - max_age
        oldest: float | None = None
        for node, box in list(self._outboxes.items()):
            expired = [
                m for m in box.messages if m.created_at <= limit and m.id not in box.in_flight
            ]
            if expired:
                gone = {m.id for m in expired}
                box.messages = deque([m for m in box.messages if m.id not in gone])
                box.size -= sum(m.size for m in expired)
                self._report_drops(node, expired, DROP_AGE)
                if not box.messages:
                    del self._outboxes[node]
                    continue
            head = min(m.created_at for m in box.messages)
            oldest = head if oldest is None else min(oldest, head)
        if oldest is not None:
            self._age_timer = self.timers.call_at(max(oldest + max_age, now + 1.0), self._expire)

    def _send_request(
        self,
        node: Node,
        peer_id: str,
        body: bytes,
        content_type: str | None,
        max_forwards: int,
        now: float,
        on_result: Callable[[FinalResult, float], None],
        extra: HeaderLines = (),
        *,
        retransmit: bool = True,
    ) -> None:
        self._requests_made += 1
        count = str(self._requests_made)
        head = self._request_heads.get((node.uri, peer_id))
        if head is None:
            head = self._request_head(node, peer_id)
        extra_lines = "".join([f"{line}\r\n" for line in extra]) if extra else ""
        type_line = f"Content-Type: {content_type}\r\n" if content_type else ""
        cseq_call_id, user_agent = self._request_middle
        data = (
            f"{head[0]}{count}{head[1]}{count}{cseq_call_id}{count}{self._call_id_tail}"
            f"\r\nMax-Forwards: {max_forwards}{user_agent}{extra_lines}{type_line}"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        branch = f"{MAGIC_COOKIE}{self._tag}.{count}"
        key = node.key
        destination = self._endpoints.get(key)
        if destination is None:
            if len(self._endpoints) >= CACHE_SIZE:
                self._endpoints.clear()
            destination = self._endpoints[key] = Endpoint(
                node.transport, node.resolved_ip, node.port
            )
        stats = self.stats.sent

        def counted(result: FinalResult, now: float) -> None:
            stats[(peer_id, result.code)] += 1
            on_result(result, now)

        self.transactions.send_request(
            branch, data, destination, now, counted, retransmit=retransmit
        )

    def _request_head(self, node: Node, peer_id: str) -> tuple[str, str]:
        """The parts of every request to ``node`` for ``peer_id`` around the counts
        of its branch and From tag (kept for the next, CACHE_SIZE of them)."""
        target = str(node.uri.with_user(peer_id))
        transport = node.transport.upper()
        head = (
            f"KDMQ {target} SIP/2.0\r\n"
            f"Via: SIP/2.0/{transport} {self._local_hostport};branch={MAGIC_COOKIE}{self._tag}.",
            f"\r\nTo: <{target}>\r\nFrom: <{self._from_uri(peer_id)}>;tag={self._tag}-",
        )
        if len(self._request_heads) >= CACHE_SIZE:
            self._request_heads.clear()
        self._request_heads[(node.uri, peer_id)] = head
        return head

    def _from_uri(self, peer_id: str) -> str:
        cached = self._from_cache.get(peer_id)
        if cached is None:
            cached = self._from_cache.put(
                peer_id, str(self.config.server_address.with_user(peer_id))
            )
        return cached

    # ------------------------------------------------------------------ replies

    def reply(self, message_id: int, reply: PeerReply, now: float) -> None:
        """Answer a message whose handler returned ``None``.

        Raises :class:`ReplyNotPendingError` when the message no longer waits, with a
        sentence saying what became of it (answered 408 after the peer's reply_timeout,
        404 when its peer was unregistered, 503 when the node stopped, or already
        answered by an earlier reply).
        """
        if message_id not in self._pending:
            outcome = self._finished.get(message_id)
            if outcome is None:
                raise ReplyNotPendingError(f"no message {message_id} is waiting for a reply")
            raise ReplyNotPendingError(f"message {message_id} was already {outcome}")
        self._finish(message_id, reply, now, f"answered {reply.code} {reply.reason} by a reply")

    def reply_many(self, message_ids: Iterable[int], reply: PeerReply, now: float) -> int:
        """Answer several deferred messages alike (a group commit's batch); ids that no
        longer wait are skipped. Returns how many were answered."""
        outcome = f"answered {reply.code} {reply.reason} by a reply"
        pending = self._pending
        answered = 0
        for message_id in message_ids:
            if message_id in pending:
                self._finish(message_id, reply, now, outcome)
                answered += 1
        return answered

    def _finish(self, message_id: int, reply: PeerReply, now: float, outcome: str) -> None:
        """Send the final answer of a deferred message and remember how it ended."""
        pending = self._pending.pop(message_id)
        queue = self._deadlines.get(pending.reply_timeout)
        if queue is not None:
            waiting = self._pending
            while queue and queue[0] not in waiting:
                queue.popleft()
        self._finished.put(message_id, outcome)
        self._respond(
            pending.st,
            pending.request,
            pending.destination,
            reply.code,
            reply.reason,
            now,
            content_type=reply.content_type,
            body=reply.body,
            peer_id=pending.peer_id,
        )

    def _defer(self, message_id: int, pending: _Pending, now: float) -> None:
        """Keep a message whose handler will answer later, with its deadline."""
        self._pending[message_id] = pending
        timeout = pending.reply_timeout
        queue = self._deadlines.get(timeout)
        if queue is None:
            queue = self._deadlines[timeout] = deque()
        queue.append(message_id)
        if timeout not in self._deadline_timers:
            self._deadline_timers[timeout] = self.timers.call_at(
                pending.deadline, self._expire_replies, timeout
            )

    def _expire_replies(self, now: float, timeout: float) -> None:
        """The timer of one deadline queue: answer 408 whatever waits past its
        deadline, then arm for the next deadline still ahead (or forget the queue)."""
        del self._deadline_timers[timeout]
        queue = self._deadlines.get(timeout)
        if queue is None:
            return
        waiting = self._pending
        while queue:
            pending = waiting.get(queue[0])
            if pending is None:
                queue.popleft()
            elif pending.deadline <= now:
                self._reply_timeout(now, queue.popleft())
            else:
                self._deadline_timers[timeout] = self.timers.call_at(
                    pending.deadline, self._expire_replies, timeout
                )
                return
        del self._deadlines[timeout]

    def _reply_timeout(self, now: float, message_id: int) -> None:
        pending = self._pending.get(message_id)
        if pending is None:
            return
        self.stats.reply_timeouts += 1
        self._finish(
            message_id,
            PeerReply(408, "Request Timeout"),
            now,
            "answered 408 Request Timeout: no reply within the peer's reply_timeout "
            f"of {pending.reply_timeout:g} s",
        )
        self._events.append(PeerReplyTimedOut(message_id, pending.peer_id))

    def _respond(
        self,
        st: ServerTransaction | None,
        request: SipRequest,
        destination: Endpoint,
        code: int,
        reason: str,
        now: float,
        *,
        content_type: str | None = None,
        body: bytes = b"",
        peer_id: str | None = None,
        extra: Iterable[str] = (),
    ) -> None:
        lines = tuple(extra)
        data = self._response_bytes(request, code, reason, content_type, body, lines)
        if peer_id is not None:
            self.stats.received[(peer_id, code)] += 1
        if st is not None:
            if body or lines or content_type is not None:
                recipe: Recipe = (code, reason, content_type, body, lines)
            else:
                # The usual answer (a code and reason, nothing else): one recipe object
                # for every transaction Timer J keeps with it.
                recipe = self._recipes.get((code, reason)) or self._recipe(code, reason)
            self.transactions.respond(st, data, destination, now, recipe)
        else:
            self._transmit(data, destination)

    def _recipe(self, code: int, reason: str) -> Recipe:
        recipes = self._recipes
        if len(recipes) >= _MAX_RECIPES:
            recipes.clear()  # reasons come from handlers: keep a handful
        recipe: Recipe = (code, reason, None, b"", ())
        recipes[(code, reason)] = recipe
        return recipe

    def _rebuild(self, request: SipRequest, recipe: Recipe) -> bytes:
        """The final response of ``recipe`` again, for a retransmission of the request
        it answered (the transaction layer's :data:`~app.dmq.transaction.Rebuild`)."""
        code: int = recipe[0]
        reason: str = recipe[1]
        content_type: str | None = recipe[2]
        body: bytes = recipe[3]
        extra: tuple[str, ...] = recipe[4]
        return self._response_bytes(request, code, reason, content_type, body, extra)

    def _response_bytes(
        self,
        request: SipRequest,
        code: int,
        reason: str,
        content_type: str | None,
        body: bytes,
        extra: tuple[str, ...],
    ) -> bytes:
        """The final response to ``request``: built once for the answer, and again,
        byte for byte, for each retransmission of the request while Timer J keeps its
        recipe (a retransmission's headers are the original's)."""
        headers = request.headers
        first = headers.first
        to = first.get("to") or ""
        if ";tag=" not in to and (";" not in to or ";tag=" not in to.replace(" ", "").lower()):
            to = f"{to};tag={self._tag}"
        vias = headers.vias
        # One format for the usual answer (one Via, nothing extra): building it in
        # one piece costs a fraction of joining a list of lines.
        if len(vias) == 1:
            head = (
                f"SIP/2.0 {code} {reason}\r\nVia: {vias[0]}\r\n"
                f"From: {first.get('from') or ''}\r\nTo: {to}\r\n"
                f"Call-ID: {first.get('call-id') or ''}\r\nCSeq: {first.get('cseq') or ''}\r\n"
                f"Server: {self.config.user_agent}\r\n{self._supported_head}"
            )
        else:
            lines = [f"SIP/2.0 {code} {reason}"]
            lines.extend([f"Via: {value}" for value in vias])
            lines.append(f"From: {first.get('from') or ''}")
            lines.append(f"To: {to}")
            lines.append(f"Call-ID: {first.get('call-id') or ''}")
            lines.append(f"CSeq: {first.get('cseq') or ''}")
            lines.append(f"Server: {self.config.user_agent}")
            lines.extend(self._supported_lines)
            head = "\r\n".join(lines) + "\r\n"
        for line in extra:
            head += line + "\r\n"
        if body and content_type:
            head += f"Content-Type: {content_type}\r\n"
        data = f"{head}Content-Length: {len(body)}\r\n\r\n".encode()
        if body:
            data += body
        return data

    @staticmethod
    def _response_destination(source: Endpoint, top_via: Via) -> Endpoint:
        """Where a response goes (RFC 3261 section 18.2.2 and RFC 3581).

        On a stream, back over the connection the request came on. Over UDP, to the
        address the request came from (the ``received`` address) and to the Via port,
        or to the source port when the sender asked for ``rport``.
        """
        if source.transport != "udp":  # reliable (the property costs a lookup)
            return source
        port = top_via.port or 5060
        if via_param(top_via, "rport") is not None:
            return source
        if port == source.port and source.connection is None:
            # The same Endpoint a new one would be, without building it per request.
            return source
        return Endpoint("udp", source.host, port)

    # ------------------------------------------------------------------ input

    def _transmit(self, data: bytes, destination: Endpoint) -> None:
        self._outbox.append((data, destination))

    def handle_timer(self, now: float) -> None:
        self.timers.run_due(now)

    def transport_error(self, destination: Endpoint, now: float) -> None:
        """The driver could not deliver to ``destination`` (e.g. TCP connect refused)."""
        self.transactions.transport_error(destination, now)

    def receive(self, data: bytes, source: Endpoint, now: float) -> None:
        """Handle one whole SIP message. Never raises for anything the sender did."""
        try:
            message = parse_message(data, max_size=max(self._max_message, MAX_UDP_MESSAGE))
        except SipParseError as exc:
            self._reject_malformed(exc, source, now)
            return
        if isinstance(message, SipRequest):
            self._on_request(message, source, now)
        else:
            self._on_response(message, now)

    def _reject_malformed(self, exc: SipParseError, source: Endpoint, now: float) -> None:
        request = exc.request
        if request is not None and request.method != "ACK" and self._answerable(request):
            top_via = Via.parse(request.headers.vias[0])
            self.stats.malformed_answered += 1
            log.info(
                "malformed request from %s:%s answered %s: %s",
                source.host,
                source.port,
                exc.status,
                exc.reason,
            )
            reason = REASONS.get(exc.status, "Bad Request")
            self._respond(
                None,
                request,
                self._response_destination(source, top_via),
                exc.status,
                reason,
                now,
                extra=(f'Warning: 399 dmq-gateway "{_quote(exc.reason)}"',),
            )
            return
        self.stats.malformed_dropped += 1
        log.info("malformed message from %s:%s dropped: %s", source.host, source.port, exc.reason)

    @staticmethod
    def _answerable(request: SipRequest) -> bool:
        """A response can be built only with a parseable top Via and the dialog
        headers to copy."""
        headers = request.headers
        vias = headers.vias
        if not vias:
            return False
        try:
            Via.parse(vias[0])
        except ValueError:
            return False
        return all(headers.get(name) for name in ("from", "to", "call-id", "cseq"))

    def _trusted(self, host: str) -> bool:
        cached = self._trust_cache.get(host)
        if cached is None:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                cached = False
            else:
                if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                    address = address.ipv4_mapped
                cached = any(address in network for network in self.config.trusted)
            self._trust_cache.put(host, cached)
        return cached

    def _on_request(self, request: SipRequest, source: Endpoint, now: float) -> None:
        headers = request.headers
        first = headers.first
        vias = headers.vias
        try:
            top_via = Via.parse(vias[0]) if vias else None
        except ValueError:
            top_via = None
        cseq = first.get("cseq")
        if (
            top_via is None
            or not first.get("from")
            or not first.get("to")
            or not first.get("call-id")
            or not cseq
        ):
            if request.method != "ACK" and top_via is not None:
                self._reject_malformed(
                    SipParseError("missing From, To, Call-ID or CSeq", request=request),
                    source,
                    now,
                )
            else:
                self.stats.malformed_dropped += 1
                log.info(
                    "request without a usable Via from %s:%s dropped", source.host, source.port
                )
            return
        destination = self._response_destination(source, top_via)
        try:
            _, cseq_method = parse_cseq(cseq)
        except ValueError as exc:
            self._bad_request(request, destination, str(exc), now)
            return
        if cseq_method != request.method:
            self._bad_request(request, destination, "CSeq method differs from the request", now)
            return
        if request.method == "ACK":
            return
        if not self._trusted(source.host):
            self.stats.forbidden += 1
            self._log_untrusted(source, now)
            self._respond(None, request, destination, 403, "Forbidden", now)
            return
        st = self.transactions.receive_request(request, top_via, source)
        if st is None:
            return  # a retransmission, already absorbed or answered from the cache
        if request.method != "KDMQ":
            if request.method == "OPTIONS":
                self._respond(st, request, destination, 200, "OK", now)
            else:
                self._respond(
                    st,
                    request,
                    destination,
                    405,
                    "Method Not Allowed",
                    now,
                    extra=("Allow: KDMQ, OPTIONS",),
                )
            return
        self._on_kdmq(st, request, destination, now)

    def _bad_request(
        self, request: SipRequest, destination: Endpoint, reason: str, now: float
    ) -> None:
        self.stats.malformed_answered += 1
        self._respond(
            None,
            request,
            destination,
            400,
            "Bad Request",
            now,
            extra=(f'Warning: 399 dmq-gateway "{_quote(reason)}"',),
        )

    def _on_kdmq(
        self, st: ServerTransaction, request: SipRequest, destination: Endpoint, now: float
    ) -> None:
        first = request.headers.first
        try:
            peer_id = self._peer_id_of(request.uri)
            sender = self._sender_of(first.get("from") or "")
        except ValueError as exc:
            self._respond_error(st, request, destination, 400, str(exc), now)
            return
        max_forwards_text = first.get("max-forwards")
        if max_forwards_text is None:
            max_forwards = 70
        elif (
            max_forwards_text.isascii()  # "²".isdigit() is true, but int() refuses it
            and max_forwards_text.isdigit()
            and len(max_forwards_text) < 4
        ):
            max_forwards = int(max_forwards_text)
        else:
            self._respond_error(st, request, destination, 400, "bad Max-Forwards", now)
            return
        held = self.nodes.find(sender)
        agent = first.get("user-agent")
        supported = first.get("supported")
        if held is not None:
            held.last_heard = now  # a sign of life, whatever the request is
            if agent:
                held.agent = agent[:128]
            held.note_supported(supported)
        if peer_id is None:
            self._respond_error(
                st, request, destination, 404, "the Request-URI names no peer id", now
            )
            return
        if peer_id == self.config.notification_channel:
            self._on_notification(st, request, destination, sender, max_forwards, now)
            if held is None and (agent or supported):  # a joining node is listed only now
                joined = self.nodes.find(sender)
                if joined is not None:
                    if agent:
                        joined.agent = agent[:128]
                    joined.note_supported(supported)
            return
        peer = self.peers.get(peer_id)
        if peer is None:
            self._respond(
                st, request, destination, 404, "User Not Found", now, peer_id=UNKNOWN_PEER
            )
            return
        self._ids += 1
        # tuple.__new__ with the fields in PeerMessage's order (id, peer_id, body,
        # content_type, sender, call_id, received_at, max_forwards, origin): the
        # NamedTuple's own __new__ is a Python function taking keywords, which cost
        # more than all the rest of the delivery (tests/dmq check every field).
        message: PeerMessage = tuple.__new__(
            PeerMessage,
            (
                self._ids,
                peer_id,
                request.body,
                first.get("content-type"),
                sender,
                first.get("call-id") or "",
                now,
                max_forwards,
                first.get(_ORIGIN),
            ),
        )
        try:
            reply = peer.handler(message)
        except Exception:
            log.exception("handler of peer %s failed", peer_id)
            reply = PeerReply(500, "Server Internal Error")
        if reply is None:
            timeout = peer.reply_timeout
            if timeout is None:
                timeout = self.config.timers.timer_f_value
            self._defer(
                message.id,
                _Pending(st, request, peer_id, destination, now + timeout, timeout),
                now,
            )
            return
        self._respond(
            st,
            request,
            destination,
            reply.code,
            reply.reason,
            now,
            content_type=reply.content_type,
            body=reply.body,
            peer_id=peer_id,
        )

    def _peer_id_of(self, request_uri: str) -> str | None:
        """The user part of a Request-URI (the peer id); cached, since a bus uses a
        handful of Request-URIs over and over."""
        user = self._uri_cache.get(request_uri, _MISSING)
        if user is _MISSING:
            return self._uri_cache.put(request_uri, SipUri.parse(request_uri).user)
        return user  # type: ignore[return-value]

    def _sender_of(self, from_value: str) -> SipUri:
        """The sending node from a From header: its URI without user or tag (the tag
        changes with every request, so the cache is keyed on what precedes it)."""
        close = from_value.find(">")
        key = from_value[: close + 1] if close >= 0 else from_value.partition(";")[0]
        sender = self._sender_cache.get(key)
        if sender is None:
            sender = self._sender_cache.put(key, node_uri(NameAddr.parse(from_value).uri))
        return sender

    def _respond_error(
        self,
        st: ServerTransaction,
        request: SipRequest,
        destination: Endpoint,
        code: int,
        reason: str,
        now: float,
    ) -> None:
        self.stats.malformed_answered += 1
        self._respond(
            st,
            request,
            destination,
            code,
            REASONS.get(code, "Bad Request"),
            now,
            extra=(f'Warning: 399 dmq-gateway "{_quote(reason)}"',),
        )

    def _on_response(self, response: SipResponse, now: float) -> None:
        vias = response.headers.vias
        try:
            top_via = Via.parse(vias[0]) if vias else None
        except ValueError:
            top_via = None
        if top_via is None:
            self.stats.malformed_dropped += 1
            return
        self.transactions.receive_response(response, top_via, now)

    # ------------------------------------------------------------------ membership

    def _on_notification(
        self,
        st: ServerTransaction,
        request: SipRequest,
        destination: Endpoint,
        sender: SipUri,
        max_forwards: int,
        now: float,
    ) -> None:
        """A node sent us its list (join, propagation, ping or leave)."""
        if self.stopped:
            # We have left: a 200 would carry our list, which names us active, and the
            # pinger would take us back. Kamailio ignores codes other than 200 and 408.
            self._respond(
                st,
                request,
                destination,
                503,
                "Service Unavailable",
                now,
                peer_id=self.config.notification_channel,
            )
            return
        parsed = parse_node_list(request.body)
        for error in parsed.errors:
            log.warning("node list from %s: bad line skipped: %s", sender, error)
        sender_key = self.nodes.key_of(sender)
        changed = self._merge(parsed.lines, sender_key, now)
        channel = self.config.notification_channel
        self._respond(
            st,
            request,
            destination,
            200,
            "OK",
            now,
            content_type="text/plain",
            body=self._list_body(),
            peer_id=channel,
        )
        forward = max_forwards - 1
        if changed and forward > 0 and not self.stopped:
            self._notify(self.nodes.active_others(), self._list_body(), forward, now)
        if self.nodes.active_others():
            self._maybe_run_inits()

    def _list_body(self) -> bytes:
        body = self.nodes.body()
        if len(body) > KAMAILIO_BODY_LIMIT:
            log.warning(
                "our node list is %d bytes; Kamailio reads at most %d and will drop the rest",
                len(body),
                KAMAILIO_BODY_LIMIT,
            )
        return body

    def _merge(self, lines: Iterable[NodeLine], speaker: NodeKey | None, now: float) -> int:
        """Merge a node-list body; return how many nodes changed.

        ``speaker`` is the node that sent the list: what it says about itself always
        counts. What it says about others (third parties) may add an unknown node or
        promote a pending one, but cannot revive a node that we disabled or removed
        after it missed our pings: that node has to answer us itself. This is what
        keeps removed nodes from coming back as ghosts (Kamailio PR #1840).
        """
        changed = 0
        added = 0
        expired = [key for key, until in self._tombstones.items() if until <= now]
        for key in expired:
            del self._tombstones[key]
        for line in lines:
            # Not asking for names yet: a node refused below costs no look-up.
            key = self.nodes.key_of(line.uri, ask=False)
            if key == self.nodes.local.key:
                continue  # never add or change ourselves
            first_hand = key == speaker
            node = self.nodes.get(key)
            if node is None:
                if line.status is NodeStatus.DISABLED:
                    continue  # a leave notice for a node we don't hold
                if not first_hand and key in self._tombstones:
                    continue
                # A node speaking for itself is held to max_nodes only; what it says
                # of others, to the per-list and per-second bounds too.
                refused = self._refuse_new_node(None if first_hand else added, now)
                if refused is not None:
                    self._count_refusal(refused, line.uri, speaker, now)
                    continue
                added += 0 if first_hand else 1
                self._tombstones.pop(key, None)
                node = self.nodes.add(line.uri, line.status)
                if node is not None:
                    self._unpark(node)
                    if first_hand:
                        node.last_reply = now
                    self._emit_status(node, None, node.status, "listed by " + _key_text(speaker))
                    changed += 1
                    if first_hand and node.status is NodeStatus.ACTIVE:
                        self._node_answered(node, now)  # resend what waited for it
                continue
            if node.status is line.status:
                if first_hand:
                    node.last_reply = now
                continue
            if (
                not first_hand
                and node.status is NodeStatus.DISABLED
                and line.status is NodeStatus.ACTIVE
            ):
                continue  # our own observation outranks hearsay
            old = node.status
            node.status = line.status
            if first_hand:
                node.last_reply = now
                if line.status is NodeStatus.ACTIVE:
                    node.failures = 0
            reason = (
                "left the bus"
                if first_hand and line.status is NodeStatus.DISABLED
                else ("listed by " + _key_text(speaker))
            )
            self._emit_status(node, old, node.status, reason)
            changed += 1
            if node.status is NodeStatus.ACTIVE:
                if first_hand:
                    self._node_answered(node, now)
                else:
                    self._drain(node, now)
        return changed

    def _refuse_new_node(self, added_from_list: int | None, now: float) -> str | None:
        """The bound that refuses one more new node now, or None (a token is taken);
        ``added_from_list`` is None for a node that speaks for itself."""
        config = self.config
        if len(self.nodes) - 1 >= config.max_nodes:
            return "max_nodes"
        if added_from_list is None:
            return None
        if added_from_list >= config.max_new_nodes_per_list:
            return "max_new_nodes_per_list"
        burst = float(config.max_new_nodes_per_list)
        if self._new_node_tokens_at is not None:
            elapsed = max(0.0, now - self._new_node_tokens_at)
            self._new_node_tokens = min(
                burst, self._new_node_tokens + elapsed * config.max_new_nodes_per_second
            )
        self._new_node_tokens_at = now
        if self._new_node_tokens < 1:
            return "max_new_nodes_per_second"
        self._new_node_tokens -= 1
        return None

    def _log_untrusted(self, source: Endpoint, now: float) -> None:
        """A WARNING for a refused untrusted request, at most one per source host per
        ``untrusted_log_interval``: a flood of refusals must not flood the log (each is
        counted in ``stats.forbidden`` all the same)."""
        last = self._untrusted_logged.get(source.host)
        if last is not None and now - last[0] < self.untrusted_log_interval:
            self._untrusted_logged[source.host] = (last[0], last[1] + 1)
            return
        self._untrusted_logged.put(source.host, (now, 0))
        if last is not None and last[1]:
            log.warning(
                "KDMQ from untrusted %s:%s refused (%d more from this source left out of the log)",
                source.host,
                source.port,
                last[1],
            )
        else:
            log.warning("KDMQ from untrusted %s:%s refused", source.host, source.port)

    def _count_refusal(self, bound: str, uri: SipUri, speaker: NodeKey | None, now: float) -> None:
        self.stats.nodes_refused[bound] += 1
        self._refusals_unlogged += 1
        last = self._refusal_logged_at
        if last is None or now - last >= REFUSAL_LOG_INTERVAL:
            log.warning(
                "%d nodes named in node lists refused (latest %s from %s, bound %s=%s); "
                "logged at most once every %g s",
                self._refusals_unlogged,
                uri,
                _key_text(speaker),
                bound,
                getattr(self.config, bound),
                REFUSAL_LOG_INTERVAL,
            )
            self._refusals_unlogged = 0
            self._refusal_logged_at = now

    def _notify(
        self,
        targets: Iterable[Node],
        body: bytes,
        max_forwards: int,
        now: float,
        *,
        probe: bool = False,
    ) -> None:
        """Send our list to ``targets``; with ``probe`` (pings), a target that has not
        answered halfway through Timer F is sent a second ping (:meth:`_probe`)."""
        channel = self.config.notification_channel
        probe = probe and self.config.probe_before_disabling
        halfway = now + self.config.timers.timer_f_value / 2
        for node in targets:
            key = node.key
            self._send_request(
                node,
                channel,
                body,
                "text/plain",
                max_forwards,
                now,
                self._notification_callback(key, now),
            )
            if probe:
                self.timers.call_at(halfway, self._probe, key, now)

    def _notification_callback(
        self, key: NodeKey, sent_at: float
    ) -> Callable[[FinalResult, float], None]:
        def on_result(result: FinalResult, now: float) -> None:
            self._on_notification_result(key, result, now, sent_at)

        return on_result

    def _probe(self, now: float, key: NodeKey, sent_at: float) -> None:
        """Halfway through a ping's Timer F with no sign of life from the node: ping it
        again, as a new transaction. Under datagram loss a second, independent try
        often gets through where the first one's retransmissions did not; its answer
        counts as the node's (a 200 is handled as a ping's), its failure counts for
        nothing, since the first ping's own Timer F gives the verdict, at the same
        instant as without the probe."""
        node = self.nodes.get(key)
        if node is None or self.stopped or _heard_since(node, sent_at):
            return
        self.stats.probes_sent += 1
        channel = self.config.notification_channel

        def on_result(result: FinalResult, now: float) -> None:
            if not result.local:
                self._on_notification_result(key, result, now, sent_at)

        self._send_request(node, channel, self._list_body(), "text/plain", 1, now, on_result)

    def _on_notification_result(
        self, key: NodeKey, result: FinalResult, now: float, sent_at: float | None = None
    ) -> None:
        """A node answered (or failed to answer) our join, ping, propagation or leave."""
        node = self.nodes.get(key)
        if node is None or node.local:
            return
        if not result.local:
            node.last_heard = now
        if result.code == 200:
            node.last_reply = now
            node.failures = 0
            if result.response is not None:
                agent = result.response.headers.get("server")
                if agent:
                    node.agent = agent[:128]
                node.note_supported(result.response.headers.get("supported"))
            if node.status is not NodeStatus.ACTIVE and not self.stopped:
                old: NodeStatus = node.status
                node.status = NodeStatus.ACTIVE
                self._emit_status(node, old, NodeStatus.ACTIVE, "answered")
            if result.response is not None and not self.stopped:
                parsed = parse_node_list(result.response.body)
                self._merge(parsed.lines, key, now)
            self._maybe_run_inits()
            self._node_answered(node, now)
        elif result.local:
            if (
                self.config.probe_before_disabling
                and sent_at is not None
                and _heard_since(node, sent_at)
            ):
                # It answered something else, or sent us a request, since this
                # request left: the loss was of this exchange, not of the node.
                self.stats.verdicts_spared += 1
                return
            node.failures += 1
            if self.stopped:
                return
            if node.status is NodeStatus.DISABLED:
                self.nodes.remove(node)
                self._tombstones[key] = now + 3 * self.config.ping_interval
                self._emit_status(node, NodeStatus.DISABLED, None, "missed a second ping")
                self._park(node, now)
            else:
                previous: NodeStatus = node.status
                node.status = NodeStatus.DISABLED
                self._emit_status(node, previous, NodeStatus.DISABLED, "did not answer")
        else:
            node.last_reply = now  # other codes are answers, but change nothing
            self._node_answered(node, now)

    def _join(self, now: float) -> None:
        """Send ourselves, Max-Forwards 2, to every node we know (at first: the
        notification addresses); they answer with their lists and pass us on."""
        targets = self.nodes.others()
        if targets:
            self._notify(targets, self.nodes.join_body(), 2, now)

    def _ping(self, now: float) -> None:
        if self.stopped:
            return
        self._ping_timer = self.timers.call_at(now + self.config.ping_interval, self._ping)
        if not self.nodes.others():
            # Alone: go back to the notification addresses (they may have been
            # removed after missing pings while they were down).
            for address in self.config.notification_addresses:
                self.add_notification_address(address)
            self._join(now)
            self._ping_parked(now)
            return
        self._notify(self.nodes.others(), self._list_body(), 1, now, probe=True)
        self._ping_parked(now)

    # ------------------------------------------------------------------ names

    def _resolve(self, host: str) -> str | None:
        known = self._addresses.get(host.lower()) if self._addresses else None
        if known is not None:
            return known
        if self._resolver is literal_resolver:
            # A pure function of the text, and it parses an IP address each time
            # (microseconds, on every request's From): remember its answers.
            address = self._literals.get(host)
            if address is None:
                address = self._literals.put(host, literal_resolver(host))
            return address
        return self._resolver(host)

    def _lookup_needed(self, name: str) -> None:
        if name not in self._lookups:
            self._lookups.add(name)
            self._events.append(HostLookupNeeded(name))

    def host_resolved(self, host: str, address: str | None, now: float) -> None:
        """The driver looked ``host`` up: ``address``, or ``None`` if it failed.

        Nodes held by that name are identified by the address from now on; one that
        turns out to be a node already held (or ourselves) is dropped as a duplicate.
        On failure the name goes on standing for its nodes, and the node asks again
        the next time its resolver does not know the name.
        """
        name = host.lower()
        self._lookups.discard(name)
        if address is None:
            return
        self._addresses.put(name, address)
        for dropped, kept in self.nodes.rekey(name):
            self._emit_status(dropped, dropped.status, None, f"the same node as {kept.uri}")
            self._drop_outbox(dropped, DROP_REMOVED)
        for key in [key for key in self._tombstones if key[0] == name]:
            until = self._tombstones.pop(key)
            if until > now:
                self._tombstones[(address, key[1], key[2])] = until

    # ------------------------------------------------------------------ operator

    def add_node(self, uri: SipUri, now: float) -> Node:
        """Add a node by hand and notify it (Kamailio master's ``dmq.add``)."""
        if self.nodes.is_local(uri):
            raise ValueError(f"{uri} is this node itself")
        if self.nodes.find(uri) is None and len(self.nodes) - 1 >= self.config.max_nodes:
            raise NodeListFullError(
                f"{uri} cannot be added: the node list holds max_nodes "
                f"({self.config.max_nodes}) nodes already"
            )
        self._tombstones.pop(self.nodes.key_of(uri), None)
        node = self.nodes.add(uri, NodeStatus.NOT_ACTIVE)
        if node is None:
            existing = self.nodes.find(uri)
            assert existing is not None
            return existing
        self._unpark(node)
        self._emit_status(node, None, node.status, "added by operator")
        if not self.stopped:
            self._notify([node], self._list_body(), 2, now)
        return node

    def remove_node(self, uri: SipUri, now: float) -> Node:
        """Remove a node by hand (Kamailio's ``dmq.remove``); a third party's list won't
        bring it back for three ping intervals. What waits for it is dropped (reason
        ``removed``), also when it was already out of the list with its outbox
        parked: an operator's removal is for good."""
        node = self.nodes.find(uri)
        if node is None or node.local:
            park = self._parked.pop(self.nodes.key_of(uri), None)
            if park is None:
                raise UnknownNodeError(f"{uri} is not a node of this bus (see the node list)")
            park.expiry.cancel()
            self._tombstones[park.node.key] = now + 3 * self.config.ping_interval
            self._drop_outbox(park.node, DROP_REMOVED)
            log.info("node %s: parked outbox removed by operator", park.node.uri)
            return park.node
        self.nodes.remove(node)
        self._tombstones[node.key] = now + 3 * self.config.ping_interval
        self._emit_status(node, node.status, None, "removed by operator")
        self._drop_outbox(node, DROP_REMOVED)
        return node

    def _emit_status(
        self, node: Node, old: NodeStatus | None, new: NodeStatus | None, reason: str
    ) -> None:
        log.info(
            "node %s: %s -> %s (%s)",
            node.uri,
            old.value if old else "new",
            new.value if new else "removed",
            reason,
        )
        self._events.append(NodeStatusChanged(node.uri, old, new, reason))


def _heard_since(node: Node, instant: float) -> bool:
    """The node answered us or sent us a request at or after ``instant``."""
    return node.last_heard is not None and node.last_heard >= instant


def _key_text(key: NodeKey | None) -> str:
    if key is None:
        return "?"
    return f"{key[0]}:{key[1]}/{key[2]}"


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')[:200]
