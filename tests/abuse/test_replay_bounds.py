"""Subscribers that resume from the start of a large history and never read hold one
replay page each, not the history: a real gateway, real WebSocket clients.

The ceiling: each subscriber holds at most one page, ``--ws-queue-limit`` frames (1 000)
or the 4 MiB byte budget, whichever is less: about 1.2 MB for these 1 kB messages, so
20 of them 24 MB, plus socket buffers. A replay queued whole would add every message
of the history once per subscriber (50 000 frames: about 130 MB here).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from app.gateway.models import PeerSettings
from app.gateway.store import StateStore
from harness.gateway import Gateway
from tests.abuse.support import Probe, rss_mb

PEER = "replayed"
EPOCH = "e0000001"
MESSAGES = 50_000
BODY = b"m" * 1000
SUBSCRIBERS = 20
#: Growth of the gateway's RSS allowed while the subscribers sit unread (MB).
CEILING_MB = 60.0


def _fill_history(state_dir: Path) -> None:
    """The peer and its history, written to the state dir before the gateway starts
    (the gateway loads them as after a restart)."""
    store = StateStore(state_dir)
    store.open()
    try:
        # 50 MB of bodies: beyond the default byte bound, which is not what this tests.
        store.save_peer(PEER, PeerSettings(history=MESSAGES, history_bytes=1 << 30), EPOCH)
        with store.transaction():
            for offset in range(1, MESSAGES + 1):
                store.append(PEER, EPOCH, offset, time.time(), "sip:127.0.0.1:5", None, BODY)
    finally:
        store.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("replay")
    _fill_history(workdir / "replay-state")
    served = Gateway("replay", workdir).start()
    try:
        yield served
    finally:
        served.stop()


def _subscribe(gateway: Gateway) -> ClientConnection:
    # A small receive queue: the client stops reading from its socket at once.
    return ws_connect(
        f"{gateway.ws_url}/v1/peers/{PEER}/subscribe?since=0&epoch={EPOCH}",
        max_size=None,
        max_queue=1,
    )


def test_unread_replays_stay_under_the_ceiling_and_health_answers(gateway: Gateway) -> None:
    health = gateway.health()
    assert health is not None
    before = rss_mb(gateway)
    peak = before
    with Probe(gateway) as probe, ExitStack() as clients:
        for _ in range(SUBSCRIBERS):
            clients.enter_context(_subscribe(gateway))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            peak = max(peak, rss_mb(gateway))
            time.sleep(0.05)
    assert peak - before < CEILING_MB, (before, peak)
    assert not probe.failures, probe.failures
    assert probe.latencies


def test_a_reader_gets_the_whole_history_in_order_then_goes_live(gateway: Gateway) -> None:
    with _subscribe(gateway) as ws:
        subscribed = json.loads(ws.recv(timeout=10))
        assert subscribed["type"] == "subscribed"
        assert subscribed["offset"] == MESSAGES
        offsets = []
        while len(offsets) < MESSAGES:
            frame = json.loads(ws.recv(timeout=10))
            assert frame["type"] == "message", frame
            offsets.append(frame["offset"])
        assert offsets == list(range(1, MESSAGES + 1))
