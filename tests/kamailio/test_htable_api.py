"""The /v1/htable API and the htable mirror in-process, with another real DMQ node.

The gateway runs under Starlette's TestClient (a real DmqServer on loopback UDP); a
second DmqServer plays a Kamailio node: it answers every htable message 200 and keeps
the bodies, or sends the gateway Kamailio's own bodies. The behaviour against real
Kamailio processes is in test_htable_kamailio.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from app.gateway.config import GatewayConfig
from tests.gateway.conftest import Node, assert_problem, node_config, running

CAPTURES = Path(__file__).parent / "captures" / "htable"


class Bus:
    def __init__(self, client: TestClient, node: Node) -> None:
        self.client = client
        self.node = node
        self.gateway_uri = str(client.app.state.gateway.config.node.server_address)  # type: ignore[attr-defined]

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(m.body) for m in self.node.received if m.peer_id == "htable"]

    def send(self, body: bytes) -> int:
        """Send an htable body to the gateway as a Kamailio node; its SIP answer."""
        operation = self.node.send_later("htable", body, self.gateway_uri)()
        (result,) = operation.results
        return result.code


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    config = GatewayConfig(
        node=node_config(),
        state_dir=tmp_path / "state",
        kamailio_mirrors=("htable",),
        htable_autoexpire=(("hx", 300),),
    )
    with running(config) as client:
        node = Node(client, node_config(str(config.node.server_address))).start()
        node.listen("htable")
        try:
            deadline = time.monotonic() + 5
            while client.get("/v1/health").json()["active_nodes"] < 1:
                assert time.monotonic() < deadline, "the node did not join"
                time.sleep(0.02)
            yield Bus(client, node)
        finally:
            node.stop()


def test_put_sends_kamailios_set_to_every_node_and_reads_back(bus: Bus) -> None:
    response = bus.client.put("/v1/htable/ht/greeting", json={"value": "hello"})
    assert response.status_code == 200, response.text
    out = response.json()
    assert [(r["node"], r["code"]) for r in out["results"]["results"]] == [(bus.node.uri, 200)]
    assert out["expire"] is None and out["applied"] == 1
    assert bus.bodies()[-1] == {
        "action": 2,
        "htname": "ht",
        "cname": "greeting",
        "type": 2,
        "strval": "hello",
        "mode": 1,
    }
    key = bus.client.get("/v1/htable/ht/greeting").json()
    assert key["value"] == "hello" and key["type"] == "str" and key["source"] is None


def test_put_with_expires_sends_set_then_set_expire(bus: Bus) -> None:
    response = bus.client.put("/v1/htable/hx/a%2Fb", json={"value": -7, "expires": 30})
    assert response.status_code == 200, response.text
    assert response.json()["expire"]["results"][0]["code"] == 200
    assert [b["action"] for b in bus.bodies()[-2:]] == [2, 3]
    assert bus.bodies()[-1] == {
        "action": 3,
        "htname": "hx",
        "cname": "a/b",
        "type": 0,
        "intval": 30,
        "mode": 0,
    }
    expires = bus.client.get("/v1/htable/hx/a/b").json()["expires"]
    assert expires == pytest.approx(time.time() + 30, abs=5)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"value": 2**31}, "body.value"),
        ({"value": -(2**31) - 1}, "body.value"),
        ({"value": True}, "body.value"),
        ({"value": 1.5}, "body.value"),
        ({"value": None}, "body.value"),
        ({"value": "a\u0000b"}, "body.value"),
        ({}, "body.value"),
        ({"value": "v", "expires": 0}, "body.expires"),
        ({"value": "v", "expires": "10"}, "body.expires"),
        ({"value": "v", "ttl": 10}, "body.ttl"),
    ],
)
def test_bad_values_are_422_naming_the_field_and_send_nothing(
    bus: Bus, body: dict[str, Any], field: str
) -> None:
    before = len(bus.bodies())
    assert_problem(bus.client.put("/v1/htable/ht/k", json=body), 422, field)
    assert len(bus.bodies()) == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"match": "glob", "pattern": "x"}, "body.match"),
        ({"match": "regex", "on": "both", "pattern": "x"}, "body.on"),
        ({"match": "regex", "pattern": ""}, "body.pattern"),
        ({"match": "regex", "pattern": "(unclosed"}, "body.pattern"),
    ],
)
def test_bad_removals_are_422_naming_the_field(bus: Bus, body: dict[str, Any], field: str) -> None:
    assert_problem(bus.client.post("/v1/htable/ht/delete", json=body), 422, field)


LONG = "k" * 1025


@pytest.mark.parametrize(
    ("method", "path", "params", "field"),
    [
        ("GET", "/v1/htable/ht", {"limit": 0}, "query.limit"),
        ("GET", "/v1/htable/ht", {"limit": 1001}, "query.limit"),
        ("GET", "/v1/htable/ht", {"limit": "all"}, "query.limit"),
        ("GET", "/v1/htable/ht", {"prefix": LONG}, "query.prefix"),
        ("GET", "/v1/htable/ht", {"after": LONG}, "query.after"),
        ("GET", f"/v1/htable/{LONG}", {}, "path.table"),
        ("GET", f"/v1/htable/ht/{LONG}", {}, "path.key"),
        ("GET", "/v1/htable/ht/a%00b", {}, "path.key"),
        ("DELETE", f"/v1/htable/ht/{LONG}", {}, "path.key"),
        ("DELETE", "/v1/htable/ht/k", {"timeout": 0}, "query.timeout"),
        ("DELETE", "/v1/htable/ht/k", {"timeout": "soon"}, "query.timeout"),
        ("PUT", "/v1/htable/ht/k", {"timeout": -1}, "query.timeout"),
        ("PUT", f"/v1/htable/{LONG}/k", {}, "path.table"),
    ],
)
def test_bad_paths_and_queries_are_422_naming_the_field_and_send_nothing(
    bus: Bus, method: str, path: str, params: dict[str, Any], field: str
) -> None:
    before = len(bus.bodies())
    body = {"value": "v"} if method == "PUT" else None
    response = bus.client.request(method, path, params=params, json=body)
    assert_problem(response, 422, field)
    assert len(bus.bodies()) == before


def test_delete_and_delete_matching(bus: Bus) -> None:
    for key in ("tmp_1", "tmp_2", "keep"):
        bus.client.put(f"/v1/htable/ht/{key}", json={"value": "x"})
    response = bus.client.post(
        "/v1/htable/ht/delete", json={"match": "regex", "on": "name", "pattern": "^TMP_"}
    )
    assert response.json()["applied"] == 2
    assert bus.bodies()[-1] == {
        "action": 5,
        "htname": "ht",
        "type": 2,
        "strval": "^TMP_",
        "mode": 0,
    }
    response = bus.client.delete("/v1/htable/ht/keep")
    assert response.status_code == 200 and response.json()["applied"] == 1
    assert bus.bodies()[-1] == {"action": 4, "htname": "ht", "cname": "keep", "mode": 0}
    assert_problem(bus.client.get("/v1/htable/ht/keep"), 404, "keep")


def test_what_kamailio_sends_is_in_the_replica_and_the_stream(bus: Bus) -> None:
    with bus.client.websocket_connect("/v1/htable/ht/changes") as ws:
        subscribed = ws.receive_json()
        assert subscribed["type"] == "subscribed" and subscribed["peer"] == "htable/ht"
        assert bus.send((CAPTURES / "10-set-str.json").read_bytes().strip()) == 200
        change = ws.receive_json()
        assert change["event"] == "set" and change["key"] == "live_s"
        assert change["data"] == {"value": "hello-live", "type": "str", "expires": None}
        assert change["from"] == bus.node.uri
        assert bus.send((CAPTURES / "16-delete.json").read_bytes().strip()) == 200  # absent
        assert bus.send(b'{"action":4,"htname":"ht","cname":"live_s","mode":0}') == 200
        change = ws.receive_json()
        assert (change["event"], change["key"], change["data"]) == ("delete", "live_s", None)
        assert change["offset"] == subscribed["offset"] + 2


def test_a_malformed_body_is_400_counted_and_leaves_the_replica_intact(bus: Bus) -> None:
    bus.client.put("/v1/htable/ht/k", json={"value": 1})
    bad = b'{"action":2,"htname":"ht","cname":"k","type":0,"intval":2,"mode":1,"last_modified":1}'
    assert bus.send(bad) == 400
    assert bus.send(b"{not json") == 400
    assert bus.send(b"{also not json") == 400
    assert bus.client.get("/v1/htable/ht/k").json()["value"] == 1
    metrics = bus.client.get("/metrics").text
    sender = bus.node.uri
    assert (
        f'dmq_kamailio_malformed_total{{kind="field",mirror="htable",sender="{sender}"}} 1.0'
        in metrics
    )
    assert (
        f'dmq_kamailio_malformed_total{{kind="json",mirror="htable",sender="{sender}"}} 2.0'
        in metrics
    )
    # A 6.0+ removal a 5.6 node cannot replay: 500, as Kamailio answers.
    assert bus.send(b'{"action":7,"htname":"ht","mode":0}') == 500


def test_a_sync_request_to_the_gateway_gets_the_mirrors_200(bus: Bus) -> None:
    operation = bus.node.send_later("htable", b'{"action":1}', bus.gateway_uri)()
    (result,) = operation.results
    assert (result.code, result.body) == (200, b'{"mirror":true,"donates":false}')


def test_tables_are_listed_and_paged_with_a_prefix(bus: Bus) -> None:
    cells = [
        {"htname": "big", "cname": f"key-{n:02}", "type": 0, "intval": n, "expire": 0}
        for n in range(25)
    ]
    assert bus.send(json.dumps({"cells": cells}).encode()) == 200
    tables = bus.client.get("/v1/htable").json()
    assert {"table": "big", "cells": 25, "autoexpire": None, "expiring": False} in tables["tables"]
    page = bus.client.get("/v1/htable/big", params={"prefix": "key-1", "limit": 4}).json()
    assert page["cells"] == 10 and [k["key"] for k in page["keys"]] == [
        "key-10",
        "key-11",
        "key-12",
        "key-13",
    ]
    page = bus.client.get(
        "/v1/htable/big", params={"prefix": "key-1", "limit": 8, "after": page["next"]}
    ).json()
    assert [k["key"] for k in page["keys"]] == [f"key-{n}" for n in range(14, 20)]
    assert page["next"] is None


def test_with_the_mirror_off_the_routes_are_404(tmp_path: Path) -> None:
    config = replace(GatewayConfig(node=node_config()), state_dir=tmp_path / "s")
    with running(config) as client:
        assert_problem(client.get("/v1/htable"), 404, "--kamailio-mirrors")
        assert_problem(client.put("/v1/htable/ht/k", json={"value": 1}), 404, "mirror")
        with client.websocket_connect("/v1/htable/ht/changes") as ws:
            message = ws.receive()
            assert message["type"] == "websocket.close" and message["code"] == 4004


def test_a_raw_htable_peer_and_the_mirror_coexist(bus: Bus) -> None:
    assert bus.client.put("/v1/peers/htable", json={}).status_code == 201
    with bus.client.websocket_connect("/v1/peers/htable/subscribe") as raw:
        assert raw.receive_json()["type"] == "subscribed"
        body = b'{"action":2,"htname":"ht","cname":"both","type":0,"intval":3,"mode":1}'
        assert bus.send(body) == 200
        assert raw.receive_json()["body"] == body.decode()  # exactly as sent
        assert bus.client.get("/v1/htable/ht/both").json()["value"] == 3  # and applied
        # The raw peer answers now: 200 (auto) even to what the mirror refuses,
        # which the mirror still counts.
        assert bus.send(b"{bad") == 200
        assert raw.receive_json()["body"] == "{bad"
    assert 'kind="json",mirror="htable"' in bus.client.get("/metrics").text
    # Unregistered: the mirror answers alone again, as Kamailio would.
    assert bus.client.delete("/v1/peers/htable").status_code == 204
    assert bus.send(b"{bad") == 400


def test_the_change_stream_resumes_and_says_when_it_cannot(bus: Bus) -> None:
    """The subscribe path's rules on a table's stream: ``since`` replays what came
    after it, another epoch gets a gap frame then everything held, ``epoch`` alone is
    refused (1008)."""
    for key in ("r1", "r2", "r3"):
        body = f'{{"action":2,"htname":"ht","cname":"{key}","type":2,"strval":"v","mode":1}}'
        assert bus.send(body.encode()) == 200
    with bus.client.websocket_connect("/v1/htable/ht/changes") as ws:
        subscribed = ws.receive_json()
    epoch, latest = subscribed["epoch"], subscribed["offset"]
    assert latest == 3
    with bus.client.websocket_connect(f"/v1/htable/ht/changes?since=1&epoch={epoch}") as ws:
        assert ws.receive_json()["since"] == 1
        replayed = [ws.receive_json() for _ in range(2)]
    assert [(c["offset"], c["key"]) for c in replayed] == [(2, "r2"), (3, "r3")]
    with bus.client.websocket_connect("/v1/htable/ht/changes?since=3&epoch=0000") as ws:
        assert ws.receive_json()["type"] == "subscribed"
        gap = ws.receive_json()
        assert gap["type"] == "gap" and gap["epoch"] == epoch and gap["client_epoch"] == "0000"
        assert [ws.receive_json()["key"] for _ in range(3)] == ["r1", "r2", "r3"]
    with bus.client.websocket_connect(f"/v1/htable/ht/changes?epoch={epoch}") as ws:
        message = ws.receive()
        assert message["type"] == "websocket.close" and message["code"] == 1008
