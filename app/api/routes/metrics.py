"""``GET /metrics`` in the Prometheus text format (version 0.0.4)."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from app.api.deps import HubDep
from app.dmq.nodes import NodeStatus
from app.gateway.hub import Hub

router = APIRouter(tags=["metrics"])


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(hub: Hub) -> str:
    node = hub.server.node
    stats = node.stats
    tx = node.transactions.stats
    lines: list[str] = []

    def metric(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}")

    def by_peer_code(counter: Counter[tuple[str, int]]) -> list[tuple[str, float]]:
        return [
            (f'{{peer="{_label(peer)}",code="{code}"}}', float(n))
            for (peer, code), n in sorted(counter.items())
        ]

    metric(
        "dmq_kdmq_received_total",
        "counter",
        "KDMQ requests received, by peer and the code answered",
        by_peer_code(stats.received),
    )
    metric(
        "dmq_kdmq_sent_total",
        "counter",
        "KDMQ requests sent, by peer and final code (408 = timeout)",
        by_peer_code(stats.sent),
    )
    metric(
        "dmq_retransmissions_sent_total",
        "counter",
        "requests retransmitted over UDP (Timer E)",
        [("", tx.retransmissions_sent)],
    )
    metric(
        "dmq_retransmissions_absorbed_total",
        "counter",
        "retransmitted requests absorbed while the peer was answering",
        [("", tx.retransmissions_absorbed)],
    )
    metric(
        "dmq_responses_resent_total",
        "counter",
        "retransmitted requests answered from the cached response",
        [("", tx.responses_resent)],
    )
    metric(
        "dmq_transaction_timeouts_total",
        "counter",
        "requests that got no answer before Timer F (local 408)",
        [("", tx.timeouts)],
    )
    metric(
        "dmq_transport_errors_total",
        "counter",
        "requests that could not be delivered (TCP connect failed)",
        [("", tx.transport_errors)],
    )
    metric(
        "dmq_malformed_total",
        "counter",
        "malformed SIP messages, answered or dropped",
        [
            ('{action="answered"}', stats.malformed_answered),
            ('{action="dropped"}', stats.malformed_dropped),
        ],
    )
    metric(
        "dmq_forbidden_total",
        "counter",
        "KDMQ refused because the source is not trusted",
        [("", stats.forbidden)],
    )
    counts = Counter(n.status for n in node.nodes.others())
    metric(
        "dmq_nodes",
        "gauge",
        "other nodes of the bus, by status",
        [(f'{{status="{s.value}"}}', counts.get(s, 0)) for s in NodeStatus],
    )
    channels = sorted(hub.channels.values(), key=lambda c: c.peer_id)
    metric(
        "dmq_websocket_clients",
        "gauge",
        "WebSocket subscribers, by peer",
        [(f'{{peer="{_label(c.peer_id)}"}}', len(c.subscribers)) for c in channels],
    )
    metric(
        "dmq_websocket_queue_overflows_total",
        "counter",
        "subscribers cut off because their send queue overflowed, by peer",
        [(f'{{peer="{_label(c.peer_id)}"}}', c.overflows) for c in channels],
    )
    metric(
        "dmq_peer_history_size",
        "gauge",
        "messages held in a peer's history",
        [(f'{{peer="{_label(c.peer_id)}"}}', len(c.history)) for c in channels],
    )
    metric(
        "dmq_peer_messages_total",
        "counter",
        "messages delivered to a peer",
        [(f'{{peer="{_label(c.peer_id)}"}}', c.received) for c in channels],
    )
    metric(
        "dmq_subscriber_reply_timeouts_total",
        "counter",
        "subscriber-mode messages no subscriber answered in time (408)",
        [("", hub.reply_timeouts)],
    )
    metric(
        "dmq_peer_reply_timeouts_total",
        "counter",
        "deferred peer replies the node answered 408 itself",
        [("", stats.reply_timeouts)],
    )
    return "\n".join(lines) + "\n"


@router.get(
    "/metrics",
    operation_id="get_metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def get_metrics(hub: HubDep) -> PlainTextResponse:
    """Counters and gauges in the Prometheus text format."""
    return PlainTextResponse(render(hub), media_type="text/plain; version=0.0.4")
