"""The subscribe WebSocket against a real gateway with low limits: large frames and
floods of small ones close the client that sends them while another client's
``GET /v1/health`` keeps being served, and no query or close reason can raise."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from harness.gateway import Gateway
from tests.abuse.support import Probe

PEER = "ws-abuse"
LIMITS = ("--ws-max-frame", "4096", "--ws-max-frames-per-second", "20")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    served = Gateway("ws", tmp_path_factory.mktemp("ws"), extra=LIMITS).start()
    try:
        response = httpx.put(f"{served.url}/v1/peers/{PEER}", json={}, timeout=5)
        assert response.status_code in (200, 201), response.text
        yield served
    finally:
        served.stop()


def subscribe(gateway: Gateway, query: str = "", peer: str = PEER) -> ClientConnection:
    return ws_connect(f"{gateway.ws_url}/v1/peers/{peer}/subscribe{query}", max_size=None)


def close_of(ws: ClientConnection) -> tuple[int | None, str]:
    """Read until the gateway closes; its close code and reason."""
    try:
        while True:
            ws.recv(timeout=10)
    except ConnectionClosed as exc:
        received = exc.rcvd
        return (received.code, received.reason) if received else (None, "")


def test_a_frame_over_the_limit_closes_the_connection_1009(gateway: Gateway) -> None:
    with Probe(gateway) as probe, subscribe(gateway) as ws:
        ws.recv(timeout=5)  # subscribed
        ws.send("x" * 1_000_000)
        code, _ = close_of(ws)
    assert code == 1009
    assert not probe.failures, probe.failures
    assert gateway.health() is not None


def test_a_flood_of_small_frames_closes_the_connection_1008(gateway: Gateway) -> None:
    with Probe(gateway) as probe, subscribe(gateway) as ws:
        ws.recv(timeout=5)
        try:
            for _ in range(2000):
                ws.send('{"type": "reply"}')
        except ConnectionClosed:
            pass
        code, reason = close_of(ws)
    assert code == 1008
    assert "frames per second" in reason
    assert not probe.failures, probe.failures


def test_a_reply_rate_within_the_limit_is_served(gateway: Gateway) -> None:
    with subscribe(gateway) as ws:
        ws.recv(timeout=5)
        for _ in range(10):  # within the burst of 20
            ws.send("not json")
            assert '"type":"error"' in str(ws.recv(timeout=5)).replace(" ", "")


@pytest.mark.parametrize("since", ["²", "١٢", "-1", "1e3"])
def test_a_since_that_is_not_an_ascii_number_is_1008(gateway: Gateway, since: str) -> None:
    with subscribe(gateway, f"?since={since}") as ws:
        code, reason = close_of(ws)
    assert code == 1008
    assert "since must be a non-negative integer" in reason


def test_a_long_close_reason_is_cut_to_fit_the_close_frame(gateway: Gateway) -> None:
    peer = "é" * 64  # 128 characters of peer id once quoted would be over 123 bytes
    with subscribe(gateway, peer=peer) as ws:
        code, reason = close_of(ws)
    assert code == 4004
    assert len(reason.encode()) <= 123
    assert reason.startswith("no peer 'éé") and reason.endswith("...")
