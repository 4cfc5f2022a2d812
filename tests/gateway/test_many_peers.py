"""Registering one more peer costs the same with 3 000 peers as with none: each PUT
writes its own row, never the whole registry."""

from __future__ import annotations

import time

from starlette.testclient import TestClient

from app.gateway.store import StateStore

PEERS = 3_000
SAMPLE = 100


def _register(client: TestClient, store: StateStore, first: int, count: int) -> tuple[int, float]:
    """SQL statements run and CPU seconds spent registering ``count`` new peers."""
    statements = 0

    def count_statement(_sql: str) -> None:
        nonlocal statements
        statements += 1

    store.db.set_trace_callback(count_statement)
    started = time.process_time()
    for index in range(first, first + count):
        assert client.put(f"/v1/peers/p{index}", json={}).status_code == 201
    spent = time.process_time() - started
    store.db.set_trace_callback(None)
    return statements, spent


def test_the_cost_of_a_put_does_not_grow_with_the_registry(client: TestClient) -> None:
    store = client.app.state.gateway._store  # type: ignore[attr-defined]
    assert isinstance(store, StateStore)
    first_statements, first_cpu = _register(client, store, 0, SAMPLE)
    for index in range(SAMPLE, PEERS - SAMPLE):
        assert client.put(f"/v1/peers/p{index}", json={}).status_code == 201
    last_statements, last_cpu = _register(client, store, PEERS - SAMPLE, SAMPLE)

    assert len(client.get("/v1/peers").json()) == PEERS
    # The database does the same work for the 3 000th peer as for the first...
    assert first_statements > 0
    assert last_statements == first_statements
    # ...and so does the process as a whole (a generous factor: the machine is shared).
    assert last_cpu < 3 * first_cpu + 0.05
