"""A trusted neighbour floods a real gateway with node lists of made-up nodes.

Before the node list had bounds, 40 datagrams listing 50 made-up nodes each took one
gateway from 57 MB to 1.8 GB of memory and its neighbours to 170 MB, and 20 000
requests for made-up peer ids grew ``/metrics`` from 1.8 MB to 43 MB. Here ten times
that flood goes to gateway A (which passes changed lists on to its neighbour B): each
process must stay within :data:`RSS_GROWTH_CEILING` of what it used before, A must
hold at most ``max_nodes`` (256) other nodes, ``/v1/health`` must keep answering, and
the unknown peer ids must share one series in ``/metrics``.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import psutil

from harness.gateway import Gateway
from harness.waiting import wait_until

#: How much more memory (RSS) each gateway may use after the flood than before it. The
#: bounded node list and outboxes need a few MB; the unbounded one needed over 1.7 GB.
RSS_GROWTH_CEILING = 64 * 1024 * 1024

DATAGRAMS = 400
NODES_PER_DATAGRAM = 50
UNKNOWN_PEER_IDS = 2000
MAX_NODES = 256


def kdmq(target_port: int, source_port: int, peer_id: str, body: bytes, n: int) -> bytes:
    target = f"sip:{peer_id}@127.0.0.1:{target_port}"
    lines = [
        f"KDMQ {target} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:{source_port};branch=z9hG4bKflood{n}",
        f"From: <sip:{peer_id}@127.0.0.1:{source_port}>;tag=flood{n}",
        f"To: <{target}>",
        f"Call-ID: flood{n}@127.0.0.1",
        "CSeq: 10 KDMQ",
        "Max-Forwards: 2",
        "Content-Type: text/plain",
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def made_up_list(source_port: int, first: int) -> bytes:
    """Our own line, then made-up nodes on loopback addresses other than 127.0.0.1, at
    the discard port: nobody answers, and no ping leaves the machine."""
    lines = [f"sip:127.0.0.1:{source_port};status=active"]
    for i in range(first, first + NODES_PER_DATAGRAM):
        lines.append(f"sip:127.66.{i // 254}.{i % 254 + 1}:9;status=active")
    return ("\r\n".join(lines) + "\r\n").encode()


def rss(gateway: Gateway) -> int:
    return int(psutil.Process(gateway.pid).memory_info().rss)


def held_nodes(gateway: Gateway) -> int:
    return len(httpx.get(f"{gateway.url}/v1/nodes", trust_env=False, timeout=5).json())


def unknown_series(gateway: Gateway) -> str | None:
    """``/metrics`` once it has the one series of unknown peer ids, else None."""
    text = httpx.get(f"{gateway.url}/metrics", trust_env=False, timeout=5).text
    return text if 'peer="(unknown)"' in text else None


def test_a_flood_of_made_up_nodes_and_peer_ids_stays_bounded(tmp_path: Path) -> None:
    a = Gateway("a", tmp_path).start()
    b = Gateway("b", tmp_path, notify=[a])
    flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        b.start()
        wait_until(lambda: held_nodes(a) == 2, 10, "A and B to know each other")
        time.sleep(1.0)  # settled: both have served requests and pinged
        before = {g.name: rss(g) for g in (a, b)}

        flood.bind(("127.0.0.1", 0))
        source_port = flood.getsockname()[1]
        for n in range(DATAGRAMS):
            body = made_up_list(source_port, n * NODES_PER_DATAGRAM)
            flood.sendto(
                kdmq(a.sip_port, source_port, "notification_peer", body, n),
                ("127.0.0.1", a.sip_port),
            )
            if n % 50 == 49:
                time.sleep(0.05)  # a burst at a time, as from a busy neighbour
        for n in range(UNKNOWN_PEER_IDS):
            flood.sendto(
                kdmq(a.sip_port, source_port, f"made-up-{n}", b"x", DATAGRAMS + n),
                ("127.0.0.1", a.sip_port),
            )
            if n % 200 == 199:
                time.sleep(0.02)
        time.sleep(3.0)  # pings to the made-up nodes, forwarded lists, retransmissions

        for gateway in (a, b):
            health = gateway.health(timeout=5)
            assert health is not None, f"{gateway} stopped answering /v1/health"
            grown = rss(gateway) - before[gateway.name]
            print(f"{gateway.name}: RSS {before[gateway.name] >> 20} MB, +{grown >> 20} MB")
            assert grown < RSS_GROWTH_CEILING, f"{gateway}: RSS grew by {grown >> 20} MB"
            assert held_nodes(gateway) <= MAX_NODES + 1
        # Datagrams of the flood may be dropped by a busy machine's socket buffer; some
        # of the 2 000 arrive, and all of them count in the one series.
        metrics = wait_until(
            lambda: unknown_series(a), 10, "the (unknown) peer series in /metrics", interval=0.2
        )
        assert "made-up-" not in metrics
        assert len(metrics) < 1_000_000
    finally:
        flood.close()
        b.stop()
        a.stop()
