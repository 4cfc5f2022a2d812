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
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.gateway.service import Gateway

router = APIRouter(prefix="/metrics", tags=["metrics"])


class GatewayCollector(Collector):
    """Every counter of the node and the gateway, read at scrape time."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

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


def registry_for(gateway: Gateway) -> CollectorRegistry:
    """A registry of this gateway's metrics and the process's (RSS, CPU, fds, GC)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(GatewayCollector(gateway))
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
