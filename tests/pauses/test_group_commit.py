"""Group commit of the durable history: the messages of one loop turn share one
commit, and none is answered 200 before its commit (real DmqServers on loopback, a
real SQLite store)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.dmq.peers import PeerReply
from app.gateway.hub import Hub
from app.gateway.models import PeerSettings
from app.gateway.store import HistoryStore, StateStore
from app.transport.server import DmqServer
from tests.pauses.test_collector import pair

__all__ = ["pair"]

MESSAGES = 400


@pytest.fixture
async def durable(
    pair: tuple[DmqServer, DmqServer], tmp_path: Path
) -> AsyncIterator[tuple[DmqServer, Hub, StateStore]]:
    a, b = pair
    store = StateStore(tmp_path)
    store.open()
    hub = Hub(b, store, history_store=HistoryStore.SQLITE)
    hub.register("durable", PeerSettings(history=10_000))
    try:
        yield a, hub, store
    finally:
        hub.stop_timer()
        store.close()


async def burst(a: DmqServer, count: int) -> list[int]:
    operations = await asyncio.gather(
        *(a.broadcast("durable", b"m%d" % n, "text/plain") for n in range(count))
    )
    return [result.code for operation in operations for result in operation.results]


async def test_no_200_goes_out_before_its_message_is_committed(
    durable: tuple[DmqServer, Hub, StateStore],
) -> None:
    a, hub, store = durable
    # A second connection sees only what is committed.
    reader = sqlite3.connect(store.path)
    answered: list[tuple[int, int]] = []
    reply_many = hub.server.reply_many

    def watched(message_ids: list[int], answer: PeerReply) -> None:
        committed = reader.execute(
            "SELECT coalesce(sum(last - first + 1), 0) FROM pages"
        ).fetchone()[0]
        answered.extend((answer.code, committed) for _ in message_ids)
        reply_many(message_ids, answer)

    hub.server.reply_many = watched  # type: ignore[method-assign,assignment]
    try:
        codes = await burst(a, MESSAGES)
    finally:
        del hub.server.reply_many
        reader.close()

    assert codes == [200] * MESSAGES
    assert len(answered) == MESSAGES
    for n, (code, committed) in enumerate(answered, 1):
        assert code == 200
        assert committed >= n, f"the 200 number {n} went out with {committed} rows committed"
    assert hub.batched == MESSAGES
    assert 1 <= hub.batches <= MESSAGES


async def test_a_failed_commit_answers_500_and_the_next_batch_recovers(
    durable: tuple[DmqServer, Hub, StateStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _, store = durable

    def broken() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "commit", broken)
    assert await burst(a, 5) == [500] * 5
    monkeypatch.undo()
    assert await burst(a, 5) == [200] * 5
    rows = store.db.execute("SELECT coalesce(sum(last - first + 1), 0) FROM pages").fetchone()[0]
    assert rows == 5, "the rows of the failed batch were rolled back"
