"""The gateway (``dmq-gateway serve``) with a real Kamailio 5.6 node on one bus.

Over UDP and TCP: what Kamailio's htable replicates reaches a WebSocket subscriber of
the gateway's ``htable`` peer as Kamailio's exact JSON, and an htable set action that a
client POSTs to the gateway is applied by Kamailio (``kamcmd htable.get`` reads it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from harness.gateway import Gateway
from harness.kamailio import KamailioNode, KamailioNodeFactory, Transport
from harness.waiting import wait_until
from tests.api.gateway_procs import dump_logs_on_failure, running

pytestmark = [
    pytest.mark.interop,
    pytest.mark.usefixtures("kamailio_required"),
    pytest.mark.timeout(60),
]

TRANSPORTS = pytest.mark.parametrize("transport", ["udp", "tcp"])

LOOPBACK = "127.0.0.1"
#: Kamailio's transaction timeout (tm fr_timer); its ping interval is 5 s, the minimum.
K_FR_TIMER_MS = 2000
JOIN_TIMEOUT = 10.0


class Bus:
    """One Kamailio node and one gateway process that joined the bus through it."""

    def __init__(self, k: KamailioNode, gateway: Gateway) -> None:
        self.k = k
        self.gateway = gateway
        self.http = httpx.Client(base_url=gateway.url, timeout=10, trust_env=False)

    def gateway_nodes(self) -> dict[tuple[str, int, str], str]:
        """The gateway's node list, other nodes only: {(host, port, transport): status}."""
        response = self.http.get("/v1/nodes")
        response.raise_for_status()
        return {
            (n["host"], n["port"], n["transport"]): n["status"]
            for n in response.json()
            if not n["local"]
        }

    def formed(self) -> bool:
        """Each lists the other active (Kamailio with the gateway's transport)."""
        k = self.k
        proto = "tcp" if k.transport == "tcp" else "*"  # "*": a URI with no transport
        kamailio_side = [
            (n["status"], n["proto"])
            for n in k.list_nodes()
            if n["port"] == self.gateway.sip_port and not n["local"]
        ]
        assert len(kamailio_side) <= 1, f"Kamailio holds the gateway twice: {kamailio_side}"
        return kamailio_side == [("active", proto)] and (
            self.gateway_nodes().get((LOOPBACK, k.port, k.transport)) == "active"
        )

    def register_htable(self) -> None:
        response = self.http.put("/v1/peers/htable", json={"description": "interop"})
        assert response.status_code in (200, 201), response.text

    def subscribe(self, peer_id: str) -> ClientConnection:
        # since=0 replays the peer's history first: nothing that arrives between the
        # handshake and the subscription is missed.
        return connect(
            f"{self.gateway.ws_url}/v1/peers/{peer_id}/subscribe?since=0",
            open_timeout=5,
            proxy=None,
        )


@pytest.fixture
def bus(
    request: pytest.FixtureRequest,
    kamailio_node: KamailioNodeFactory,
    tmp_path: Path,
    transport: Transport,
) -> Iterator[Bus]:
    """A Kamailio node and a gateway joined through it, listing each other active."""
    k = kamailio_node(transport=transport, fr_timer_ms=K_FR_TIMER_MS)
    gateway = Gateway(
        "gateway", tmp_path, notify=[k.server_address], ping_interval=1.0, transport=transport
    )
    with running([gateway]), dump_logs_on_failure(request, lambda: [gateway]):
        gateway.start()
        bus = Bus(k, gateway)
        try:
            wait_until(bus.formed, JOIN_TIMEOUT, "Kamailio and the gateway to list each other")
            yield bus
        finally:
            bus.http.close()


def htable_set(key: str, value: str) -> str:
    """An htable set action as Kamailio 5.6 writes it (compact, fields in this order)."""
    return f'{{"action":2,"htname":"ht","cname":"{key}","type":2,"strval":"{value}","mode":1}}'


def next_message_about(ws: ClientConnection, key: str, timeout: float) -> dict[str, Any]:
    """The next ``message`` frame whose JSON body names ``key`` (sync requests are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no frame about {key!r} within {timeout} s")
        try:
            raw = ws.recv(timeout=remaining)
        except TimeoutError:
            continue
        frame: dict[str, Any] = json.loads(raw)
        if frame.get("type") != "message":
            continue
        try:
            body = json.loads(frame["body"])
        except ValueError:
            continue
        if isinstance(body, dict) and body.get("cname") == key:
            return frame


@TRANSPORTS
def test_kamailio_htable_set_reaches_a_websocket_subscriber(bus: Bus, transport: Transport) -> None:
    bus.register_htable()
    key, value = f"from-kamailio-{transport}", "hello gateway"
    with bus.subscribe("htable") as ws:
        bus.k.htable_sets("ht", key, value)
        frame = next_message_about(ws, key, timeout=5)
    assert frame["body"] == htable_set(key, value)
    assert frame["peer"] == "htable"
    assert frame["content_type"] == "application/json"
    assert frame["from"] == bus.k.server_address
    assert "encoding" not in frame
    peer = bus.http.get("/v1/peers/htable").json()
    assert peer["offset"] == frame["offset"]


@TRANSPORTS
def test_gateway_broadcast_is_applied_by_kamailio(bus: Bus, transport: Transport) -> None:
    bus.register_htable()
    key, value = f"from-gateway-{transport}", "hello kamailio"
    response = bus.http.post(
        "/v1/peers/htable/broadcast",
        params={"wait": "true"},
        content=htable_set(key, value).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["targets"] == 1
    (node_result,) = result["results"]
    assert node_result["node"] == bus.k.server_address
    assert (node_result["code"], node_result["timeout"]) == (200, False), node_result
    wait_until(
        lambda: bus.k.htable_get("ht", key) == value, 5, "kamcmd htable.get to read the value"
    )


@TRANSPORTS
def test_gateway_sigterm_leaves_the_bus(bus: Bus, transport: Transport) -> None:
    """SIGTERM: the gateway tells Kamailio it is disabled before tm's fr_timer could."""
    stopped_at = time.monotonic()
    bus.gateway.stop(timeout=10)  # uvicorn re-raises SIGTERM once shut down: exit code -15
    assert not bus.gateway.alive
    wait_until(
        lambda: not bus.k.knows(LOOPBACK, bus.gateway.sip_port, "active"),
        K_FR_TIMER_MS / 1000 * 0.75 - (time.monotonic() - stopped_at),
        "Kamailio to stop listing the gateway active",
    )
