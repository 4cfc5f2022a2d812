"""The hub's receive path: what a message of an unstamped sender costs the store.

Real DmqServers on loopback (the pair of tests/pauses) and a real SQLite store."""

from __future__ import annotations

import asyncio
from pathlib import Path

from app.dmq.sip import SipUri
from app.gateway.hub import Hub
from app.gateway.models import PeerSettings
from app.gateway.store import HistoryStore, StateStore
from app.transport.server import DmqServer
from tests.pauses.test_collector import pair

__all__ = ["pair"]

MESSAGES = 200


async def test_a_peer_kept_in_memory_costs_the_store_nothing(
    pair: tuple[DmqServer, DmqServer], tmp_path: Path
) -> None:
    """A peer registered with --peer keeps its history in memory even beside a durable
    store: its messages are answered and kept without one SQL statement (no
    transaction per message), while a stored peer's go through the store in batches."""
    a, b = pair
    store = StateStore(tmp_path)
    store.open()
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    hub = Hub(b, store, history_store=HistoryStore.SQLITE)
    try:
        hub.register("memory", PeerSettings(history=10_000), ephemeral=True)
        hub.register("stored", PeerSettings(history=10_000))
        statements.clear()
        for peer_id in ("memory", "stored"):
            operations = await asyncio.gather(
                *(a.broadcast(peer_id, b"m%d" % n, "text/plain") for n in range(MESSAGES))
            )
            assert [r.code for op in operations for r in op.results] == [200] * MESSAGES
            if peer_id == "memory":
                assert statements == []
        assert any(s.startswith("INSERT") for s in statements)  # the stored peer's pages
        assert len([s for s in statements if s == "BEGIN"]) <= MESSAGES
        sender = str(SipUri.parse(str(a.node.nodes.local.uri)))
        for peer_id in ("memory", "stored"):
            history = hub.channel(peer_id).history
            assert sorted(entry[6] for entry in history) == sorted(
                b"m%d" % n for n in range(MESSAGES)
            )
            assert {entry[4] for entry in history} == {sender}
    finally:
        hub.stop_timer()
        store.close()
