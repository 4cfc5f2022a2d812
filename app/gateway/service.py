"""The gateway as one service: the only object the HTTP API and the command line use.

:class:`Gateway` owns the DMQ node's driver (:class:`~app.transport.server.DmqServer`)
and the :class:`~app.gateway.hub.Hub` of peers. Everything a client can ask for goes
through one of its methods, which validate their input once and raise errors that carry
``status_hint`` (the core's :class:`~app.dmq.errors.DmqUsageError` and the gateway's
:class:`~app.gateway.errors.GatewayError`), so the API needs no knowledge of the node.

Stopping comes in two steps because the HTTP server waits for requests in flight before
it runs the application's shutdown: :meth:`Gateway.begin_stop` is called as soon as a
stop is asked for, and answers every request waiting for results (``503``) and ends
every subscription; :meth:`Gateway.stop` then leaves the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import math
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from app.dmq.errors import MessageTooLargeError, NodeStoppedError
from app.dmq.events import Delivery, NodeResult, SendOperation
from app.dmq.nodes import Node, NodeStatus
from app.dmq.outbox import DROP_REASONS
from app.dmq.peers import ORIGIN_HEADER, PeerHandler, PeerInit, PeerReply
from app.dmq.sip import SipUri
from app.gateway import bundle
from app.gateway.config import GatewayConfig
from app.gateway.errors import InvalidNodeUriError, LocalNodeError
from app.gateway.hub import Ending, Hub, PeerChannel, Subscriber, Subscription
from app.gateway.models import (
    Dispatch,
    GatewayStats,
    HealthInfo,
    NodeInfo,
    NodeOutcome,
    PeerInfo,
    PeerSettings,
    PeerStats,
)
from app.gateway.reorder import FILL_BUCKETS
from app.gateway.store import StateStore
from app.transport.dns import DnsResolutionError
from app.transport.server import DmqServer

log = logging.getLogger("dmq.gateway")

#: A label of a host name: letters, digits, '-' and (leniently) '_', at most 63.
_HOST_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")

#: Seconds between checkpoints of the state store's WAL.
CHECKPOINT_INTERVAL = 1.0
#: Longest the gateway holds its commits for a checkpoint's last pass, in seconds
#: (see Gateway._checkpoint_loop); a durable message's 200 can wait that long more.
CHECKPOINT_HOLD = 0.02
#: Frames the WAL holds (4 KiB pages each: 16 MiB) before a checkpoint holds the
#: commits to let it start over: at 1 000 messages/s once every 4-5 s rather than
#: every second, so that fewer messages wait the few milliseconds of a hold.
CHECKPOINT_HOLD_FRAMES = 4096

_Start = Callable[[], tuple[SendOperation, asyncio.Future[SendOperation]]]


async def checkpoint_loop(
    store: StateStore,
    hub: Hub,
    *,
    interval: float = CHECKPOINT_INTERVAL,
    hold: float = CHECKPOINT_HOLD,
    hold_frames: int = CHECKPOINT_HOLD_FRAMES,
) -> None:
    """Fold the store's WAL into the database every ``interval`` s, in a worker
    thread, and let the WAL start over each time.

    The first pass runs beside the commits and does nearly all the copying and
    syncing. Under a steady load commits land while it runs, which it leaves in the
    WAL; the WAL can then not start over, and it would grow without end (2.5 MB/s at
    1 000 messages/s, every pass and the commits beside it slower as it grew). So a
    second pass follows with the turn's commits held (:meth:`Hub.hold_commits`): it
    has only the first pass's few frames left to copy, and when it is done the next
    commit starts the WAL from its beginning. That is done once the WAL holds
    ``hold_frames`` frames, so the WAL stays within about that size; the first
    passes keep the copying incremental meanwhile. The hold lasts at most ``hold``
    s; past it the commits go on, and that round the WAL grows. With nothing written
    since the last held pass there is nothing to hold for."""
    settled = -1
    while True:
        await asyncio.sleep(interval)
        try:
            frames = await asyncio.to_thread(store.checkpoint)
            if frames == settled or frames < hold_frames:
                continue
            hub.hold_commits()
            try:
                last = asyncio.ensure_future(asyncio.to_thread(store.checkpoint))
                done, _ = await asyncio.wait((last,), timeout=hold)
            finally:
                hub.release_commits()
            if not done:
                hub.checkpoint_holds_cut += 1
            settled = await last
        except sqlite3.Error as exc:
            log.warning("state store checkpoint failed (retried): %s", exc)


@dataclass(frozen=True, slots=True)
class StoreStats:
    """The state store's work, for /metrics."""

    #: Group commits, and the KDMQ messages answered through them.
    batches: int
    batched: int
    #: WAL checkpoint passes, those run with the commits held (so that the WAL
    #: starts over), those whose hold ended first, and the WAL at the last pass: its
    #: frames, and its file's size.
    checkpoints: int
    checkpoint_holds: int
    checkpoint_holds_cut: int
    wal_frames: int
    wal_bytes: int


class Gateway:
    """One gateway: a DMQ node, its peers, and what clients may do with them."""

    def __init__(self, config: GatewayConfig) -> None:
        if bundle.OPTION_TAG not in config.node.option_tags:
            # Every gateway reads bundles; the node says so on what it sends.
            node = dataclasses.replace(
                config.node, option_tags=(*config.node.option_tags, bundle.OPTION_TAG)
            )
            config = dataclasses.replace(config, node=node)
        self.config = config
        self._server = DmqServer(config.node, drop_rate=config.drop_rate)
        self._store = (
            StateStore(config.state_dir, sync=config.history_sync)
            if config.state_dir is not None
            else None
        )
        self._hub = Hub(
            self._server,
            self._store,
            queue_limit=config.queue_limit,
            history_store=config.history_store,
            reorder_wait=config.effective_reorder_wait,
            reorder_limit=config.reorder_limit,
        )
        #: Tags message ids of this process, so ids from before a restart never clash.
        self.instance = secrets.token_hex(4)
        self._checkpoints: asyncio.Task[None] | None = None
        #: Completed by begin_stop(); requests waiting for results wait on it too.
        self._stopping: asyncio.Future[None] | None = None
        #: Run by begin_stop(): what else streams to clients (the Kamailio mirrors'
        #: change streams) ends its subscriptions then too.
        self._stop_callbacks: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Register the stored and --peer peers, then start the node."""
        self._stopping = asyncio.get_running_loop().create_future()
        if self._store is not None:
            self._store.open()
        loaded = self._hub.load()
        for peer_id in self.config.startup_peers:
            if peer_id not in self._hub.channels:
                self._hub.register(
                    peer_id, PeerSettings(description="--peer"), persist=False, ephemeral=True
                )
        await self._server.start()
        self._hub.start_timer()
        if self._store is not None:
            self._checkpoints = asyncio.create_task(checkpoint_loop(self._store, self._hub))
        log.info(
            "gateway up: %d stored peers, %d from --peer", loaded, len(self.config.startup_peers)
        )

    @property
    def stopping(self) -> bool:
        return self._stopping is not None and self._stopping.done()

    def begin_stop(self) -> None:
        """A stop was asked for: answer every waiting request, end every subscription."""
        if self._stopping is not None and not self._stopping.done():
            self._stopping.set_result(None)
        self._hub.end_subscriptions(Ending.STOPPING)
        for callback in self._stop_callbacks:
            callback()

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when a stop is asked for (:meth:`begin_stop`)."""
        self._stop_callbacks.append(callback)

    async def subscriptions_ended(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until every subscriber has been let go."""
        deadline = asyncio.get_running_loop().time() + timeout
        channels = self._hub.channels.values()
        while any(c.subscribers for c in channels):
            if asyncio.get_running_loop().time() >= deadline:
                return
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        """Leave the bus gracefully and close the node's sockets."""
        self.begin_stop()
        self._hub.stop_timer()
        await self._server.stop()
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoints
            self._checkpoints = None
        if self._store is not None:
            self._store.close()

    # ------------------------------------------------------------------ health, stats

    def health(self) -> HealthInfo:
        server = self._server
        node = server.node
        uptime = 0.0
        if server.started_at is not None and server.running:
            uptime = server.loop_time() - server.started_at
        stopping = node.stopped or self.stopping
        return HealthInfo(
            node=str(node.nodes.local.uri),
            status="stopping" if stopping else "active",
            uptime=round(uptime, 3),
            active_nodes=len(node.nodes.active_others()),
        )

    def stats(self) -> GatewayStats:
        node = self._server.node
        stats = node.stats
        tx = node.transactions.stats
        by_status = dict.fromkeys((s.value for s in NodeStatus), 0)
        for other in node.nodes.others():
            by_status[other.status.value] += 1
        return GatewayStats(
            received=dict(stats.received),
            sent=dict(stats.sent),
            retransmissions_sent=tx.retransmissions_sent,
            retransmissions_absorbed=tx.retransmissions_absorbed,
            responses_resent=tx.responses_resent,
            transaction_timeouts=tx.timeouts,
            transport_errors=tx.transport_errors,
            malformed_answered=stats.malformed_answered,
            malformed_dropped=stats.malformed_dropped,
            forbidden=stats.forbidden,
            reply_timeouts=stats.reply_timeouts,
            nodes_by_status=by_status,
            peers=tuple(
                PeerStats(c.peer_id, len(c.subscribers), c.overflows, len(c.history), c.received)
                for c in sorted(self._hub.channels.values(), key=lambda c: c.peer_id)
            ),
            outboxes={str(box.node): (box.messages, box.bytes) for box in node.outboxes()},
            outbox_queued=stats.outbox_queued,
            outbox_resent=stats.outbox_resent,
            outbox_delivered=stats.outbox_delivered,
            outbox_dropped={reason: stats.outbox_dropped.get(reason, 0) for reason in DROP_REASONS},
            duplicates=self._hub.duplicates,
            gaps=self._hub.reorderer.gaps,
            held=self._hub.reorderer.held(),
            hole_fills=tuple(
                zip((*FILL_BUCKETS, math.inf), self._hub.reorderer.fills, strict=True)
            ),
            hole_fill_seconds=self._hub.reorderer.fill_sum,
            late_after_gap=self._hub.reorderer.late,
            held_peak=self._hub.reorderer.held_peak,
            outbox_parked=stats.outbox_parked,
            outbox_unparked=stats.outbox_unparked,
            transport={
                item.name: getattr(self._server.stats, item.name)
                for item in dataclasses.fields(self._server.stats)
            },
        )

    def store_stats(self) -> StoreStats | None:
        """The state store's group commits and checkpoints; None without a store."""
        store = self._store
        if store is None:
            return None
        hub = self._hub
        return StoreStats(
            batches=hub.batches,
            batched=hub.batched,
            checkpoints=store.checkpoints,
            checkpoint_holds=hub.checkpoint_holds,
            checkpoint_holds_cut=hub.checkpoint_holds_cut,
            wal_frames=store.wal_frames,
            wal_bytes=store.wal_bytes(),
        )

    def bundle_stats(self) -> bundle.BundleStats:
        """Bundles sent and received (:mod:`app.gateway.bundle`), for /metrics."""
        return self._hub.bundle_stats

    # ------------------------------------------------------------------ nodes

    def nodes(self) -> list[NodeInfo]:
        """Every node of the bus as this node sees it, this node first."""
        return [self._node_info(node) for node in self._server.node.nodes]

    def node_agents(self) -> dict[str, str]:
        """``host:port`` -> what each other node says it runs (its User-Agent or Server
        header; empty until it has sent us a request or answered a membership message)."""
        return {f"{node.host}:{node.port}": node.agent for node in self._server.node.nodes.others()}

    async def resolve_node(self, text: str, *, must_resolve: bool = False) -> SipUri:
        """Parse a node URI and resolve its host name without blocking the loop.

        The node keeps the answer and identifies nodes so named by it. ``must_resolve``: a name
        without an address, or an address of another IP version than this node's, is
        refused (a node to add must be reachable).
        """
        uri = _parse_node_uri(text)
        address = uri.host
        if _ip(uri.host) is None:
            try:
                address = await self._server.resolve_node(uri)
            except DnsResolutionError:
                if must_resolve:
                    raise InvalidNodeUriError(
                        f"uri: {uri.host!r} does not resolve to an address"
                    ) from None
                return uri
        if must_resolve:
            local, target = _ip(self._server.node.nodes.local.resolved_ip), _ip(address)
            if local is not None and target is not None and local.version != target.version:
                raise InvalidNodeUriError(
                    f"uri: {uri.host} is an IPv{target.version} address, and this node "
                    f"listens on IPv{local.version} only"
                )
        return uri

    async def add_node(self, text: str) -> NodeInfo:
        """Add a node and send it our node list (Kamailio's ``dmq.add``).

        A ``;transport=tls`` node needs this gateway's TLS settings: without a CA to
        check its certificate against and an identity to present, it could not be
        reached, and the caller is told so rather than left with a node that never
        answers.
        """
        uri = await self.resolve_node(text, must_resolve=True)
        if uri.transport == "tls" and self._server.config.tls is None:
            raise InvalidNodeUriError(
                f"uri: {uri} is reached over TLS, and this gateway has no TLS settings "
                "(start it with --tls-cert, --tls-key and --tls-ca)"
            )
        if self._server.node.nodes.is_local(uri):
            raise LocalNodeError(f"{uri} is this node itself")
        return self._node_info(self._server.add_node(uri))

    async def remove_node(self, text: str) -> None:
        """Remove a node (Kamailio's ``dmq.remove``); raises UnknownNodeError."""
        uri = await self.resolve_node(text)
        if self._server.node.nodes.is_local(uri):
            raise LocalNodeError(f"{text} is this node itself; stop the gateway to leave")
        self._server.remove_node(uri)

    def _node_info(self, node: Node) -> NodeInfo:
        last_reply = None
        server = self._server
        if node.last_reply is not None and server.running:
            last_reply = round(time.time() - (server.loop_time() - node.last_reply), 3)
        return NodeInfo(
            uri=str(node.uri),
            host=node.host,
            port=node.port,
            transport=node.transport,
            status=node.status.value,
            local=node.local,
            last_reply=last_reply,
            failures=node.failures,
        )

    # ------------------------------------------------------------------ peers

    def peers(self) -> list[PeerInfo]:
        return [_peer_info(channel) for channel in self._hub.channels.values()]

    def peer(self, peer_id: str) -> PeerInfo:
        return _peer_info(self._hub.channel(peer_id))

    def put_peer(self, peer_id: str, settings: PeerSettings) -> tuple[PeerInfo, bool]:
        """Register or update a peer; return it and whether it is new."""
        channel, created = self._hub.register(peer_id, settings)
        return _peer_info(channel), created

    def delete_peer(self, peer_id: str) -> None:
        self._hub.unregister(peer_id)

    # ------------------------------------------------------------------ messages

    async def broadcast(
        self,
        peer_id: str,
        body: bytes,
        content_type: str | None,
        *,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Dispatch:
        """Send to every active node but this one; with ``wait``, every node's result."""
        server, hub = self._server, self._hub
        return await self._dispatch(
            lambda: hub.stamped(
                peer_id,
                "",
                lambda headers: server.broadcast_nowait(
                    peer_id, body, content_type, headers=headers
                ),
            ),
            wait,
            timeout,
        )

    async def send(
        self,
        peer_id: str,
        node: str,
        body: bytes,
        content_type: str | None,
        *,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Dispatch:
        """Send to one node of the list, whatever its status; raises UnknownNodeError."""
        target = await self.resolve_node(node)
        server, hub = self._server, self._hub
        return await self._dispatch(
            lambda: hub.stamped(
                peer_id,
                # Only names the stream of sends to that node: its parameters are left out.
                str(target).split(";", 1)[0],
                lambda headers: server.send_nowait(
                    peer_id, body, content_type, target, headers=headers
                ),
            ),
            wait,
            timeout,
        )

    async def send_batch(
        self,
        peer_id: str,
        messages: Sequence[tuple[bytes, str | None]],
        *,
        node: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> list[Dispatch]:
        """Broadcast (or, with ``node``, send to that node) each ``(body, content_type)``
        in order; one :class:`Dispatch` per message, in the same order.

        Every message is checked before the first is sent, so a refused batch sends
        nothing. They leave in order in one turn of the loop; the node's cap on
        messages in flight per node (``max_in_flight_per_node``) holds back the rest
        of a large batch, in order, so that no receiver's socket buffer overflows.
        """
        if self.stopping:
            raise NodeStoppedError("the gateway is stopping and sends nothing more")
        target = await self.resolve_node(node) if node is not None else None
        # The X-DMQ-Origin header the hub adds takes a little more than this.
        limit = self._server.node.max_body_size - 256
        for index, (body, _) in enumerate(messages):
            if len(body) > limit:
                raise MessageTooLargeError(
                    f"message {index} of the batch: a body of {len(body)} bytes does not fit "
                    f"in one message on this transport (at most {limit} bytes)"
                )
        # All in this one turn of the loop: the hub commits their origin seqs at once
        # (the turn's group commit), and they leave after it, in order.
        started = self.publish_run(peer_id, messages, target)
        committed = self._hub.committed()
        if committed is not None:
            await committed
        if not wait or not started:
            return [self.dispatch_of(sent) for sent in started]
        stopping = self._stopping
        assert stopping is not None
        limit_s = timeout if timeout is not None else self.config.node.timers.timer_f_value + 1
        waiters = list({id(w): w for sent in started for w in sent.waiters}.values())
        everything = asyncio.ensure_future(asyncio.wait(waiters))
        try:
            await asyncio.wait(
                (everything, stopping), timeout=limit_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            everything.cancel()
        if stopping.done() and not all(w.done() and w.exception() is None for w in waiters):
            raise NodeStoppedError("the gateway is stopping; the results will not be known")
        return [self.dispatch_of(sent, results=True) for sent in started]

    def publish_run(
        self,
        peer_id: str,
        messages: Sequence[tuple[bytes, str | None]],
        target: SipUri | None = None,
    ) -> list[Published]:
        """Broadcast (or send to ``target``, a node :meth:`resolve_node` returned) a run
        of ``(body, content_type)`` messages now, in order; one :class:`Published`
        per message, whose waiters complete when every node has answered or timed out
        (:meth:`dispatch_of` then gives its results), or fail when the node stops.

        Each node that reads bundles (it sent ``Supported: dmq-bundle``) gets the
        run packed into bundles of at most ``bundle_max_messages`` messages and
        ``bundle_max_bytes``; every other node gets one request per message, as
        before. Either way a message's seq is the same, so a receiver sees one stream.
        Raises what a broadcast raises (no such peer, too large, stopping) before
        anything of the run is sent."""
        if self.stopping:
            raise NodeStoppedError("the gateway is stopping and sends nothing more")
        node = self._server.node
        config = self.config
        if target is None:
            targets = node.broadcast_targets()
        else:
            found = node.send_target(target)
            targets = [found] if found is not None else []
        bundlers = sum(1 for n in targets if _reads_bundles(n))
        if len(messages) < 2 or not bundlers or config.bundle_max_messages < 2:
            return [self._publish_one(peer_id, body, ct, target) for body, ct in messages]
        max_bytes = min(config.bundle_max_bytes, node.max_body_size - 256)
        sizes = [bundle.entry_size(ct, body) if bundle.fits(ct) else -1 for body, ct in messages]
        published: list[Published] = []
        for start, stop in bundle.chunks(sizes, config.bundle_max_messages, max_bytes):
            if stop - start == 1:
                body, ct = messages[start]
                published.append(self._publish_one(peer_id, body, ct, target))
            else:
                published.extend(
                    self._publish_bundle(
                        peer_id, messages[start:stop], target, singles=bundlers < len(targets)
                    )
                )
        return published

    def _publish_one(
        self, peer_id: str, body: bytes, content_type: str | None, target: SipUri | None
    ) -> Published:
        server = self._server
        if target is None:
            operation, waiter = self._hub.stamped(
                peer_id,
                "",
                lambda headers: server.broadcast_nowait(
                    peer_id, body, content_type, headers=headers
                ),
            )
        else:
            operation, waiter = self._hub.stamped(
                peer_id,
                _stream_name(target),
                lambda headers: server.send_nowait(
                    peer_id, body, content_type, target, headers=headers
                ),
            )
        waiter.add_done_callback(_retrieve)
        return Published(operation.id, peer_id, (operation,), (waiter,))

    def _publish_bundle(
        self,
        peer_id: str,
        run: Sequence[tuple[bytes, str | None]],
        target: SipUri | None,
        *,
        singles: bool,
    ) -> list[Published]:
        """One bundle of ``run`` to each node that reads bundles and, with
        ``singles``, one request per message to each other node (a broadcast); all
        with the same consecutive seqs."""
        server, hub = self._server, self._hub
        to = "" if target is None else _stream_name(target)
        count = len(run)

        def start(first: int) -> list[Published]:
            alone: list[tuple[SendOperation, asyncio.Future[SendOperation]]] = []
            if singles:
                for index, (body, ct) in enumerate(run):
                    header = ((ORIGIN_HEADER, hub.origin_value(first + index, to)),)
                    alone.append(
                        server.broadcast_nowait(
                            peer_id, body, ct, headers=header, only=_reads_no_bundles
                        )
                    )
            header = ((ORIGIN_HEADER, hub.origin_value(first, to, count)),)
            body = bundle.encode(run)
            if target is None:
                operation, waiter = server.broadcast_nowait(
                    peer_id, body, bundle.CONTENT_TYPE, headers=header, only=_reads_bundles
                )
            else:
                operation, waiter = server.send_nowait(
                    peer_id, body, bundle.CONTENT_TYPE, target, headers=header
                )
            waiter.add_done_callback(_retrieve)
            hub.bundle_stats.sent(count)
            if alone:
                for _, single in alone:
                    single.add_done_callback(_retrieve)
                return [
                    Published(op.id, peer_id, (op, operation), (single, waiter))
                    for op, single in alone
                ]
            first_id = server.node.reserve_ids(count)
            return [
                Published(first_id + index, peer_id, (operation,), (waiter,))
                for index in range(count)
            ]

        return hub.stamped_run(peer_id, to, count, start)

    def dispatch_of(
        self, operation: SendOperation | Published, *, results: bool = False
    ) -> Dispatch:
        """What the API says of a started message: its id and targets, and with
        ``results`` every node's result so far (a node yet to answer: timed out). A
        bundled message's result from a node is the bundle's."""
        if isinstance(operation, Published):
            targets = tuple(t for part in operation.parts for t in part.targets)
            answered = [r for part in operation.parts for r in part.results]
        else:
            targets, answered = operation.targets, operation.results
        return Dispatch(
            f"{self.instance}-{operation.id}",
            operation.peer_id,
            tuple(str(t) for t in targets),
            _outcomes(targets, answered) if results else None,
        )

    async def _dispatch(self, start: _Start, wait: bool, timeout: float | None) -> Dispatch:
        if self.stopping:
            raise NodeStoppedError("the gateway is stopping and sends nothing more")
        operation, waiter = start()
        # The node fails the waiter when it stops; nobody may be left to read that.
        waiter.add_done_callback(_retrieve)
        message_id = f"{self.instance}-{operation.id}"
        targets = tuple(str(t) for t in operation.targets)
        committed = self._hub.committed()
        if committed is not None:
            await committed  # the answer says the message has left, as before
        if not wait:
            return Dispatch(message_id, operation.peer_id, targets)
        stopping = self._stopping
        assert stopping is not None  # start() ran: the node accepted the send
        limit = timeout if timeout is not None else self.config.node.timers.timer_f_value + 1
        await asyncio.wait((waiter, stopping), timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        if waiter.done() and waiter.exception() is not None:
            raise NodeStoppedError("the gateway is stopping; the results will not be known")
        if not waiter.done() and stopping.done():
            raise NodeStoppedError("the gateway is stopping; the results will not be known")
        return Dispatch(
            message_id,
            operation.peer_id,
            targets,
            _outcomes(operation.targets, operation.results),
        )

    # ------------------------------------------------------------------ subscribers

    def subscribe(
        self, peer_id: str, since: int | None, epoch: str | None, queue_bytes: int | None = None
    ) -> Subscription:
        """Subscribe to a peer: ``since`` resumes after that offset (of ``epoch``).

        ``queue_bytes`` bounds the frames queued for the subscriber, replay pages
        included (the hub's default, 4 MiB, when None).
        """
        if self.stopping:
            raise NodeStoppedError("the gateway is stopping")
        return self._hub.subscribe(peer_id, since, epoch, queue_bytes)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._hub.unsubscribe(subscriber)

    def attach_tap(
        self,
        peer_id: str,
        handler: PeerHandler,
        *,
        init: PeerInit | None = None,
        description: str = "",
    ) -> None:
        """Let a typed mirror see every message of ``peer_id``, beside any raw peer of
        that id (see :meth:`Hub.attach_tap`). Call before :meth:`start`."""
        self._hub.attach_tap(peer_id, handler, init=init, description=description)

    def send_once(
        self, peer_id: str, node: SipUri, body: bytes, content_type: str | None
    ) -> tuple[SendOperation, asyncio.Future[SendOperation]]:
        """Send to one node exactly once: no retransmission, no outbox, no origin stamp
        (a sync request, which a Kamailio node would answer again for every copy)."""
        if self.stopping:
            raise NodeStoppedError("the gateway is stopping and sends nothing more")
        operation, waiter = self._server.send_once_nowait(peer_id, body, content_type, node)
        waiter.add_done_callback(_retrieve)
        return operation, waiter

    def reply(self, peer_id: str, message_id: str, reply: PeerReply) -> None:
        """A subscriber's reply to a message of a ``reply: subscriber`` peer; raises
        ReplyNotPendingError saying why when the message no longer waits for one."""
        self._hub.reply(peer_id, message_id, reply)


def _retrieve(future: asyncio.Future[SendOperation]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass(slots=True, eq=False)
class Published:
    """One message of a run as it was sent: its id, the operations that carry it (a
    single request to some nodes, a bundle to others) and their waiters."""

    id: int
    peer_id: str
    parts: tuple[SendOperation, ...]
    waiters: tuple[asyncio.Future[SendOperation], ...]


def _reads_bundles(node: Node) -> bool:
    return bundle.OPTION_TAG in node.option_tags


def _reads_no_bundles(node: Node) -> bool:
    return bundle.OPTION_TAG not in node.option_tags


def _stream_name(target: SipUri) -> str:
    """Names the stream of sends to a node: its parameters are left out."""
    return str(target).split(";", 1)[0]


def _outcomes(targets: Sequence[SipUri], results: Sequence[NodeResult]) -> tuple[NodeOutcome, ...]:
    answered: dict[str, NodeResult] = {str(r.node): r for r in results}
    outcomes = []
    for target in targets:
        node = str(target)
        result = answered.get(node)
        if result is None:
            outcomes.append(NodeOutcome(node, None, None, timed_out=True))
        elif result.outcome is not Delivery.DELIVERED:
            # Queued for a resend, or dropped: the reason says why (a local 408 or none).
            outcomes.append(
                NodeOutcome(
                    node,
                    None,
                    result.reason,
                    outcome=result.outcome.value,
                    timed_out=result.timed_out,
                )
            )
        elif result.timed_out or result.transport_error:
            outcomes.append(NodeOutcome(node, None, None, outcome=None, timed_out=True))
        else:
            outcomes.append(
                NodeOutcome(
                    node,
                    result.code,
                    result.reason,
                    result.content_type,
                    result.body,
                    outcome=result.outcome.value,
                )
            )
    return tuple(outcomes)


def _peer_info(channel: PeerChannel) -> PeerInfo:
    settings = channel.settings
    return PeerInfo(
        peer_id=channel.peer_id,
        description=settings.description,
        reply=settings.reply,
        reply_timeout=settings.reply_timeout,
        history=settings.history,
        history_max_age=settings.history_max_age,
        history_bytes=settings.history_bytes,
        epoch=channel.epoch,
        offset=channel.offset,
        history_size=len(channel.history),
        subscribers=len(channel.subscribers),
        received=channel.received,
        persistent=not channel.ephemeral,
    )


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_host(host: str) -> bool:
    """An IP address, or a syntactically valid (ASCII) host name."""
    if _ip(host) is not None:
        return True
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in name.split("."))


def _parse_node_uri(text: str) -> SipUri:
    try:
        uri = SipUri.parse(text)
    except ValueError as exc:
        raise InvalidNodeUriError(f"uri: {exc}") from None
    if uri.transport not in ("udp", "tcp", "tls"):
        raise InvalidNodeUriError(
            f"uri: transport {uri.transport!r} is not supported (udp, tcp, tls)"
        )
    # Anything else would reach the resolver and the socket layer, which refuse it.
    if not _is_host(uri.host):
        raise InvalidNodeUriError(f"uri: {uri.host!r} is not an IP address or a host name")
    return uri
