"""The node list through the API: a removed node is not revived by a third party's
list until its tombstone expires."""

from __future__ import annotations

import time
from dataclasses import replace

from starlette.testclient import TestClient

from app.dmq.transaction import TimerSettings
from tests.gateway.conftest import Node, node_config, stop_all


def uris(client: TestClient) -> set[str]:
    return {node["uri"] for node in client.get("/v1/nodes").json()}


def test_a_removed_node_comes_back_from_another_list_only_after_its_tombstone(
    client: TestClient,
) -> None:
    # C pings once a minute: in this test it never speaks to the gateway by itself,
    # so only B's node list (B answers the gateway's pings every second) names it.
    quiet = replace(node_config(timers=TimerSettings()), ping_interval=60.0)
    c = Node(client, quiet).start()
    b = Node(client, node_config(c.uri)).start()
    try:
        assert client.post("/v1/nodes", json={"uri": b.uri}).status_code == 201
        deadline = time.monotonic() + 5
        while c.uri not in uris(client):
            assert time.monotonic() < deadline, "the gateway never learnt C from B's list"
            time.sleep(0.05)
        assert client.delete(f"/v1/nodes/{c.uri}").status_code == 204
        removed_at = time.monotonic()
        # Tombstoned for three ping intervals (3 s): B's answers to two pings in that
        # time still name C, and are not believed.
        while time.monotonic() - removed_at < 2.2:
            assert c.uri not in uris(client)
            time.sleep(0.1)
        deadline = removed_at + 6
        while c.uri not in uris(client):
            assert time.monotonic() < deadline, "C never came back once its tombstone expired"
            time.sleep(0.05)
    finally:
        stop_all(client, [b, c])
