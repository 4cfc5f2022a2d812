"""``GET /metrics``: Prometheus exposition through ``prometheus_client``.

The core counts with plain integers and knows nothing of Prometheus; a custom collector
reads the gateway's :meth:`~app.gateway.service.Gateway.stats` at each scrape. The
standard process and garbage-collector collectors are added to the same registry. The
format follows the scraper's ``Accept`` header (OpenMetrics when asked for, the
classic text format otherwise).
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from app.api.limits import GuardStats
from app.gateway import bundle
from app.gateway.service import Gateway
from app.transport.server import TLS_FAILURE_REASONS

router = APIRouter(prefix="/metrics", tags=["metrics"])

#: ``TransportStats`` field -> the ``reason`` label of ``dmq_tcp_refused_total``: every
#: TCP connection the driver closed (or never served) because a bound was reached.
TCP_REFUSALS = {
    "tcp_refused_total": "max_connections",
    "tcp_refused_per_source": "max_per_source",
    "tcp_idle_closed": "idle_timeout",
    "tcp_message_timeouts": "message_timeout",
    "tcp_untrusted_closed": "untrusted",
    "tcp_write_overflows": "write_overflow",
    "tcp_buffer_overflows": "buffer_overflow",
    "stream_errors": "stream_error",
}
#: ``TransportStats`` field -> the ``reason`` label of ``dmq_tls_peers_refused_total``:
#: inbound TLS peers refused for their certificate (mutual TLS as node trust).
TLS_PEER_REFUSALS = {
    "tls_in_no_certificate": "no_certificate",
    "tls_in_untrusted_certificate": "untrusted_certificate",
    "tls_in_expired_certificate": "expired_certificate",
    "tls_names_refused": "name_not_allowed",
}
#: ``GuardStats`` field -> the ``reason`` label of ``dmq_http_refused_total``.
HTTP_REFUSALS = {
    "http_connections_refused": "max_connections",
    "http_header_timeouts": "header_timeout",
    "http_headers_too_large": "headers_too_large",
    "http_unauthorized": "unauthorized",
    "http_bodies_too_large": "body_too_large",
    "ws_rate_limited": "ws_rate_limited",
}


class GatewayCollector(Collector):
    """Every counter of the node and the gateway, read at scrape time.

    ``guard`` is the API guard's refusal counters (``app.state.guard_stats``): they
    belong to the app around the gateway, not to the gateway, so they are handed in.
    """

    def __init__(self, gateway: Gateway, guard: GuardStats | None = None) -> None:
        self.gateway = gateway
        self.guard = guard

    def collect(self) -> Iterator[Metric]:
        stats = self.gateway.stats()
        for name, text, by_peer_code in (
            (
                "dmq_kdmq_received",
                "KDMQ requests received, by peer and the code answered",
                stats.received,
            ),
            (
                "dmq_kdmq_sent",
                "KDMQ requests sent, by peer and final code (408 = timeout)",
                stats.sent,
            ),
        ):
            family = CounterMetricFamily(name, text, labels=["peer", "code"])
            for (peer, code), count in sorted(by_peer_code.items()):
                family.add_metric([peer, str(code)], count)
            yield family
        for name, text, value in (
            (
                "dmq_retransmissions_sent",
                "requests retransmitted over UDP (Timer E)",
                stats.retransmissions_sent,
            ),
            (
                "dmq_retransmissions_absorbed",
                "retransmitted requests absorbed while the peer was answering",
                stats.retransmissions_absorbed,
            ),
            (
                "dmq_responses_resent",
                "retransmitted requests answered from the cached response",
                stats.responses_resent,
            ),
            (
                "dmq_transaction_timeouts",
                "requests that got no answer before Timer F (local 408)",
                stats.transaction_timeouts,
            ),
            (
                "dmq_transport_errors",
                "requests that could not be delivered (TCP connect failed)",
                stats.transport_errors,
            ),
            ("dmq_forbidden", "KDMQ refused because the source is not trusted", stats.forbidden),
            (
                "dmq_peer_reply_timeouts",
                "messages of reply=subscriber peers no subscriber answered within the peer's "
                "reply_timeout (the node answered 408)",
                stats.reply_timeouts,
            ),
        ):
            yield CounterMetricFamily(name, text, value=value)
        malformed = CounterMetricFamily(
            "dmq_malformed", "malformed SIP messages, answered or dropped", labels=["action"]
        )
        malformed.add_metric(["answered"], stats.malformed_answered)
        malformed.add_metric(["dropped"], stats.malformed_dropped)
        yield malformed
        nodes = GaugeMetricFamily(
            "dmq_nodes", "other nodes of the bus, by status", labels=["status"]
        )
        for status, count in stats.nodes_by_status.items():
            nodes.add_metric([status], count)
        yield nodes
        peers = stats.peers
        clients = GaugeMetricFamily(
            "dmq_websocket_clients", "WebSocket subscribers, by peer", labels=["peer"]
        )
        overflows = CounterMetricFamily(
            "dmq_websocket_queue_overflows",
            "subscribers cut off because their send queue overflowed, by peer",
            labels=["peer"],
        )
        history = GaugeMetricFamily(
            "dmq_peer_history_size", "messages held in a peer's history", labels=["peer"]
        )
        received = CounterMetricFamily(
            "dmq_peer_messages", "messages delivered to a peer", labels=["peer"]
        )
        for one in peers:
            clients.add_metric([one.peer_id], one.subscribers)
            overflows.add_metric([one.peer_id], one.overflows)
            history.add_metric([one.peer_id], one.history_size)
            received.add_metric([one.peer_id], one.received)
        yield from (clients, overflows, history, received)
        outbox = GaugeMetricFamily(
            "dmq_outbox_messages",
            "messages waiting in a node's outbox to be resent when it answers, by node",
            labels=["node"],
        )
        outbox_bytes = GaugeMetricFamily(
            "dmq_outbox_bytes", "bytes of the messages waiting in a node's outbox", labels=["node"]
        )
        for node, (messages, size) in sorted(stats.outboxes.items()):
            outbox.add_metric([node], messages)
            outbox_bytes.add_metric([node], size)
        yield from (outbox, outbox_bytes)
        for name, text, value in (
            ("dmq_outbox_queued", "messages put in a node's outbox", stats.outbox_queued),
            ("dmq_outbox_resent", "resends from an outbox", stats.outbox_resent),
            (
                "dmq_outbox_delivered",
                "messages from an outbox the node answered",
                stats.outbox_delivered,
            ),
            (
                "dmq_duplicates",
                "stamped KDMQ copies answered but not delivered again",
                stats.duplicates,
            ),
            (
                "dmq_gaps",
                "gap entries written: messages of an origin given up by the reorder bounds",
                stats.gaps,
            ),
        ):
            yield CounterMetricFamily(name, text, value=value)
        dropped = CounterMetricFamily(
            "dmq_outbox_dropped",
            "messages that left an outbox undelivered, by reason",
            labels=["reason"],
        )
        for reason, count in stats.outbox_dropped.items():
            dropped.add_metric([reason], count)
        yield dropped
        yield GaugeMetricFamily(
            "dmq_reorder_held",
            "stamped messages held until the ones before them arrive",
            value=stats.held,
        )
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in stats.hole_fills:
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", cumulative))
        if buckets:
            yield HistogramMetricFamily(
                "dmq_reorder_hole_fill_seconds",
                "time from the first stamped message held behind a missing one to that "
                "one's arrival (what --reorder-wait must cover)",
                buckets=buckets,
                sum_value=stats.hole_fill_seconds,
            )
        yield GaugeMetricFamily(
            "dmq_reorder_held_peak",
            "the most stamped messages one origin's stream has held at once since the start "
            "(what --reorder-limit must cover)",
            value=stats.held_peak,
        )
        yield CounterMetricFamily(
            "dmq_reorder_late",
            "copies of stamped messages that arrived after a gap had declared them lost",
            value=stats.late_after_gap,
        )
        for name, text, value in (
            (
                "dmq_outbox_parked",
                "nodes removed after missed pings whose outbox was kept for their return",
                stats.outbox_parked,
            ),
            (
                "dmq_outbox_unparked",
                "parked nodes that came back, their outbox with them",
                stats.outbox_unparked,
            ),
        ):
            yield CounterMetricFamily(name, text, value=value)
        yield from self._bundles()
        yield from self._store()
        yield from self._transport(stats.transport)
        yield from self._tls(stats.transport)
        yield from self._guard()

    def _store(self) -> Iterator[Metric]:
        """The state store's group commits and WAL checkpoints (none without one)."""
        stats = self.gateway.store_stats()
        if stats is None:
            return
        for name, text, value in (
            ("dmq_store_commits", "group commits of the state store", stats.batches),
            (
                "dmq_store_committed_messages",
                "KDMQ messages answered 200 after a group commit",
                stats.batched,
            ),
            ("dmq_store_checkpoints", "WAL checkpoint passes", stats.checkpoints),
            (
                "dmq_store_checkpoint_holds",
                "WAL checkpoint passes run with the commits held, so that the WAL starts over",
                stats.checkpoint_holds,
            ),
            (
                "dmq_store_checkpoint_holds_cut",
                "holds on the commits for a checkpoint's last pass that ended before it",
                stats.checkpoint_holds_cut,
            ),
        ):
            yield CounterMetricFamily(name, text, value=value)
        yield GaugeMetricFamily(
            "dmq_store_wal_frames",
            "frames in the state store's WAL at the last checkpoint pass",
            value=stats.wal_frames,
        )
        yield GaugeMetricFamily(
            "dmq_store_wal_bytes", "size of the state store's WAL file", value=stats.wal_bytes
        )

    def _bundles(self) -> Iterator[Metric]:
        """Bundles sent and received, as histograms of the entries they held (their
        ``_count`` is the bundles, their ``_sum`` the messages so carried)."""
        stats = self.gateway.bundle_stats()
        for direction, sizes in (("sent", stats.sent_sizes), ("received", stats.received_sizes)):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*bundle.SIZE_BUCKETS, "+Inf"), sizes[:-2], strict=True):
                cumulative += count
                buckets.append((str(bound), cumulative))
            yield HistogramMetricFamily(
                f"dmq_bundles_{direction}_entries",
                f"bundles {direction} (one KDMQ request carrying several messages of one "
                "origin, gateway to gateway), by the messages they held",
                buckets=buckets,
                sum_value=sizes[-1],
            )
        yield CounterMetricFamily(
            "dmq_bundles_malformed",
            "bundles refused whole (400): bad framing, a count that does not match, or an "
            "entry over the limits",
            value=stats.malformed,
        )

    @staticmethod
    def _transport(transport: dict[str, int]) -> Iterator[Metric]:
        refused = CounterMetricFamily(
            "dmq_tcp_refused",
            "SIP TCP connections closed or refused because a bound was reached, by reason",
            labels=["reason"],
        )
        for field_name, reason in TCP_REFUSALS.items():
            refused.add_metric([reason], transport.get(field_name, 0))
        yield refused
        for name, text, field_name in (
            (
                "dmq_tcp_read_paused",
                "times a SIP TCP connection stopped being read: its peer did not read replies",
                "tcp_read_paused",
            ),
            (
                "dmq_tcp_outbound_reset",
                "outbound SIP TCP connections torn down after a request went unanswered",
                "tcp_outbound_reset",
            ),
            (
                "dmq_tcp_connect_requests_carried",
                "requests passed from a SIP TCP connect that timed out to a new connect",
                "tcp_connect_requests_carried",
            ),
            (
                "dmq_tcp_connects_revived",
                "SIP TCP connects started over when their host, which had not answered "
                "their SYN, sent something",
                "tcp_connects_revived",
            ),
            (
                "dmq_dns_lookups_refused",
                "host name look-ups not started: too many were in flight",
                "dns_lookups_refused",
            ),
            (
                "dmq_log_lines_suppressed",
                "log lines left out by the per-source rate limit",
                "log_lines_suppressed",
            ),
            (
                "dmq_udp_datagrams_dropped",
                "UDP datagrams dropped on purpose (the drop_rate test setting)",
                "dropped_datagrams",
            ),
        ):
            yield CounterMetricFamily(name, text, value=transport.get(field_name, 0))
        yield GaugeMetricFamily(
            "dmq_tcp_connections",
            "inbound SIP TCP connections open now",
            value=transport.get("tcp_connections", 0),
        )

    @staticmethod
    def _tls(transport: dict[str, int]) -> Iterator[Metric]:
        """SIP over TLS: handshakes by direction and outcome, peers refused for their
        certificate, connections open (all zero on a node without TLS)."""
        completed = CounterMetricFamily(
            "dmq_tls_handshakes_completed",
            "SIP TLS handshakes completed, inbound (nodes connecting) and outbound",
            labels=["direction"],
        )
        completed.add_metric(["inbound"], transport.get("tls_handshakes_completed", 0))
        completed.add_metric(["outbound"], transport.get("tls_connects_completed", 0))
        yield completed
        failed = CounterMetricFamily(
            "dmq_tls_handshakes_failed",
            "SIP TLS handshakes that failed, by direction and reason",
            labels=["direction", "reason"],
        )
        # The reasons are those of TransportStats' tls_in_* and tls_out_* fields.
        for direction, prefix in (("inbound", "tls_in_"), ("outbound", "tls_out_")):
            for reason in TLS_FAILURE_REASONS:
                failed.add_metric([direction, reason], transport.get(prefix + reason, 0))
        yield failed
        timeouts = CounterMetricFamily(
            "dmq_tls_handshake_timeouts",
            "SIP TLS handshakes cut off at --tls-handshake-timeout, by direction",
            labels=["direction"],
        )
        timeouts.add_metric(["inbound"], transport.get("tls_in_timeout", 0))
        timeouts.add_metric(["outbound"], transport.get("tls_out_timeout", 0))
        yield timeouts
        refused = CounterMetricFamily(
            "dmq_tls_peers_refused",
            "nodes refused over TLS for their certificate (--tls-verify-peer, "
            "--tls-allow-name), by reason",
            labels=["reason"],
        )
        for field_name, reason in TLS_PEER_REFUSALS.items():
            refused.add_metric([reason], transport.get(field_name, 0))
        yield refused
        yield GaugeMetricFamily(
            "dmq_tls_connections",
            "SIP TLS connections open now, inbound and outbound",
            value=transport.get("tls_connections", 0),
        )

    def _guard(self) -> Iterator[Metric]:
        refused = CounterMetricFamily(
            "dmq_http_refused",
            "HTTP requests and WebSocket connections refused by the API's bounds, by reason",
            labels=["reason"],
        )
        for field_name, reason in HTTP_REFUSALS.items():
            refused.add_metric([reason], getattr(self.guard, field_name, 0))
        yield refused


class GatewayRegistry(CollectorRegistry):
    """The registry of one app, which keeps its gateway collector at hand."""

    def __init__(self, collector: GatewayCollector) -> None:
        super().__init__(auto_describe=True)
        self.gateway_collector = collector
        self.register(collector)


def registry_for(gateway: Gateway, guard: GuardStats | None = None) -> GatewayRegistry:
    """A registry of this gateway's metrics and the process's (RSS, CPU, fds, GC)."""
    registry = GatewayRegistry(GatewayCollector(gateway, guard))
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


@router.get(
    "",
    operation_id="get_metrics",
    response_class=Response,
    responses={
        200: {
            "description": "the Prometheus text format, or OpenMetrics when the Accept "
            "header asks for application/openmetrics-text",
            "content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/openmetrics-text": {"schema": {"type": "string"}},
            },
        }
    },
)
async def get_metrics(request: Request) -> Response:
    """Counters and gauges in the Prometheus text format (or OpenMetrics)."""
    registry: CollectorRegistry = request.app.state.metrics
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(registry), media_type=content_type)
