"""The asyncio driver: real UDP and TCP sockets around the sans-IO :class:`DmqNode`.

The driver owns everything the core must not touch: sockets, the loop's clock, one
loop timer and DNS. Peer handlers are the core's own synchronous handlers: one that
answers later returns ``None`` and calls :meth:`DmqServer.reply` when it can, and the
core alone times it out (the peer's ``reply_timeout``). After every input
it *flushes*: sends what the core queued, hands out its events, and re-arms the single
timer at :meth:`DmqNode.get_timer` (the aioquic adapter shape). It runs on the default
loop and on uvloop.

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

``drop_rate`` drops that fraction of UDP datagrams, in and out, at the seam between
socket and core: fault injection for tests of retransmission, nothing else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from app.dmq.cache import BoundedCache
from app.dmq.config import NodeConfig
from app.dmq.errors import ConfigError, NodeStoppedError
from app.dmq.events import Event, HostLookupNeeded, SendCompleted, SendOperation
from app.dmq.node import DmqNode, ExtraHeaders
from app.dmq.nodes import Node
from app.dmq.peers import Peer, PeerHandler, PeerInit, PeerReply
from app.dmq.sip import SipParseError, SipUri, StreamFramer
from app.dmq.transaction import Endpoint
from app.transport import dns

log = logging.getLogger("dmq.transport")

#: Seconds a host name look-up may take before it counts as failed.
DNS_TIMEOUT = 5.0
#: Seconds a failed look-up is remembered (the name is not asked about meanwhile).
DNS_NEGATIVE_TTL = 30.0
#: Host names (and destination hosts) whose address or failure is remembered.
NAME_CACHE_SIZE = 4096

#: Called with every event of the core but :class:`SendCompleted` (which completes
#: the future of its broadcast or send): node status changes, peer reply timeouts.
EventListener = Callable[[Event], None]


def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


@dataclass(slots=True)
class TransportStats:
    """The driver's own counters, next to the core's (``node.stats``) and the
    transactions' (``node.transactions.stats``), for metrics and tests."""

    #: UDP datagrams dropped on purpose (``drop_rate``), in and out.
    dropped_datagrams: int = 0
    #: TCP connections closed because their stream could not be framed as SIP.
    stream_errors: int = 0


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

    def __call__(self, host: str) -> str | None:
        literal = _ip_literal(host)
        if literal is not None:
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

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.server._datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the transaction's timers deal with it.
        log.debug("UDP error: %s", exc)


class _StreamProtocol(asyncio.Protocol):
    """One TCP connection, inbound or outbound."""

    def __init__(self, server: DmqServer, remote: tuple[str, int] | None = None) -> None:
        self.server = server
        self.id = server._next_connection_id()
        self.framer = StreamFramer(server.config.max_stream_message)
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = remote or ("", 0)
        #: For outbound connections: the node address it was opened to.
        self.remote = remote
        self.pending: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        if peername:
            self.peer = (str(peername[0]), int(peername[1]))
        self.server._connections[self.id] = self
        for data in self.pending:
            self.transport.write(data)
        self.pending.clear()

    def write(self, data: bytes) -> None:
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.framer.feed(data)
        except SipParseError as exc:
            self.server.stats.stream_errors += 1
            log.warning("closing TCP connection from %s:%s: %s", *self.peer, exc.reason)
            if self.transport is not None:
                self.transport.close()
            return
        for message in messages:
            self.server._stream_message(message, self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
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
        dns_timeout: float = DNS_TIMEOUT,
        dns_negative_ttl: float = DNS_NEGATIVE_TTL,
    ) -> None:
        if not 0.0 <= drop_rate < 1.0:  # also refuses NaN
            raise ConfigError("must be at least 0 and below 1", field="drop_rate", value=drop_rate)
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self.resolver = _HostCache(self._clock)
        self.node = DmqNode(config, resolver=self.resolver)
        #: Seconds one host name look-up may take before it counts as failed.
        self.dns_timeout = dns_timeout
        #: Seconds a failed look-up is remembered before the name is asked about again.
        self.dns_negative_ttl = dns_negative_ttl
        #: Look-ups in progress, by lower-case name.
        self._lookups: dict[str, asyncio.Task[str]] = {}
        #: Destination host (as the core names it) -> address for the socket.
        self._send_addresses: BoundedCache[str, str] = BoundedCache(NAME_CACHE_SIZE)
        self.drop_rate = drop_rate
        self._drop_rng = random.Random(seed)
        self._dns_resolver = dns_resolver
        self.stats = TransportStats()
        self.event_listeners: list[EventListener] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp_server: asyncio.AbstractServer | None = None
        self._connections: dict[int, _StreamProtocol] = {}
        self._outbound: dict[tuple[str, int], _StreamProtocol] = {}
        self._connection_ids = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._waiters: dict[int, asyncio.Future[SendOperation]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Set when stop() begins: no new broadcast or send is accepted from then on.
        self._stopping = False
        self.started_at: float | None = None

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
        self._loop = loop
        local = self.config.server_address
        bind_host = await self._resolve_start_host(local.host, "server_address")
        port = local.effective_port
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(bind_host, port)
        )
        _enlarge_buffers(self._udp)
        self._tcp_server = await loop.create_server(
            lambda: _StreamProtocol(self), bind_host, port, reuse_address=True
        )
        for address in await self._notification_targets():
            self.node.add_notification_address(address)
        if _ip_literal(local.host) is None:
            self.node.host_resolved(local.host, bind_host, loop.time())
        self.started_at = loop.time()
        self.node.start(loop.time())
        self._flush()
        log.info("DMQ node %s listening on %s:%d (udp, tcp)", local, bind_host, port)

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
        if self._udp is not None:
            self._udp.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
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

    def broadcast_nowait(
        self,
        peer_id: str,
        body: bytes,
        content_type: str | None,
        *,
        headers: ExtraHeaders = (),
    ) -> tuple[SendOperation, asyncio.Future[SendOperation]]:
        """Start a broadcast; the future completes with every node's result, or with
        :class:`NodeStoppedError` if the node stops first. ``headers`` are extra
        ``(name, value)`` headers for the KDMQ requests (:meth:`DmqNode.broadcast`)."""
        operation = self.node.broadcast(
            peer_id, body, content_type, self._send_clock(), headers=headers
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

    def _lookup(self, name: str) -> asyncio.Task[str]:
        task = self._lookups.get(name)
        if task is None:
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

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        self.node.receive(data, Endpoint("udp", str(addr[0]), int(addr[1])), loop.time())
        self._flush()

    def _stream_message(self, data: bytes, connection: _StreamProtocol) -> None:
        loop = self._loop
        if loop is None:
            return
        source = Endpoint("tcp", connection.peer[0], connection.peer[1], connection.id)
        self.node.receive(data, source, loop.time())
        self._flush()

    def _next_connection_id(self) -> int:
        self._connection_ids += 1
        return self._connection_ids

    def _connection_lost(self, connection: _StreamProtocol) -> None:
        self._connections.pop(connection.id, None)
        if connection.remote is not None and self._outbound.get(connection.remote) is connection:
            del self._outbound[connection.remote]

    def _flush(self) -> None:
        node = self.node
        for data, destination in node.datagrams_to_send():
            self._send(data, destination)
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

    def _send(self, data: bytes, destination: Endpoint) -> None:
        if destination.transport == "udp":
            if self.drop_rate and self._drop_rng.random() < self.drop_rate:
                self.stats.dropped_datagrams += 1
                return
            address = self._address_of(destination.host)
            if address is None:
                # A node known by name whose look-up has not succeeded: a socket given
                # the name would resolve it, blocking the loop. Timer E sends again.
                log.debug("%s is not resolved yet; datagram not sent", destination.host)
                return
            if self._udp is not None:
                try:
                    self._udp.sendto(data, (address, destination.port))
                except (OSError, ValueError) as exc:
                    # An address the socket can't reach (another family, a name that
                    # did not resolve): the transaction's timers report it as a timeout.
                    log.info("cannot send to %s:%s: %s", destination.host, destination.port, exc)
            return
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
        outbound.write(data)

    def _connect(self, key: tuple[str, int], destination: Endpoint) -> _StreamProtocol:
        protocol = _StreamProtocol(self, key)
        self._outbound[key] = protocol
        loop = self._loop
        assert loop is not None

        async def connect() -> None:
            try:
                # A host still named is resolved by the loop, in its executor.
                await loop.create_connection(lambda: protocol, key[0], key[1])
            except Exception as exc:
                log.info("TCP connect to %s:%s failed: %s", key[0], key[1], exc)
                protocol.closed = True
                if self._outbound.get(key) is protocol:
                    del self._outbound[key]
                if self._loop is not None:
                    self.node.transport_error(destination, self._loop.time())
                    self._flush()

        self._spawn(connect())
        return protocol


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
