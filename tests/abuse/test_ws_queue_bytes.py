"""``--ws-queue-bytes``: a subscriber's queue is bounded in bytes, live and replayed,
at the budget given on the command line; a real gateway, real KDMQ over TCP, a real
WebSocket client that does not read.

The budget here (64 KiB) is a sixty-fourth of the default: a subscriber that stops
reading is cut off with 4008 once about ten of these 6 KB frames wait for it, where
the default budget would have let some 680 pile up (and the frame limit, 1 000).
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from harness.gateway import Gateway
from tests.abuse.support import Probe, kdmq, metric

PEER = "budgeted"
BUDGET = 65_536
BODY = b"q" * 6000
#: Messages sent at most while waiting for the cut-off (the socket buffers between the
#: gateway and a client that does not read absorb some first).
MAX_SENT = 1500


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    served = Gateway(
        "wsq",
        tmp_path_factory.mktemp("wsq"),
        extra=("--ws-queue-bytes", str(BUDGET)),
    ).start()
    try:
        # A history longer than anything sent here: the replay test reads it all.
        response = httpx.put(
            f"{served.url}/v1/peers/{PEER}", json={"history": 5000}, timeout=5, trust_env=False
        )
        assert response.status_code in (200, 201), response.text
        yield served
    finally:
        served.stop()


def _subscribe(gateway: Gateway, query: str = "") -> ClientConnection:
    """A client with a small receive buffer that holds one frame before it stops reading
    its socket: what it does not read stays with the gateway."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect(("127.0.0.1", gateway.http_port))
    return ws_connect(
        f"{gateway.ws_url}/v1/peers/{PEER}/subscribe{query}",
        sock=sock,
        max_size=None,
        max_queue=1,
        # No keep-alive pings: their answers would wait behind the unread frames.
        ping_interval=None,
    )


def _send(sock: socket.socket, gateway: Gateway) -> None:
    """One KDMQ to the peer over TCP, and its 200."""
    sock.sendall(kdmq(gateway.sip_port, PEER, BODY))
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(65536)
        assert chunk, "the gateway closed the TCP connection"
        reply += chunk
    assert reply.startswith(b"SIP/2.0 200 "), reply[:80]


def _read_to_close(ws: ClientConnection) -> tuple[list[int], int, int | None, str]:
    """Every message frame's offset, the longest frame, and the close code and reason."""
    offsets: list[int] = []
    longest = 0
    try:
        while True:  # until the gateway closes
            text = ws.recv(timeout=10)
            frame = json.loads(text)
            if frame["type"] == "message":
                offsets.append(frame["offset"])
                longest = max(longest, len(text))
    except ConnectionClosed as exc:
        close = exc.rcvd
        return offsets, longest, close.code if close else None, close.reason if close else ""


def test_a_subscriber_that_does_not_read_is_cut_off_at_the_byte_budget(gateway: Gateway) -> None:
    with Probe(gateway) as probe, _subscribe(gateway) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "subscribed"
        cut_at = 0
        with (
            socket.create_connection(("127.0.0.1", gateway.sip_port), timeout=5) as sip,
            httpx.Client(timeout=5, trust_env=False) as scraper,
        ):
            for offset in range(1, MAX_SENT + 1):
                _send(sip, gateway)
                if metric(gateway, "dmq_websocket_queue_overflows_total", scraper, peer=PEER):
                    cut_at = offset
                    break
        assert cut_at, f"{MAX_SENT} messages of {len(BODY)} bytes did not overflow the queue"
        offsets, longest, code, reason = _read_to_close(ws)
    assert code == 4008, (code, reason)
    assert offsets == list(range(1, len(offsets) + 1))
    resume = re.search(r"since=(\d+)", reason)
    assert resume is not None, reason
    # The close reason names the last frame handed to the socket: the client got it
    # (and at most the one being written when the cut-off came).
    assert int(resume.group(1)) <= offsets[-1] <= int(resume.group(1)) + 1
    # Queued when the message that overflowed arrived: what the client never got.
    # (The overflow is seen at the 200 of that message, or of the next one.)
    queued = cut_at - 1 - offsets[-1]
    assert queued * longest <= BUDGET + longest, (queued, longest)
    assert (queued + 2) * longest > BUDGET, (queued, longest)
    assert probe.latencies and not probe.failures, probe.failures


def test_a_replay_is_paged_within_the_budget_and_complete(gateway: Gateway) -> None:
    # The history holds what the first test sent (hundreds of 6 KB messages, far over
    # the budget): a client resuming from 0 gets every one, in order, a page at a time.
    peers = httpx.get(f"{gateway.url}/v1/peers/{PEER}", timeout=5, trust_env=False).json()
    latest = peers["offset"]
    assert latest * len(BODY) > 4 * BUDGET, latest
    with _subscribe(gateway, "?since=0") as ws:
        subscribed = json.loads(ws.recv(timeout=10))
        assert subscribed["type"] == "subscribed"
        offsets: list[int] = []
        while len(offsets) < latest:
            frame = json.loads(ws.recv(timeout=10))
            assert frame["type"] == "message", frame
            offsets.append(frame["offset"])
    assert offsets == list(range(1, latest + 1))
