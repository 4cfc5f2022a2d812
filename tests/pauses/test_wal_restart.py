"""The durable store's WAL starts over under a steady load instead of growing.

A PASSIVE checkpoint copies the frames the WAL held when it began; a commit that lands
while it runs stays behind it, and the WAL can only start over from its beginning once
a pass has copied everything. Under a steady load a commit lands during every pass, so
the WAL grew without end (to 90 MB in 40 s at 1 000 messages/s, every pass and the
commits beside it slower as it grew). The gateway's checkpoint loop follows each pass
with a short one while the hub holds its end-of-turn commits. Real DmqServers on
loopback, a real SQLite store on disk.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3

from app.gateway.hub import Hub
from app.gateway.service import checkpoint_loop
from app.gateway.store import StateStore
from app.transport.server import DmqServer
from tests.pauses.test_collector import pair
from tests.pauses.test_group_commit import burst, durable

__all__ = ["durable", "pair"]


def committed_rows(store: StateStore) -> int:
    reader = sqlite3.connect(store.path)
    try:
        return int(
            reader.execute("SELECT coalesce(sum(last - first + 1), 0) FROM pages").fetchone()[0]
        )
    finally:
        reader.close()


async def test_held_commits_keep_the_batch_open_and_answer_it_on_release(
    durable: tuple[DmqServer, Hub, StateStore],
) -> None:
    a, hub, store = durable
    hub.hold_commits()
    sending = asyncio.ensure_future(burst(a, 50))
    for _ in range(500):
        if hub.awaiting_commit == 50:
            break
        await asyncio.sleep(0.01)
    # Every message arrived and waits in the open batch: none is stored or answered.
    assert hub.awaiting_commit == 50
    await asyncio.sleep(0.2)  # turns go by; the batch stays open
    assert not sending.done()
    assert committed_rows(store) == 0
    hub.release_commits()
    assert await sending == [200] * 50
    assert committed_rows(store) == 50
    assert hub.batches == 1


async def test_a_direct_flush_still_commits_while_commits_are_held(
    durable: tuple[DmqServer, Hub, StateStore],
) -> None:
    """What must not wait (stopping, the registry, a stamp after a failed commit)
    calls flush() itself, and that is not held."""
    a, hub, store = durable
    hub.hold_commits()
    sending = asyncio.ensure_future(burst(a, 5))
    for _ in range(500):
        if hub.awaiting_commit == 5:
            break
        await asyncio.sleep(0.01)
    hub.flush()
    assert await sending == [200] * 5
    assert committed_rows(store) == 5
    hub.release_commits()  # nothing left to commit
    assert hub.batches == 1


async def test_the_wal_starts_over_under_a_steady_load(
    durable: tuple[DmqServer, Hub, StateStore],
) -> None:
    a, hub, store = durable
    frames_seen: list[int] = []
    passes = asyncio.ensure_future(checkpoint_loop(store, hub, interval=0.1, hold_frames=0))
    try:
        # Two messages every millisecond or so for 3 s: commits land during every
        # checkpoint pass.
        loop = asyncio.get_running_loop()
        end = loop.time() + 3.0
        sends = []
        while loop.time() < end:
            for _ in range(2):
                sends.append(asyncio.ensure_future(a.broadcast("durable", b"x", "text/plain")))
            if store.wal_frames not in frames_seen[-1:]:
                frames_seen.append(store.wal_frames)
            await asyncio.sleep(0.001)
        operations = await asyncio.gather(*sends)
    finally:
        passes.cancel()
    assert all(r.code == 200 for op in operations for r in op.results)
    assert committed_rows(store) == len(sends)
    restarts = sum(1 for before, after in itertools.pairwise(frames_seen) if after < before)
    # The WAL's frames went down again and again: it started over from its beginning.
    assert restarts >= 10, f"frames at each pass: {frames_seen}"
    assert max(frames_seen) < 3 * len(sends) // 4, f"frames at each pass: {frames_seen}"
    assert hub.checkpoint_holds >= 10


async def test_the_wal_is_let_grow_to_its_bound_before_a_hold(
    durable: tuple[DmqServer, Hub, StateStore],
) -> None:
    """Holding the commits every second would make a few messages a second wait for
    a hold; the WAL is let grow to ``hold_frames`` first, and held for then."""
    a, hub, store = durable
    frames_seen: list[int] = []
    passes = asyncio.ensure_future(checkpoint_loop(store, hub, interval=0.1, hold_frames=400))
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + 3.0
        sends = []
        while loop.time() < end:
            for _ in range(2):
                sends.append(asyncio.ensure_future(a.broadcast("durable", b"x", "text/plain")))
            if store.wal_frames not in frames_seen[-1:]:
                frames_seen.append(store.wal_frames)
            await asyncio.sleep(0.001)
        await asyncio.gather(*sends)
    finally:
        passes.cancel()
    restarts = [b for b, after in itertools.pairwise(frames_seen) if after < b]
    assert restarts, f"frames at each pass: {frames_seen}"
    # Every start-over came from a WAL at its bound, and the WAL stayed near it.
    assert min(restarts) >= 400, f"frames at each pass: {frames_seen}"
    assert 1 <= hub.checkpoint_holds <= len(restarts) + 1
    # (A WAL that never started over would have reached thousands of frames.)
    assert max(frames_seen) < 3 * 400, f"frames at each pass: {frames_seen}"
