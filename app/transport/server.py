"""The asyncio driver: real UDP and TCP sockets around the sans-IO :class:`DmqNode`.

The driver owns everything the core must not touch: sockets, the loop's clock, one
loop timer and DNS. Peer handlers are the core's own synchronous handlers: one that
answers later returns ``None`` and calls :meth:`DmqServer.reply` when it can, and the
core alone times it out (the peer's ``reply_timeout``). After every input
it *flushes*: sends what the core queued, hands out its events, and re-arms the single
timer at :meth:`DmqNode.get_timer` (the aioquic adapter shape). It runs on the default
loop and on uvloop.

A datagram received only marks a flush as due: the loop hands over the datagrams one
readiness event brought (up to 32 under uvloop) one call each, and a flush per datagram
meant a ``sendto`` system call, an event drain and a timer re-arm each. One flush at
the end of the turn (``loop.call_soon``) sends all their answers together, through
``sendmmsg(2)`` (:func:`app.dmq._sipscan.sendmmsg`) in as few system calls as the
batch needs; nothing waits past the current turn. Whatever that call does not send (a
full send buffer, an unreachable network, an address it does not read) goes through
the transport's ``sendto``, which queues it or reports why, and while the transport has
anything queued every datagram goes through it, so datagrams to one destination leave
in the order the core queued them. Every other input (API calls, timers, TCP) flushes
at once, as before.

UDP: one socket bound to the server address; requests and responses go out from it,
so the source port other nodes see is the port we announce (Kamailio replies to the
Via, which names it). TCP: a listening socket on the same port; outgoing requests use
one connection per remote node, opened on demand and reused; a response goes back over
the connection its request came on (RFC 3261 section 18.2.2). Each connection cuts its
stream with :class:`~app.dmq.sip.StreamFramer`.

DNS never runs on the loop's thread or holds up a message. Names in the configuration
are resolved before the node starts. A name first met later (in another node's list)
is unknown to the core's resolver (:class:`_HostCache`, memory only), so the core
holds that node by name and emits HostLookupNeeded; the driver resolves the name in a
task (dnspython's async resolver, or ``loop.getaddrinfo``), bounded by ``dns_timeout``,
remembers a failure for ``dns_negative_ttl``, and reports back through
``DmqNode.host_resolved``. Until then, datagrams for that node are not sent (a socket
given a name would resolve it synchronously); Timer E sends them again.

TLS (``;transport=tls``): the stream socket of a TLS server address speaks TLS only
(as Kamailio's ``tls:`` listener does; UDP stays on the same port). An accepted
connection is counted against the TCP caps *before* its handshake, which
``handshake_timeout`` bounds, so a client that connects and never says hello holds a
slot for that long at most. Outbound connections to ``;transport=tls`` nodes are TLS,
one per node, reused, as for TCP. With ``verify_peer`` a peer's certificate from the
CA is its trust: the core is told to trust every source, and the driver applies the
``trusted`` networks itself to what is not TLS (plain TCP closed on accept, UDP
dropped), so a plain peer outside them never reaches a peer handler either.

``drop_rate`` drops that fraction of UDP datagrams, in and out, at the seam between
socket and core: fault injection for tests of retransmission, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

from app.dmq import _sipscan
from app.dmq.cache import BoundedCache
from app.dmq.config import NodeConfig
from app.dmq.errors import ConfigError, NodeStoppedError
from app.dmq.events import Event, HostLookupNeeded, SendCompleted, SendOperation
from app.dmq.node import DmqNode, ExtraHeaders
from app.dmq.nodes import Node
from app.dmq.peers import Peer, PeerHandler, PeerInit, PeerReply
from app.dmq.sip import SipParseError, SipUri, StreamFramer
from app.dmq.transaction import Endpoint
from app.transport import dns, tls
from app.transport.limits import UNTRUSTED_MAX_MESSAGE, RateLimitedLog, TransportLimits

log = logging.getLogger("dmq.transport")

#: Messages of one TCP connection handled in one turn of the loop.
MESSAGES_PER_TURN = 64

#: Host names (and destination hosts) whose address or failure is remembered.
NAME_CACHE_SIZE = 4096

#: Seconds an outbound connect waits before a sign of life from its host starts it
#: over: the kernel resends an unanswered SYN after 1 s, then 2, 4, 8... s later.
CONNECT_REVIVE_AFTER = 1.0

_T = TypeVar("_T")

#: Called with every event of the core but :class:`SendCompleted` (which completes
#: the future of its broadcast or send): node status changes, peer reply timeouts.
EventListener = Callable[[Event], None]


#: A datagram to send over UDP: its bytes and the (address, port) it goes to.
Datagram = tuple[bytes, tuple[str, int]]


def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


@dataclass(slots=True)
class TransportStats:
    """The driver's own counters, next to the core's (``node.stats``) and the
    transactions' (``node.transactions.stats``), for metrics and tests. Every refusal of
    a bound (:class:`~app.transport.limits.TransportLimits`) has its counter."""

    #: UDP datagrams dropped on purpose (``drop_rate``), in and out.
    dropped_datagrams: int = 0
    #: TCP connections closed because their stream could not be framed as SIP (no
    #: Content-Length, a header section or message over its cap...).
    stream_errors: int = 0
    #: Inbound TCP connections closed on accept: the total cap was reached.
    tcp_refused_total: int = 0
    #: Inbound TCP connections closed on accept: their source's cap was reached.
    tcp_refused_per_source: int = 0
    #: TCP connections closed after ``idle_timeout`` without a byte received.
    tcp_idle_closed: int = 0
    #: TCP connections closed because a message took over ``message_timeout`` to arrive.
    tcp_message_timeouts: int = 0
    #: Inbound TCP connections from untrusted sources closed after their refusal.
    tcp_untrusted_closed: int = 0
    #: Times a TCP connection stopped being read because its peer did not read our
    #: replies (its write buffer went over ``write_high_water``).
    tcp_read_paused: int = 0
    #: TCP connections closed because far more was queued for them than they read.
    tcp_write_overflows: int = 0
    #: Outbound TCP connections torn down because a request on them went unanswered
    #: for Timer F (the next request opens a new one).
    tcp_outbound_reset: int = 0
    #: Requests passed from an outbound connect that timed out to a new connect,
    #: because their own Timer F still had time left (a partition that healed while
    #: the first connect's SYNs were unanswered).
    tcp_connect_requests_carried: int = 0
    #: Outbound TCP connects started over because the host they wait for sent us
    #: something while their SYN went unanswered (see ``DmqServer._revive_connects``).
    tcp_connects_revived: int = 0
    #: TCP connections closed because the incomplete messages of all connections
    #: together went over ``max_buffered``.
    tcp_buffer_overflows: int = 0
    #: Host name look-ups not started because ``max_dns_lookups`` were in flight.
    dns_lookups_refused: int = 0
    #: Log lines left out by the per-source rate limit.
    log_lines_suppressed: int = 0
    #: Inbound TCP connections open now.
    tcp_connections: int = 0
    #: Inbound TLS handshakes that failed or took over ``handshake_timeout``: plain
    #: text on a TLS port, no certificate or one from another CA, an expired one...
    #: (the sum of the ``tls_in_*`` reasons below).
    tls_handshakes_failed: int = 0
    #: Outbound TLS handshakes that failed (the node's certificate was refused...):
    #: the sum of the ``tls_out_*`` reasons below.
    tls_connects_failed: int = 0
    #: Verified TLS peers closed because no name of theirs is on the allow-list.
    tls_names_refused: int = 0
    #: Inbound TLS handshakes that completed (before the allow-list is applied).
    tls_handshakes_completed: int = 0
    #: Outbound TLS handshakes that completed.
    tls_connects_completed: int = 0
    #: TLS connections open now (inbound ones past the allow-list, and outbound).
    tls_connections: int = 0
    #: Failed inbound handshakes, by reason (see ``TLS_FAILURE_REASONS``).
    tls_in_timeout: int = 0
    tls_in_not_tls: int = 0
    tls_in_no_certificate: int = 0
    tls_in_untrusted_certificate: int = 0
    tls_in_expired_certificate: int = 0
    tls_in_protocol_version: int = 0
    tls_in_other: int = 0
    #: Failed outbound handshakes, by reason.
    tls_out_timeout: int = 0
    tls_out_not_tls: int = 0
    tls_out_untrusted_certificate: int = 0
    tls_out_expired_certificate: int = 0
    tls_out_hostname_mismatch: int = 0
    tls_out_protocol_version: int = 0
    tls_out_other: int = 0
    #: With ``verify_peer``: UDP datagrams from outside the trusted networks dropped.
    udp_untrusted_dropped: int = 0


class _HostCache:
    """Host name -> address, the resolver the core reads; never waits, never blocks.

    It answers from memory only: the address once a look-up succeeded; the name itself
    while a failed look-up is remembered (the negative cache, so that a name that does
    not resolve, met in every ping's node list, is not asked about again and again);
    ``None`` otherwise, upon which the core emits HostLookupNeeded and the driver
    resolves the name in a task.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        # Bounded: the names come from other nodes' lists.
        self.addresses: BoundedCache[str, str] = BoundedCache(NAME_CACHE_SIZE)
        #: name -> loop time until which its failure is remembered.
        self.failed: BoundedCache[str, float] = BoundedCache(NAME_CACHE_SIZE)
        #: host text -> its normalised address, or "" for a name: the core asks for the
        #: sender of every request, and parsing an IP address costs microseconds.
        self.literals: BoundedCache[str, str] = BoundedCache(NAME_CACHE_SIZE)

    def __call__(self, host: str) -> str | None:
        literal = self.literals.get(host)
        if literal is None:
            literal = self.literals.put(host, _ip_literal(host) or "")
        if literal:
            return literal
        name = host.lower()
        address = self.addresses.get(name)
        if address is not None:
            return address
        until = self.failed.get(name)
        if until is not None:
            if until > self._clock():
                return name
            del self.failed[name]
        return None


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DmqServer) -> None:
        self.server = server
        # The loop calls the server's method directly: one Python call less for
        # every datagram (the method below is what the class says it does).
        self.datagram_received = server._datagram_received  # type: ignore[method-assign]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.server._datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the transaction's timers deal with it.
        log.debug("UDP error: %s", exc)


class _StreamProtocol(asyncio.Protocol):
    """One TCP connection, inbound or outbound.

    Bounded (see :class:`~app.transport.limits.TransportLimits`): a peer that does not
    read our replies stops being read itself (``pause_writing``), a connection from an
    untrusted source takes one small message and is closed after its answer, and the
    driver's sweep closes connections idle or slow to deliver a message.
    """

    def __init__(self, server: DmqServer, remote: tuple[str, int] | None = None) -> None:
        self.server = server
        self.id = server._next_connection_id()
        limits = server.limits
        self.framer = StreamFramer(server.config.max_stream_message, limits.max_head)
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = remote or ("", 0)
        #: For outbound connections: the node address it was opened to.
        self.remote = remote
        self.pending: list[bytes] = []
        #: Loop time each of ``pending`` was queued: a connect that times out passes the
        #: requests young enough to be worth a new attempt on to the next connection.
        self.pending_at: list[float] = []
        #: Outbound, while connecting: what it connects to, the task that does it, and
        #: the loop time it began (see ``DmqServer._revive_connects``).
        self.destination: Endpoint | None = None
        self.connect_task: asyncio.Future[None] | None = None
        self.connect_began = 0.0
        self.closed = False
        #: Whether this connection counts against the inbound caps.
        self.counted = False
        self.trusted = True
        now = server._clock()
        #: Loop time of the last byte received (or of the connection's start).
        self.last_received = now
        #: Loop time the message being received began to arrive, if one is.
        self.message_started: float | None = None
        #: Outbound: loop time a request was first written since anything was received.
        self.awaiting_since: float | None = None
        #: Messages cut from the stream but not handled yet (see data_received).
        self.backlog: deque[bytes] = deque()
        #: Why reading is paused: our replies are not read, or the backlog is long.
        self.write_paused = False
        self.draining = False
        #: Whether this connection speaks TLS.
        self.tls = False
        #: Inbound TLS: counted against the caps by the accept loop, before its
        #: handshake (connection_made comes after it).
        self.admitted = False
        #: Counted in ``tls_connections`` (its handshake done and it admitted).
        self.tls_open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        if peername:
            self.peer = (str(peername[0]), int(peername[1]))
        server = self.server
        if self.connect_task is not None:
            server._connected(self)
        if self.tls:
            # The loop calls connection_made once the handshake is done.
            if self.remote is None:
                server.stats.tls_handshakes_completed += 1
            else:
                server.stats.tls_connects_completed += 1
        if self.remote is None:
            admitted = server._tls_admit(self) if self.admitted else server._admit(self)
            if not admitted:
                self.closed = True
                self.transport.abort()
                return
        if self.tls:
            self.tls_open = True
            server.stats.tls_connections += 1
        self.transport.set_write_buffer_limits(high=server.limits.write_high_water)
        server._connections[self.id] = self
        for data in self.pending:
            self.transport.write(data)
        self.pending.clear()
        self.pending_at.clear()

    def write(self, data: bytes) -> None:
        if self.transport is None:
            self.pending.append(data)
            self.pending_at.append(self.server._clock())
            return
        if self.transport.is_closing():
            return
        self.transport.write(data)
        if self.transport.get_write_buffer_size() > self.server._write_ceiling:
            # Paused reading stops new requests, but replies to what was already read,
            # and our own requests, still queue: a peer that never reads is let go.
            self.server.stats.tcp_write_overflows += 1
            self.server._log_limited(
                logging.WARNING,
                self.peer[0],
                "write",
                "closing TCP connection to %s:%s: %d bytes queued that it does not read",
                self.peer[0],
                self.peer[1],
                self.transport.get_write_buffer_size(),
            )
            self.transport.abort()

    @property
    def reading_paused(self) -> bool:
        return self.write_paused or self.draining

    def pause_writing(self) -> None:
        # Back-pressure: stop reading the requests of a peer that does not read the
        # answers, so that what we queue for it stays near the high-water mark.
        self.server.stats.tcp_read_paused += 1
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()
        if self.backlog and not self.draining:
            self._drain()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.reading_paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        server = self.server
        if server._connecting and self.peer[0] in server._connecting:
            server._revive_connects(self.peer[0])
        now = server._clock()
        self.last_received = now
        self.awaiting_since = None
        held = self.framer.buffered
        try:
            try:
                messages = self.framer.feed(data)
            finally:
                # Counted even when the stream is refused: connection_lost takes off
                # what the framer still holds then.
                server._buffered += self.framer.buffered - held
        except SipParseError as exc:
            self.server.stats.stream_errors += 1
            self.server._log_limited(
                logging.WARNING,
                self.peer[0],
                "stream",
                "closing TCP connection from %s:%s: %s",
                self.peer[0],
                self.peer[1],
                exc.reason,
            )
            if self.transport is not None:
                self.transport.abort()
            return
        if self.framer.buffered > held and server._buffered > server.limits.max_buffered:
            server.stats.tcp_buffer_overflows += 1
            server._log_limited(
                logging.WARNING,
                self.peer[0],
                "budget",
                "closing TCP connection from %s:%s: %d bytes of incomplete messages held "
                "on all connections, over %d",
                self.peer[0],
                self.peer[1],
                server._buffered,
                server.limits.max_buffered,
            )
            if self.transport is not None:
                self.transport.abort()
            return
        if not self.framer.buffered:
            self.message_started = None
        elif messages or self.message_started is None:
            self.message_started = now  # a new message began in this read
        if messages:
            self.backlog.extend(messages)
            if not self.draining:
                self._drain()

    def _drain(self) -> None:
        """Handle up to MESSAGES_PER_TURN messages, then let the loop turn.

        One read can hold hundreds of messages, and the loop may call data_received
        many times in a row for one connection: without a turn limit, a peer pouring
        requests in would hold the loop (and every other client) for seconds. While a
        backlog is left, the connection is not read; it is drained a batch per turn.
        """
        self.draining = False
        backlog = self.backlog
        server = self.server
        for _ in range(MESSAGES_PER_TURN):
            if not backlog or self.write_paused:
                break
            transport = self.transport
            if self.closed or (transport is not None and transport.is_closing()):
                backlog.clear()
                return
            server._stream_message(backlog.popleft(), self)
            if not self.trusted:
                # Everything from an untrusted source is refused (403): answer the
                # first message, then close, rather than serve a flood of refusals.
                server.stats.tcp_untrusted_closed += 1
                backlog.clear()
                if self.transport is not None:
                    self.transport.close()
                return
        if backlog and not self.write_paused and server._loop is not None:
            self.draining = True
            server._loop.call_soon(self._drain)
        self._update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._buffered -= self.framer.buffered
        self.framer = StreamFramer(0)  # what it held is freed with the connection
        self.server._connection_lost(self)


class DmqServer:
    """A DMQ node on the network. Use ``await start()`` and ``await stop()``."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        drop_rate: float = 0.0,
        seed: int | None = None,
        dns_resolver: Any = None,
        dns_timeout: float | None = None,
        dns_negative_ttl: float | None = None,
        limits: TransportLimits | None = None,
    ) -> None:
        if not 0.0 <= drop_rate < 1.0:  # also refuses NaN
            raise ConfigError("must be at least 0 and below 1", field="drop_rate", value=drop_rate)
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self.limits = limits or TransportLimits()
        #: Inbound TCP connections open now, by source address.
        self._sources: dict[str, int] = {}
        #: Bytes of incomplete messages held by all TCP connections together.
        self._buffered = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self.resolver = _HostCache(self._clock)
        self._verify_peer = config.tls is not None and config.tls.verify_peer
        # A certificate from the CA is the trust of a TLS peer, whatever its address:
        # the core trusts every source, the driver applies ``trusted`` to what is not
        # TLS (see the module's docstring).
        core_config = replace(config, trusted=ALL_NETWORKS) if self._verify_peer else config
        self.node = DmqNode(core_config, resolver=self.resolver)
        self.node.untrusted_log_interval = self.limits.log_interval
        self._tls: tls.TlsContexts | None = None
        self._tls_listener: socket.socket | None = None
        self._accepting: asyncio.Future[None] | None = None
        #: (address, port) of a TLS node -> the host name its URI gave, for the
        #: certificate check of a node no longer listed.
        self._tls_names: BoundedCache[tuple[str, int], str] = BoundedCache(NAME_CACHE_SIZE)
        #: Sources whose TLS refusal was logged (once per address).
        self._tls_refusals_logged: BoundedCache[str, bool] = BoundedCache(NAME_CACHE_SIZE)
        # The look-up bounds are the limits' unless given here (tests of the resolver).
        if dns_timeout is not None:
            self.dns_timeout = dns_timeout
        if dns_negative_ttl is not None:
            self.dns_negative_ttl = dns_negative_ttl
        #: Look-ups in progress, by lower-case name.
        self._lookups: dict[str, asyncio.Task[str]] = {}
        #: Destination host (as the core names it) -> address for the socket.
        self._send_addresses: BoundedCache[str, str] = BoundedCache(NAME_CACHE_SIZE)
        #: The socket's source address -> the core's Endpoint for it: a bus has a few
        #: senders, each sending many datagrams, and building an Endpoint costs more
        #: than finding it (bounded: any host can send a datagram).
        self._udp_sources: BoundedCache[tuple[Any, ...], Endpoint] = BoundedCache(NAME_CACHE_SIZE)
        self.drop_rate = drop_rate
        self._drop_rng = random.Random(seed)
        self._dns_resolver = dns_resolver
        self.stats = TransportStats()
        self.event_listeners: list[EventListener] = []
        self._udp: asyncio.DatagramTransport | None = None
        #: The UDP socket's descriptor and family, for sendmmsg (-1: none).
        self._udp_fd = -1
        self._udp_family = int(socket.AF_INET)
        #: The end-of-turn flush the UDP receive path scheduled, until it runs.
        self._flush_due: asyncio.Handle | None = None
        self._tcp_server: asyncio.AbstractServer | None = None
        self._connections: dict[int, _StreamProtocol] = {}
        self._outbound: dict[tuple[str, int], _StreamProtocol] = {}
        #: Outbound connects still waiting for their connection, by the address they
        #: connect to: a sign of life from it starts a stale one over.
        self._connecting: dict[str, set[_StreamProtocol]] = {}
        self._connection_ids = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._waiters: dict[int, asyncio.Future[SendOperation]] = {}
        #: While set, what the core has to send waits in its outbox (in order) until
        #: release_output(): the gateway holds its stamped messages until their origin
        #: sequence numbers are committed.
        self.output_held = False
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Set when stop() begins: no new broadcast or send is accepted from then on.
        self._stopping = False
        self.started_at: float | None = None

    @property
    def limits(self) -> TransportLimits:
        """The bounds in force; set before :meth:`start`."""
        return self._limits

    @limits.setter
    def limits(self, limits: TransportLimits) -> None:
        self._limits = limits
        #: Bytes queued for one connection beyond which it is closed: room for the
        #: high-water mark and two of the largest messages.
        self._write_ceiling = limits.write_high_water + 2 * self.config.max_stream_message
        self._limited_log = RateLimitedLog(log, limits.log_interval, self._clock)
        #: Seconds one host name look-up may take before it counts as failed.
        self.dns_timeout = limits.dns_timeout
        #: Seconds a failed look-up is remembered before the name is asked about again.
        self.dns_negative_ttl = limits.dns_negative_ttl
        node: DmqNode | None = getattr(self, "node", None)
        if node is not None:
            # The core's own per-source log lines (untrusted KDMQ) keep the same pace.
            node.untrusted_log_interval = limits.log_interval

    def _log_limited(self, level: int, source: str, kind: str, message: str, *args: object) -> None:
        self._limited_log.log(level, source, kind, message, *args)
        self.stats.log_lines_suppressed = self._limited_log.suppressed

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._loop is not None

    def loop_time(self) -> float:
        """The clock the node runs on (the loop's monotonic time)."""
        return self._now()

    @property
    def local_uri(self) -> SipUri:
        return self.node.nodes.local.uri

    async def start(self) -> None:
        """Bind the sockets, resolve the notification addresses, join the bus."""
        loop = asyncio.get_running_loop()
        local = self.config.server_address
        listen_tls = local.transport == "tls"
        if listen_tls or self.config.tls is not None:
            self._tls = tls.build_contexts(self.config.tls, listen=listen_tls)
        self._loop = loop
        bind_host = await self._resolve_start_host(local.host, "server_address")
        port = local.effective_port
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(bind_host, port)
        )
        _enlarge_buffers(self._udp)
        udp_socket = self._udp.get_extra_info("socket")
        if udp_socket is not None:
            self._udp_fd = udp_socket.fileno()
            self._udp_family = int(udp_socket.family)
        if listen_tls:
            self._tls_listener = _listen(bind_host, port)
            self._accepting = asyncio.ensure_future(self._accept_loop(self._tls_listener))
        else:
            self._tcp_server = await loop.create_server(
                lambda: _StreamProtocol(self), bind_host, port, reuse_address=True
            )
        for address in await self._notification_targets():
            self.node.add_notification_address(address)
        if _ip_literal(local.host) is None:
            self.node.host_resolved(local.host, bind_host, loop.time())
        self.started_at = loop.time()
        self._arm_sweeper()
        self.node.start(loop.time())
        self._flush()
        log.info(
            "DMQ node %s listening on %s:%d (udp, %s)",
            local,
            bind_host,
            port,
            "tls" if listen_tls else "tcp",
        )

    async def _resolve_start_host(self, host: str, field: str) -> str:
        literal = _ip_literal(host)
        if literal is not None:
            return literal
        try:
            addresses = await dns.resolve_host(host, resolver=self._dns_resolver)
        except dns.DnsResolutionError as exc:
            raise ConfigError(str(exc), field=field, value=host) from None
        self.resolver.addresses.put(host.lower(), addresses[0])
        return addresses[0]

    async def _notification_targets(self) -> list[SipUri]:
        """Notification addresses as the node should hold them.

        Without multi_notify each address is kept as written (its name resolved and
        cached). With multi_notify the first address is expanded into one node per
        SRV/A/AAAA answer, as Kamailio does.
        """
        targets: list[SipUri] = []
        addresses = self.config.notification_addresses
        if self.config.multi_notify and addresses:
            first = addresses[0]
            try:
                found = await dns.resolve_notification_targets(
                    first.host,
                    first.port,
                    first.transport,
                    multi_notify=True,
                    resolver=self._dns_resolver,
                )
            except dns.DnsResolutionError as exc:
                log.warning("multi_notify: %s", exc)
                return []
            params = tuple(p for p in first.params if p[0] == "transport")
            for host, port in found:
                targets.append(SipUri(host, port, None, params, first.scheme))
            return targets
        for address in addresses:
            if _ip_literal(address.host) is None:
                try:
                    resolved = await dns.resolve_host(address.host, resolver=self._dns_resolver)
                except dns.DnsResolutionError as exc:
                    log.warning("notification address %s: %s", address, exc)
                    continue
                self.resolver.addresses.put(address.host.lower(), resolved[0])
            targets.append(address)
        return targets

    async def stop(self, grace: float = 2.0) -> None:
        """Leave the bus gracefully (every active node is told), then close sockets."""
        if self._loop is None:
            return
        loop = self._loop
        self._stopping = True
        # Whoever waits on a broadcast or send (an HTTP request) learns now that the
        # node is going, rather than after the leave and the sends' Timer F.
        waiters = list(self._waiters.values())
        self._waiters.clear()
        for future in waiters:
            if not future.done():
                future.set_exception(NodeStoppedError("the DMQ node stopped"))
        operation = self.node.stop(loop.time())
        waiter = self._waiter(operation)
        self._flush()
        try:
            await asyncio.wait_for(
                asyncio.shield(waiter), timeout=min(grace, self.config.timers.timer_f_value)
            )
        except TimeoutError:
            log.info("leave: not every node answered within %.1f s", grace)
        for task in [*self._tasks, *self._lookups.values()]:
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._flush_due is not None:
            # What the last datagrams' turn queued leaves before the socket closes.
            self._flush_due.cancel()
            self._flush_due = None
            self._flush()
        if self._udp is not None:
            self._udp_fd = -1  # never written to directly again, closed or not
            self._udp.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        if self._tls_listener is not None:
            self._tls_listener.close()
            self._tls_listener = None
        for connection in list(self._connections.values()):
            if connection.transport is not None:
                connection.transport.close()
        if self._tcp_server is not None:
            await self._tcp_server.wait_closed()
        self._loop = None
        log.info("DMQ node %s stopped", self.config.server_address)

    # ------------------------------------------------------------------ peers and sends

    def register_peer(
        self,
        peer_id: str,
        handler: PeerHandler,
        *,
        init: PeerInit | None = None,
        description: str = "",
        reply_timeout: float | None = None,
    ) -> Peer:
        """Register (or replace) a peer; see :meth:`DmqNode.register_peer`.

        A handler that cannot answer at once returns ``None`` and later calls
        :meth:`reply`; the node answers 408 itself after ``reply_timeout`` (``None``:
        Timer F) and emits :class:`~app.dmq.events.PeerReplyTimedOut`.
        """
        peer = self.node.register_peer(
            peer_id, handler, init=init, description=description, reply_timeout=reply_timeout
        )
        self._flush()
        return peer

    def update_peer(
        self,
        peer_id: str,
        *,
        description: str | None = None,
        reply_timeout: float | None = None,
    ) -> Peer:
        """Change a peer's description or reply timeout; see :meth:`DmqNode.update_peer`."""
        return self.node.update_peer(peer_id, description=description, reply_timeout=reply_timeout)

    def unregister_peer(self, peer_id: str) -> Peer:
        """Remove a peer; messages still waiting for its answer are answered 404."""
        # Before start and after stop nothing can be waiting (stop answered it 503), so
        # the instant given to the core is then never used.
        now = self._loop.time() if self._loop is not None else 0.0
        peer = self.node.unregister_peer(peer_id, now)
        if self._loop is not None:
            self._flush()
        return peer

    def reply(self, message_id: int, reply: PeerReply) -> None:
        """Answer a message whose handler returned ``None``.

        Raises :class:`~app.dmq.errors.ReplyNotPendingError` (saying what became of the
        message) when it no longer waits, and :class:`NodeStoppedError` when the node
        is not running.
        """
        if self._loop is None:
            raise NodeStoppedError("the DMQ node is not running")
        self.node.reply(message_id, reply, self._loop.time())
        self._flush()

    def reply_many(self, message_ids: Iterable[int], reply: PeerReply) -> None:
        """Answer several deferred messages alike, then send every answer in one pass
        (the gateway's group commit answers a batch at once, not a flush per message).

        Ids that no longer wait (answered meanwhile, their peer unregistered) are
        skipped; raises :class:`NodeStoppedError` when the node is not running.
        """
        loop = self._loop
        if loop is None:
            raise NodeStoppedError("the DMQ node is not running")
        try:
            self.node.reply_many(message_ids, reply, loop.time())
        finally:
            self._flush()

    def broadcast_nowait(
        self,
        peer_id: str,
        body: bytes,
        content_type: str | None,
        *,
        headers: ExtraHeaders = (),
        only: Callable[[Node], bool] | None = None,
    ) -> tuple[SendOperation, asyncio.Future[SendOperation]]:
        """Start a broadcast; the future completes with every node's result, or with
        :class:`NodeStoppedError` if the node stops first. ``headers`` are extra
        ``(name, value)`` headers for the KDMQ requests, ``only`` narrows the targets
        (:meth:`DmqNode.broadcast`)."""
        operation = self.node.broadcast(
            peer_id, body, content_type, self._send_clock(), headers=headers, only=only
        )
        waiter = self._waiter(operation)
        self._flush()
        return operation, waiter

    def send_nowait(
        self,
        peer_id: str,
        body: bytes,
        content_type: str | None,
        node: SipUri,
        *,
        headers: ExtraHeaders = (),
    ) -> tuple[SendOperation, asyncio.Future[SendOperation]]:
        operation = self.node.send(
            peer_id, body, content_type, node, self._send_clock(), headers=headers
        )
        waiter = self._waiter(operation)
        self._flush()
        return operation, waiter

    def send_once_nowait(
        self, peer_id: str, body: bytes, content_type: str | None, node: SipUri
    ) -> tuple[SendOperation, asyncio.Future[SendOperation]]:
        """Send to one node exactly once (:meth:`DmqNode.send_once`): no retransmission,
        no outbox; the future completes with its answer or a timeout at Timer F."""
        operation = self.node.send_once(peer_id, body, content_type, node, self._send_clock())
        waiter = self._waiter(operation)
        self._flush()
        return operation, waiter

    async def broadcast(
        self,
        peer_id: str,
        body: bytes,
        content_type: str | None,
        *,
        headers: ExtraHeaders = (),
    ) -> SendOperation:
        """Send to every node but us and wait for each one's outcome."""
        _, waiter = self.broadcast_nowait(peer_id, body, content_type, headers=headers)
        return await waiter

    async def send(
        self,
        peer_id: str,
        body: bytes,
        content_type: str | None,
        node: SipUri,
        *,
        headers: ExtraHeaders = (),
    ) -> SendOperation:
        """Send to one node of the list and wait for its outcome."""
        _, waiter = self.send_nowait(peer_id, body, content_type, node, headers=headers)
        return await waiter

    def add_node(self, uri: SipUri) -> Node:
        node = self.node.add_node(uri, self._now())
        self._flush()
        return node

    def remove_node(self, uri: SipUri) -> Node:
        node = self.node.remove_node(uri, self._now())
        self._flush()
        return node

    # ------------------------------------------------------------------ names

    async def resolve_node(self, uri: SipUri) -> str:
        """The address of a node URI's host, looked up now (whatever the negative cache
        says) and kept for the core, which then identifies nodes so named by it.

        Raises :class:`app.transport.dns.DnsResolutionError` when the name gives no
        address within ``dns_timeout`` (or cannot be a DNS name at all).
        """
        literal = _ip_literal(uri.host)
        if literal is not None:
            return literal
        name = uri.host.lower()
        known = self.resolver.addresses.get(name)
        if known is not None:
            return known
        # Shielded: a caller that gives up must not cancel a look-up others share.
        return await asyncio.shield(self._lookup(name))

    def _lookup(self, name: str) -> asyncio.Future[str]:
        task = self._lookups.get(name)
        if task is None:
            if len(self._lookups) >= self.limits.max_dns_lookups:
                # A flood of new names (from a node list) must not become a flood of
                # look-ups: this one fails for now, and is asked for again later.
                self.stats.dns_lookups_refused += 1
                self._log_limited(
                    logging.WARNING,
                    "dns",
                    "lookups",
                    "%d host name look-ups in flight: %r not looked up now",
                    len(self._lookups),
                    name,
                )
                refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()
                refused.set_exception(dns.DnsResolutionError(name))
                refused.exception()  # retrieved: whoever awaits it gets it all the same
                if self._loop is not None:
                    self._loop.call_soon(self._host_resolved, name, None)
                return refused
            task = asyncio.ensure_future(self._resolve_name(name))
            self._lookups[name] = task
            task.add_done_callback(self._lookup_done)
        return task

    def _lookup_done(self, task: asyncio.Task[str]) -> None:
        for name, running in list(self._lookups.items()):
            if running is task:
                del self._lookups[name]
        if not task.cancelled():
            task.exception()  # reported through the core and the log already

    async def _resolve_name(self, name: str) -> str:
        try:
            async with asyncio.timeout(self.dns_timeout):
                addresses = await dns.resolve_host(name, resolver=self._dns_resolver)
        except Exception as exc:
            # Anything at all (a name too long for DNS, one IDNA refuses, a dead
            # server): the node goes on knowing it by name, and the loop goes on.
            self.resolver.failed.put(name, self._clock() + self.dns_negative_ttl)
            log.warning(
                "cannot resolve %r (%s); nodes so named are known by name only",
                name,
                exc if str(exc) else type(exc).__name__,
            )
            self._host_resolved(name, None)
            if isinstance(exc, dns.DnsResolutionError):
                raise
            raise dns.DnsResolutionError(name) from exc
        address = addresses[0]
        self.resolver.addresses.put(name, address)
        self.resolver.failed.pop(name, None)
        self._host_resolved(name, address)
        return address

    def _host_resolved(self, name: str, address: str | None) -> None:
        if self._loop is None:
            return
        self.node.host_resolved(name, address, self._loop.time())
        self._flush()

    def _clock(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    def _waiter(self, operation: SendOperation) -> asyncio.Future[SendOperation]:
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[SendOperation] = loop.create_future()
        self._waiters[operation.id] = future
        return future

    def _spawn(self, coroutine: Awaitable[_T]) -> asyncio.Future[_T]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _send_clock(self) -> float:
        """The clock for a new broadcast or send, which is refused once stop() began."""
        if self._stopping or self._loop is None:
            raise NodeStoppedError("the DMQ node is not running (stopped or not started)")
        return self._loop.time()

    def _now(self) -> float:
        if self._loop is None:
            raise RuntimeError("the DMQ server is not running (call start() first)")
        return self._loop.time()

    # ------------------------------------------------------------------ the seam

    def _datagram_received(self, data: bytes, addr: tuple[Any, int]) -> None:
        if self.drop_rate and self._drop_rng.random() < self.drop_rate:
            self.stats.dropped_datagrams += 1
            return
        loop = self._loop
        if loop is None:
            return
        if self._verify_peer and not data.startswith(b"SIP/") and not self._is_trusted(addr[0]):
            # The core trusts every source in this mode (a TLS peer's certificate is
            # its trust); a plain request from outside ``trusted`` goes no further.
            self.stats.udp_untrusted_dropped += 1
            self._log_limited(
                logging.WARNING,
                str(addr[0]),
                "untrusted",
                "UDP request from untrusted %s:%s dropped (only TLS peers with a "
                "certificate from the CA, or trusted networks, are served)",
                addr[0],
                addr[1],
            )
            return
        source = self._udp_sources.get(addr)
        if source is None:
            source = self._udp_sources.put(addr, Endpoint("udp", str(addr[0]), int(addr[1])))
        if self._connecting and source.host in self._connecting:
            self._revive_connects(source.host)
        self.node.receive(data, source, loop.time())
        # The other datagrams of this readiness event come first (module docstring).
        if self._flush_due is None:
            self._flush_due = loop.call_soon(self._flush_end_of_turn)

    def _flush_end_of_turn(self) -> None:
        self._flush_due = None
        self._flush()

    def _stream_message(self, data: bytes, connection: _StreamProtocol) -> None:
        loop = self._loop
        if loop is None:
            return
        source = Endpoint(
            "tls" if connection.tls else "tcp",
            connection.peer[0],
            connection.peer[1],
            connection.id,
        )
        self.node.receive(data, source, loop.time())
        self._flush()

    def _next_connection_id(self) -> int:
        self._connection_ids += 1
        return self._connection_ids

    def _admit(self, connection: _StreamProtocol) -> bool:
        """Whether an inbound connection is within the caps; counts it if so."""
        source = connection.peer[0]
        limits = self.limits
        kind = ""
        if self.stats.tcp_connections >= limits.max_connections:
            self.stats.tcp_refused_total += 1
            kind = f"{limits.max_connections} TCP connections open"
        elif self._sources.get(source, 0) >= limits.max_connections_per_source:
            self.stats.tcp_refused_per_source += 1
            kind = f"{limits.max_connections_per_source} TCP connections open from {source}"
        if kind:
            self._log_limited(
                logging.WARNING,
                source,
                "accept",
                "TCP connection from %s:%s refused: %s",
                source,
                connection.peer[1],
                kind,
            )
            return False
        trusted = self._is_trusted(source)
        if self._verify_peer and not trusted and not connection.tls:
            # Plain TCP from outside ``trusted`` while certificates are the trust.
            self.stats.tcp_untrusted_closed += 1
            self._log_limited(
                logging.WARNING,
                source,
                "accept",
                "TCP connection from untrusted %s:%s refused (only TLS peers with a "
                "certificate from the CA, or trusted networks, are served)",
                source,
                connection.peer[1],
            )
            return False
        connection.counted = True
        self.stats.tcp_connections += 1
        self._sources[source] = self._sources.get(source, 0) + 1
        # Under verify_peer a TLS connection that completes its handshake is trusted
        # (_accept_tls); until then it is held to an untrusted peer's bounds.
        connection.trusted = trusted
        if not connection.trusted:
            connection.framer.max_size = min(connection.framer.max_size, UNTRUSTED_MAX_MESSAGE)
        return True

    async def _accept_loop(self, listener: socket.socket) -> None:
        """Accept TLS connections: each is counted against the caps *before* its
        handshake, so a flood of clients that never say hello is bounded like any other."""
        loop = self._loop
        assert loop is not None
        while True:
            try:
                sock, address = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                # Out of descriptors and the like: wait a little rather than spin.
                self._log_limited(logging.WARNING, "accept", "accept", "TLS accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            connection = _StreamProtocol(self)
            connection.peer = (str(address[0]), int(address[1]))
            connection.tls = connection.admitted = True
            if not self._admit(connection):
                sock.close()
                continue
            self._spawn(self._accept_tls(connection, sock))

    async def _accept_tls(self, connection: _StreamProtocol, sock: socket.socket) -> None:
        """Run an accepted connection's handshake, bounded; a failed one is counted,
        logged once per address, and the connection closed: it never reaches the SIP
        layer. Once it succeeds the loop calls ``connection_made`` (:meth:`_tls_admit`)."""
        loop = self._loop
        contexts = self._tls
        assert loop is not None and contexts is not None and contexts.server is not None
        host, port = connection.peer
        config = contexts.config
        timeout = config.handshake_timeout if config is not None else 10.0
        try:
            async with asyncio.timeout(timeout + 1.0):
                await loop.connect_accepted_socket(
                    lambda: connection,
                    sock,
                    ssl=contexts.server,
                    ssl_handshake_timeout=timeout,
                )
        except (Exception, asyncio.CancelledError) as exc:
            if not connection.closed:
                self.stats.tls_handshakes_failed += 1
                if isinstance(exc, asyncio.CancelledError):
                    self.stats.tls_in_other += 1
                else:
                    kind, reason = _handshake_failure(exc, timeout)
                    self._count_tls_failure("in", kind)
                    self._log_tls_refusal(host, port, reason)
            connection.closed = True
            if connection.transport is not None and not connection.transport.is_closing():
                connection.transport.abort()
            with contextlib.suppress(OSError):
                sock.close()
            self._connection_lost(connection)
            if isinstance(exc, asyncio.CancelledError):
                raise

    def _tls_admit(self, connection: _StreamProtocol) -> bool:
        """After an inbound handshake: apply the allow-list of names, and make a peer
        verified by the CA trusted (``verify_peer``)."""
        transport = connection.transport
        config = self._tls.config if self._tls is not None else None
        if transport is None or config is None or not config.verify_peer:
            return True
        cert = transport.get_extra_info("peercert")
        if not tls.peer_allowed(cert, config.allow_names):
            self.stats.tls_names_refused += 1
            names = ", ".join(tls.certificate_names(cert or {})) or "none"
            self._log_tls_refusal(
                connection.peer[0],
                connection.peer[1],
                f"its certificate names ({names}) are not on --tls-allow-name",
            )
            self._connection_lost(connection)
            return False
        connection.trusted = True
        connection.framer.max_size = self.config.max_stream_message
        return True

    def _count_tls_failure(self, direction: str, kind: str) -> None:
        """One failed handshake under its reason (``direction``: ``in`` or ``out``)."""
        name = f"tls_{direction}_{kind}"
        if not hasattr(self.stats, name):
            name = f"tls_{direction}_other"
        setattr(self.stats, name, getattr(self.stats, name) + 1)

    def _log_tls_refusal(self, host: str, port: int, reason: str) -> None:
        """Once per address: a scanner or a misconfigured node must not flood the log."""
        if self._tls_refusals_logged.get(host) is not None:
            log.debug("TLS connection from %s:%s refused: %s", host, port, reason)
            return
        self._tls_refusals_logged.put(host, True)
        log.warning(
            "TLS connection from %s:%s refused: %s (further refusals of this address "
            "are counted, not logged)",
            host,
            port,
            reason,
        )

    def _is_trusted(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.config.trusted)

    def _arm_sweeper(self) -> None:
        loop = self._loop
        if loop is None:
            return
        limits = self.limits
        interval = min(1.0, limits.idle_timeout / 4, limits.message_timeout / 4)
        self._sweeper = loop.call_later(max(interval, 0.01), self._sweep)

    def _sweep(self) -> None:
        """Close connections idle too long, slow to deliver a message, or (outbound)
        whose request went unanswered for Timer F: a dead connection is not reused."""
        self._sweeper = None
        if self._loop is None:
            return
        now = self._loop.time()
        limits = self.limits
        timer_f = self.config.timers.timer_f_value
        for connection in list(self._connections.values()):
            transport = connection.transport
            if transport is None or transport.is_closing():
                continue
            host, port = connection.peer
            if connection.awaiting_since is not None and now - connection.awaiting_since >= timer_f:
                self.stats.tcp_outbound_reset += 1
                self._log_limited(
                    logging.INFO,
                    host,
                    "dead",
                    "TCP connection to %s:%s: no answer for %.0f s; closed, the next "
                    "request opens a new one",
                    host,
                    port,
                    timer_f,
                )
                self._drop_outbound(connection)
                transport.abort()
            elif (
                connection.message_started is not None
                and not connection.reading_paused
                and now - connection.message_started > limits.message_timeout
            ):
                self.stats.tcp_message_timeouts += 1
                self._log_limited(
                    logging.WARNING,
                    host,
                    "slow",
                    "closing TCP connection from %s:%s: a message took over %g s to arrive",
                    host,
                    port,
                    limits.message_timeout,
                )
                transport.abort()
            elif now - connection.last_received > limits.idle_timeout:
                self.stats.tcp_idle_closed += 1
                log.debug("closing TCP connection with %s:%s: idle", host, port)
                self._drop_outbound(connection)
                transport.close()
        self._arm_sweeper()

    def _drop_outbound(self, connection: _StreamProtocol) -> None:
        remote = connection.remote
        if remote is not None and self._outbound.get(remote) is connection:
            del self._outbound[remote]
        connection.closed = True

    def _connection_lost(self, connection: _StreamProtocol) -> None:
        if connection.tls_open:
            connection.tls_open = False
            self.stats.tls_connections -= 1
        if connection.counted:
            connection.counted = False
            self.stats.tcp_connections -= 1
            source = connection.peer[0]
            left = self._sources.get(source, 0) - 1
            if left > 0:
                self._sources[source] = left
            else:
                self._sources.pop(source, None)
        self._connections.pop(connection.id, None)
        if connection.remote is not None and self._outbound.get(connection.remote) is connection:
            del self._outbound[connection.remote]

    def hold_output(self) -> None:
        """Keep every datagram and stream write the core produces from now on (and its
        order) until :meth:`release_output`; events and timers go on as usual."""
        self.output_held = True

    def release_output(self) -> None:
        """Send, in order, everything held since :meth:`hold_output`."""
        self.output_held = False
        self._flush()

    def _flush(self) -> None:
        node = self.node
        if not self.output_held:
            datagrams: list[Datagram] = []
            for data, destination in node.datagrams_to_send():
                if destination.transport != "udp":
                    self._send(data, destination)
                    continue
                if self.drop_rate and self._drop_rng.random() < self.drop_rate:
                    self.stats.dropped_datagrams += 1
                    continue
                # The usual destination is an address already seen.
                address = self._send_addresses.get(destination.host)
                if address is None:
                    address = self._address_of(destination.host)
                    if address is None:
                        # A node known by name whose look-up has not succeeded: a
                        # socket given the name would resolve it, blocking the loop.
                        # Timer E sends again.
                        log.debug("%s is not resolved yet; datagram not sent", destination.host)
                        continue
                datagrams.append((data, (address, destination.port)))
            if datagrams:
                self._send_datagrams(datagrams)
        while (event := node.next_event()) is not None:
            if isinstance(event, SendCompleted):
                waiter = self._waiters.pop(event.operation.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(event.operation)
            elif isinstance(event, HostLookupNeeded):
                known = self.resolver.addresses.get(event.host)
                if known is not None:
                    node.host_resolved(event.host, known, self._clock())
                elif self._loop is not None:
                    self._lookup(event.host)
            else:
                for listener in self.event_listeners:
                    try:
                        listener(event)
                    except Exception:
                        log.exception("node event listener failed")
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadline = self.node.get_timer()
        if deadline is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self._timer_at = None
            return
        if self._timer is not None and self._timer_at is not None and self._timer_at <= deadline:
            return  # an earlier (or the same) wake-up is already armed
        if self._timer is not None:
            self._timer.cancel()
        loop = self._loop
        if loop is None:
            return
        self._timer_at = deadline
        self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        loop = self._loop
        armed = self._timer_at
        self._timer = self._timer_at = None
        if loop is None:
            return
        now = loop.time()
        if armed is not None and now < armed:
            now = armed  # the loop may wake a hair early; the core must see the deadline
        self.node.handle_timer(now)
        self._flush()

    def _address_of(self, host: str) -> str | None:
        """The address to hand a socket for ``host``: itself for an address (the
        usual case, remembered), the looked-up address for a name, else ``None``."""
        address = self._send_addresses.get(host)
        if address is None:
            address = _ip_literal(host) or self.resolver.addresses.get(host)
            if address is not None:
                self._send_addresses.put(host, address)
        return address

    def _send_datagrams(self, datagrams: list[Datagram]) -> None:
        """Send ``datagrams`` (in order) over the UDP socket: batches through
        ``sendmmsg`` while the transport has nothing queued, the rest through it."""
        # Both loops' datagram transports have get_write_buffer_size(); the type
        # stubs give it to write transports only.
        udp: Any = self._udp
        if udp is None:
            return
        fd = self._udp_fd
        count = len(datagrams)
        index = 0
        while index < count:
            if fd >= 0 and not udp.get_write_buffer_size() and not udp.is_closing():
                index += _sipscan.sendmmsg(fd, self._udp_family, datagrams, index)
                if index == count:
                    return
            # Not sent directly: the transport queues it (a full buffer) or says why
            # not; once it has queued one, the rest go behind it, in order.
            data, target = datagrams[index]
            index += 1
            try:
                udp.sendto(data, target)
            except (OSError, ValueError) as exc:
                # An address the socket can't reach (another family): the
                # transaction's timers report it as a timeout.
                log.info("cannot send to %s:%s: %s", target[0], target[1], exc)

    def _send(self, data: bytes, destination: Endpoint) -> None:
        """Send ``data`` over the stream (TCP or TLS) ``destination`` names."""
        if destination.connection is not None:
            connection = self._connections.get(destination.connection)
            if connection is not None and not connection.closed:
                connection.write(data)
                return
            log.info(
                "connection %s to %s:%s is gone; response dropped",
                destination.connection,
                destination.host,
                destination.port,
            )
            return
        key = (self._address_of(destination.host) or destination.host, destination.port)
        outbound = self._outbound.get(key)
        if outbound is None or outbound.closed:
            outbound = self._connect(key, destination)
        if outbound.awaiting_since is None and not data.startswith(b"SIP/"):
            # A request: if nothing at all comes back within Timer F, the sweep
            # takes the connection for dead.
            outbound.awaiting_since = self._clock()
        outbound.write(data)

    def _tls_server_name(self, destination: Endpoint) -> str:
        """The name a TLS node's certificate must carry: the host of its node URI (a
        name stays a name, though the socket is given the address it resolved to)."""
        where = (destination.host, destination.port)
        node = self.node.nodes.get((destination.host, destination.port, destination.transport))
        if node is not None:
            self._tls_names.put(where, node.uri.host)
            return node.uri.host
        # A node no longer listed (removed, its outbox parked) keeps the name it had.
        return self._tls_names.get(where) or destination.host

    def _carry_over(
        self, key: tuple[str, int], destination: Endpoint, failed: _StreamProtocol
    ) -> bool:
        """A connect timed out: open a new one for the requests it held that still have
        a fair part of their Timer F ahead (more than T1), and say whether there were any.

        A connect is bounded by Timer F, so a request queued as it began is due to time
        out now anyway; one queued later is not. Failing it with the connect would end a
        transaction that never had a chance: after a partition heals, the SYN of a
        connect begun during the cut can be minutes from its next retransmission, and a
        ping queued behind it would disable a node that is talking to us again. The old
        ones are left to their own Timer F, a moment away.
        """
        if self._loop is None:
            return False
        now = self._clock()
        timers = self.config.timers
        cutoff = now - timers.timer_f_value + timers.t1
        young = [
            data for data, at in zip(failed.pending, failed.pending_at, strict=True) if at > cutoff
        ]
        failed.pending.clear()
        failed.pending_at.clear()
        if not young:
            return False
        self.stats.tcp_connect_requests_carried += len(young)
        current = self._outbound.get(key)
        outbound = (
            current
            if current is not None and not current.closed
            else self._connect(key, destination)
        )
        for data in young:
            outbound.write(data)
        outbound.awaiting_since = now
        return True

    def _waiting_connect(self, protocol: _StreamProtocol, address: str) -> None:
        protocol.connect_began = self._clock()
        self._connecting.setdefault(address, set()).add(protocol)

    def _connected(self, protocol: _StreamProtocol) -> None:
        """An outbound connect is over (connected, failed or started over)."""
        protocol.connect_task = None
        for address, waiting in list(self._connecting.items()):
            waiting.discard(protocol)
            if not waiting:
                del self._connecting[address]

    def _revive_connects(self, address: str) -> None:
        """``address`` sent us something: start over every connect to it that has
        waited longer than the kernel's first SYN retransmission.

        A SYN lost to a partition is resent after 1 s, then 2, 4, 8... s: a connect
        begun during a cut can be many seconds from its next try when the link comes
        back, and every request queued on it waits that long (Timer F bounds it, 32 s
        by default). A sign of life from the host (a datagram, a message on a
        connection it opened) says the path is back, so a new connect goes now and
        takes the queued requests with it. At most one new start per connect per
        ``CONNECT_REVIVE_AFTER``."""
        now = self._clock()
        for protocol in list(self._connecting.get(address, ())):
            if now - protocol.connect_began < CONNECT_REVIVE_AFTER:
                continue
            key, destination, task = protocol.remote, protocol.destination, protocol.connect_task
            if key is None or destination is None or task is None or protocol.closed:
                continue
            self._connected(protocol)
            protocol.closed = True
            if self._outbound.get(key) is protocol:
                del self._outbound[key]
            fresh = self._connect(key, destination)
            fresh.pending, protocol.pending = protocol.pending, []
            fresh.pending_at, protocol.pending_at = protocol.pending_at, []
            task.cancel()
            self.stats.tcp_connects_revived += 1
            self._log_limited(
                logging.INFO,
                address,
                "revive",
                "%s connect to %s:%s started over: the host is reachable again",
                destination.transport.upper(),
                key[0],
                key[1],
            )

    def _connect(self, key: tuple[str, int], destination: Endpoint) -> _StreamProtocol:
        protocol = _StreamProtocol(self, key)
        protocol.destination = destination
        self._outbound[key] = protocol
        loop = self._loop
        assert loop is not None
        where = f"{key[0]}:{key[1]}"
        server_name = key[0]
        if destination.transport == "tls":
            server_name = self._tls_server_name(destination)
            if server_name.lower() != key[0].lower():
                where = f"{server_name} ({where})"

        async def connect() -> None:
            try:
                host = key[0]
                if _ip_literal(host) is None:
                    # A name: looked up like any other (bounded, negatively cached,
                    # an undecodable name is a failed look-up), never by the socket.
                    host = await asyncio.shield(self._lookup(host.lower()))
                if destination.transport == "tcp":
                    # (Not TLS: its connect includes the handshake, which a slow host
                    # may take more than a second over, and which must not be cut.)
                    self._waiting_connect(protocol, host)
                # Bounded: during a partition, a SYN can go unanswered for minutes.
                # A TLS handshake has a bound of its own, which it may use in full.
                bound = self.config.timers.timer_f_value
                if destination.transport == "tls":
                    protocol.tls = True
                    contexts = self._tls or tls.build_contexts(None, listen=False)
                    self._tls = contexts
                    timeout = (
                        contexts.config.handshake_timeout if contexts.config is not None else 10.0
                    )
                    bound += timeout
                async with asyncio.timeout(bound):
                    if destination.transport == "tls":
                        await loop.create_connection(
                            lambda: protocol,
                            host,
                            key[1],
                            ssl=contexts.client,
                            # SNI and the host name check: the name the node URI gives,
                            # not the address it resolved to.
                            server_hostname=server_name,
                            ssl_handshake_timeout=timeout,
                        )
                    else:
                        await loop.create_connection(lambda: protocol, host, key[1])
            except Exception as exc:
                self._connected(protocol)
                source = key[0]
                if destination.transport == "tls" and _tls_handshake_error(exc):
                    # Only the handshake's own failures: a refused or unanswered TCP
                    # connect is not one.
                    self.stats.tls_connects_failed += 1
                    kind, _ = _handshake_failure(exc, 0.0)
                    self._count_tls_failure("out", kind)
                    # A refused certificate is a node's configuration: each node that
                    # shares an address (one host, several ports) gets its own line.
                    source = f"{key[0]}:{key[1]}"
                self._log_limited(
                    logging.INFO,
                    source,
                    "connect",
                    "%s connect to %s failed: %s",
                    destination.transport.upper(),
                    where,
                    _connect_reason(exc),
                )
                protocol.closed = True
                if self._outbound.get(key) is protocol:
                    del self._outbound[key]
                if self._loop is None:
                    return
                if isinstance(exc, TimeoutError) and self._carry_over(key, destination, protocol):
                    return
                self.node.transport_error(destination, self._loop.time())
                self._flush()

        protocol.connect_task = self._spawn(connect())
        return protocol


#: ``TransportStats`` reasons of a failed TLS handshake (``tls_in_*``, ``tls_out_*``).
TLS_FAILURE_REASONS = (
    "timeout",
    "not_tls",
    "no_certificate",
    "untrusted_certificate",
    "expired_certificate",
    "hostname_mismatch",
    "protocol_version",
    "other",
)


#: Every address: the core's trust when certificates are the trust (``verify_peer``).
ALL_NETWORKS = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket for the TLS accept loop (what create_server would bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _connect_reason(exc: BaseException) -> str:
    """One readable clause for a failed outbound connection."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its certificate was refused ({exc.verify_message})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _tls_handshake_error(exc: BaseException) -> bool:
    """Whether an outbound connection failed in its TLS handshake (not in its connect)."""
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return True
    return isinstance(exc, ConnectionAbortedError) and "handshake" in str(exc)


def _handshake_failure(exc: BaseException, timeout: float) -> tuple[str, str]:
    """A failed handshake's reason, as a key of ``TLS_FAILURE_REASONS`` (the label of
    ``dmq_tls_handshakes_failed``) and as one readable clause."""
    if isinstance(exc, TimeoutError) or (
        isinstance(exc, ConnectionAbortedError) and "handshake" in str(exc)
    ):
        return "timeout", f"no TLS handshake within {timeout:g} s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or ""
        if "expired" in message.lower():
            kind = "expired_certificate"
        elif "hostname" in message.lower() or "ip address mismatch" in message.lower():
            kind = "hostname_mismatch"
        else:
            kind = "untrusted_certificate"
        return kind, f"its certificate was refused ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "EXPIRED" in reason:
            return "expired_certificate", "its certificate has expired"
        if "UNKNOWN_CA" in reason or "CERTIFICATE_VERIFY_FAILED" in reason:
            return "untrusted_certificate", "its certificate is not from the trusted CA"
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason or "NO_CERTIFICATE" in reason:
            return "no_certificate", "it presented no certificate"
        if "WRONG_VERSION" in reason or "HTTP_REQUEST" in reason or "RECORD" in reason:
            return "not_tls", "it does not speak TLS (plain text on a TLS port?)"
        if "VERSION" in reason or "PROTOCOL" in reason:
            return "protocol_version", "it offers no TLS version this node accepts (1.2 at least)"
        return "other", f"TLS error {exc.reason or exc}"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        # What a peer that refused our certificate does in TLS 1.3 (it has none to
        # refuse in 1.2: the handshake fails with its alert instead).
        return "other", "it closed the connection during the handshake (our certificate refused?)"
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return "other", text


#: Socket buffer size asked for; the kernel caps it at net.core.rmem_max/wmem_max.
UDP_BUFFER_BYTES = 8 * 1024 * 1024


def _enlarge_buffers(transport: asyncio.BaseTransport) -> None:
    """Give the UDP socket room for bursts.

    With the default 208 KB a burst of a few hundred KDMQ requests (a sync, or many
    senders at once) overflows the receive buffer while the loop is busy, and every
    lost datagram costs a T1 retransmission. Kamailio sizes its buffers up the same way.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER_BYTES)
        except OSError as exc:
            log.debug("cannot enlarge UDP buffer: %s", exc)
