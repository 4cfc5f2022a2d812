"""Per-message state stays out of the cyclic collector's sight.

A full (generation 2) collection walks every tracked object, so each object a message
leaves behind for seconds (a finished client transaction lingering for Timer K, a
cancelled Timer F in the heap, a Timer J entry, a history entry) lengthens every such
pause while freeing nothing. These tests send real KDMQ over loopback between two
DmqServers, with the default SIP timers (Timer F and J 32 s, K 5 s: all of it would
still be held when counted), and count the objects the collector tracks before and
after. They count objects, never time.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.dmq.config import NodeConfig
from app.dmq.peers import PeerMessage, PeerReply
from app.dmq.sip import SipUri
from app.gateway.hub import Hub
from app.gateway.models import PeerSettings
from app.gateway.store import HistoryStore, StateStore
from app.transport.server import DmqServer
from harness.ports import free_port

#: Messages counted; the allowance is per message, far below the one object the
#: smallest leftover (a NodeResult, a cancelled timer handle) would cost.
MESSAGES = 1500
WARM_UP = 300
#: Tracked objects allowed per message (a few rare, bounded ones: dict resizes,
#: cache entries, the heap's own list).
PER_MESSAGE = 0.05


def config(port: int, notify: int | None = None) -> NodeConfig:
    return NodeConfig(
        server_address=SipUri.parse(f"sip:127.0.0.1:{port}"),
        notification_addresses=(SipUri.parse(f"sip:127.0.0.1:{notify}"),) if notify else (),
    )


@pytest.fixture
async def pair() -> AsyncIterator[tuple[DmqServer, DmqServer]]:
    """A and B over UDP with the default timers, active for each other."""
    port_a, port_b = free_port(), free_port()
    a, b = DmqServer(config(port_a)), DmqServer(config(port_b, port_a))
    await a.start()
    await b.start()
    try:
        for _ in range(500):
            if a.node.nodes.active_others() and b.node.nodes.active_others():
                break
            await asyncio.sleep(0.01)
        assert a.node.nodes.active_others() and b.node.nodes.active_others()
        yield a, b
    finally:
        await b.stop(grace=0.2)
        await a.stop(grace=0.2)


async def broadcast_many(a: DmqServer, peer_id: str, count: int) -> None:
    """``count`` broadcasts, 50 in flight at a time, each answered 200 by B."""
    for start in range(0, count, 50):
        operations = await asyncio.gather(
            *(
                a.broadcast(peer_id, b'{"n": %d}' % n, "application/json")
                for n in range(start, min(count, start + 50))
            )
        )
        for operation in operations:
            assert [r.code for r in operation.results] == [200], operation.results


def tracked() -> int:
    gc.collect()
    return len(gc.get_objects())


async def test_a_broadcast_leaves_no_tracked_objects_behind(
    pair: tuple[DmqServer, DmqServer],
) -> None:
    a, b = pair
    received = 0

    def handler(message: PeerMessage) -> PeerReply:
        nonlocal received
        received += 1
        return PeerReply()

    b.register_peer("counted", handler)
    await broadcast_many(a, "counted", WARM_UP)
    before = tracked()
    await broadcast_many(a, "counted", MESSAGES)
    grown = tracked() - before

    assert received == WARM_UP + MESSAGES
    # Everything is still within Timer K (5 s), F and J (32 s): before, each message
    # left some 15 tracked objects on the sender and 2 on the receiver.
    assert grown <= MESSAGES * PER_MESSAGE, f"{grown} tracked objects for {MESSAGES} messages"
    # The answered transactions are remembered, as plain untracked tuples.
    assert len(a.node.transactions.absorbing) >= MESSAGES
    assert len(b.node.transactions.completed) >= MESSAGES
    # Cancelled Timer F handles do not pile up in the heap for 32 s.
    assert a.node.timers.heap_size < 200, a.node.timers.heap_size


@pytest.mark.parametrize("history_store", [HistoryStore.MEMORY, HistoryStore.SQLITE])
async def test_the_history_creates_no_tracked_objects_per_message(
    pair: tuple[DmqServer, DmqServer], tmp_path: Path, history_store: HistoryStore
) -> None:
    a, b = pair
    store = StateStore(tmp_path)
    store.open()
    try:
        hub = Hub(b, store, history_store=history_store)
        channel, _ = hub.register("history", PeerSettings(history=10_000))
        # Warmed up by a run as long as the one counted too: the first passes of a
        # path fill caches (the ABCs' isinstance caches: a few dozen weak references
        # and sets) that the count must not take for the messages'.
        await broadcast_many(a, "history", WARM_UP)
        await broadcast_many(a, "history", MESSAGES)
        before = tracked()
        await broadcast_many(a, "history", MESSAGES)
        grown = tracked() - before

        assert channel.offset == WARM_UP + 2 * MESSAGES
        assert len(channel.history) == WARM_UP + 2 * MESSAGES
        assert grown <= MESSAGES * PER_MESSAGE, f"{grown} tracked objects for {MESSAGES} messages"
        if history_store is HistoryStore.SQLITE:
            rows = store.db.execute(
                "SELECT coalesce(sum(last - first + 1), 0) FROM pages"
            ).fetchone()[0]
            assert rows == WARM_UP + 2 * MESSAGES
    finally:
        hub.stop_timer()
        store.close()
