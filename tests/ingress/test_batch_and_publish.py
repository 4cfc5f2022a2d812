"""Batch ingress (POST .../broadcast/batch, .../send/batch) and the publishing
WebSocket (GET .../publish), against an in-process gateway with a real DMQ node as
the receiver."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from app.api.routes.publish import MAX_BATCH
from app.gateway.config import GatewayConfig
from tests.gateway.conftest import Node, assert_problem, node_config, running, stop_all

PEER = "things"


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[tuple[TestClient, Node]]:
    config = GatewayConfig(node=node_config(), state_dir=tmp_path / "state")
    with running(config) as client:
        receiver = Node(client, node_config()).start()
        receiver.listen(PEER)
        assert client.post("/v1/nodes", json={"uri": receiver.uri}).status_code == 201
        try:
            yield client, receiver
        finally:
            stop_all(client, [receiver])


def test_a_json_batch_arrives_whole_and_in_order_with_one_result_per_message(
    bus: tuple[TestClient, Node],
) -> None:
    client, receiver = bus
    batch = [{"body": f'{{"n": {i}}}'} for i in range(300)]
    batch.append({"body": base64.b64encode(b"\x00\xff").decode(), "encoding": "base64",
                  "content_type": "application/octet-stream"})  # fmt: skip
    answer = client.post(f"/v1/peers/{PEER}/broadcast/batch?wait=true", json=batch)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == 301
    assert len({r["id"] for r in results}) == 301
    assert {r["results"][0]["code"] for r in results} == {200}
    bodies = [m.body for m in receiver.received]
    assert bodies == [f'{{"n": {i}}}'.encode() for i in range(300)] + [b"\x00\xff"]
    assert receiver.received[-1].content_type == "application/octet-stream"
    assert receiver.received[0].content_type == "application/json"


def test_an_ndjson_batch_to_one_node_is_accepted_with_one_id_per_message(
    bus: tuple[TestClient, Node],
) -> None:
    client, receiver = bus
    lines = "\n".join(json.dumps({"body": f"m{i}", "content_type": "text/plain"}) for i in range(5))
    answer = client.post(
        f"/v1/peers/{PEER}/send/batch",
        params={"node": receiver.uri},
        content=lines + "\n",
        headers={"content-type": "application/x-ndjson"},
    )
    assert answer.status_code == 202, answer.text
    accepted = answer.json()
    assert (accepted["targets"], accepted["nodes"], len(accepted["ids"])) == (
        1,
        [receiver.uri],
        5,
    )
    client.post(f"/v1/peers/{PEER}/broadcast?wait=true", content=b"last")  # behind the batch
    assert [m.body for m in receiver.received] == [f"m{i}".encode() for i in range(5)] + [b"last"]


def test_a_bad_batch_sends_nothing_and_says_which_message_is_wrong(
    bus: tuple[TestClient, Node],
) -> None:
    client, receiver = bus
    url = f"/v1/peers/{PEER}/broadcast/batch"
    problem = assert_problem(
        client.post(url, json=[{"body": "ok"}, {"body": 1}]), 422, "body.1.body"
    )
    assert problem["errors"][0]["loc"] == ["body", 1, "body"]
    assert_problem(client.post(url, json=[{"body": "x", "extra": 1}]), 422, "body.0.extra")
    assert_problem(client.post(url, json=[]), 422, f"1 to {MAX_BATCH}")
    assert_problem(client.post(url, json=[{"body": "x"}] * (MAX_BATCH + 1)), 422, "1 to")
    assert_problem(client.post(url, json=[{"body": "%%", "encoding": "base64"}]), 422, "base64")
    assert_problem(
        client.post(url, content=b"[]", headers={"content-type": "text/plain"}), 415, "ndjson"
    )
    assert_problem(
        client.post(url, json=[{"body": "x", "content_type": "multipart/form-data"}]),
        415,
        "form encoding",
    )
    assert_problem(client.post(url, json=[{"body": "x"}, {"body": "y" * 66_000}]), 413, "message 1")
    assert_problem(
        client.post("/v1/peers/notification_peer/broadcast/batch", json=[{"body": "x"}]), 409
    )
    assert receiver.received == []


def test_publishes_are_acked_in_order_with_every_nodes_result(
    bus: tuple[TestClient, Node],
) -> None:
    client, receiver = bus
    with client.websocket_connect(f"/v1/peers/{PEER}/publish") as ws:
        for i in range(50):
            ws.send_text(json.dumps({"type": "publish", "id": f"c{i}", "body": f"p{i}"}))
        ws.send_text(
            json.dumps({"type": "publish", "id": "bad", "body": "%%", "encoding": "base64"})
        )
        ws.send_text(json.dumps({"type": "publish", "body": "no id"}))
        ws.send_text(json.dumps({"type": "publish", "id": "big", "body": "x" * 66_000}))
        frames = [json.loads(ws.receive_text()) for _ in range(53)]
    acks = frames[:50]
    assert [f["id"] for f in acks] == [f"c{i}" for i in range(50)]
    assert {(f["type"], f["targets"], f["results"][0]["code"]) for f in acks} == {("ack", 1, 200)}
    assert [(f["type"], f["id"], f["status"]) for f in frames[50:]] == [
        ("error", "bad", 422),
        ("error", None, 422),
        ("error", "big", 413),
    ]
    assert "id" in frames[51]["error"]
    assert [m.body for m in receiver.received] == [f"p{i}".encode() for i in range(50)]


def test_publishing_needs_the_token(tmp_path: Path) -> None:
    config = GatewayConfig(
        node=node_config(), state_dir=tmp_path / "state", api_tokens=("s3cret-token",)
    )
    with running(config) as client:
        from starlette.websockets import WebSocketDisconnect

        with (
            pytest.raises(WebSocketDisconnect) as refused,
            client.websocket_connect(f"/v1/peers/{PEER}/publish"),
        ):
            pass
        assert refused.value.code == 1008
        with client.websocket_connect(f"/v1/peers/{PEER}/publish?token=s3cret-token") as ws:
            ws.send_text(json.dumps({"type": "publish", "id": "a", "body": "x"}))
            assert json.loads(ws.receive_text())["type"] == "ack"


def test_a_publisher_ahead_of_its_acks_is_not_read_until_acks_go_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flow control: with MAX_UNACKED publishes unacknowledged the gateway stops
    reading the connection, so nothing more reaches the bus until an ack goes out."""
    from app.api.routes import publish
    from app.dmq.transaction import TimerSettings

    monkeypatch.setattr(publish, "MAX_UNACKED", 3)
    # A "node" that never answers: a UDP socket nobody reads. Acks wait for Timer F.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    silent.settimeout(0.2)
    uri = f"sip:127.0.0.1:{silent.getsockname()[1]}"
    config = GatewayConfig(
        node=node_config(timers=TimerSettings(t1=0.5, t2=1.0, timer_f=4.0)),
        state_dir=tmp_path / "state",
    )

    def call_ids() -> set[bytes]:
        seen = set()
        with contextlib.suppress(TimeoutError):
            while True:
                data = silent.recv(65536)
                if data.startswith(f"KDMQ sip:{PEER}@".encode()):
                    seen.add(next(h for h in data.split(b"\r\n") if h.startswith(b"Call-ID")))
        return seen

    try:
        with running(config) as client:
            assert client.post("/v1/nodes", json={"uri": uri}).status_code == 201
            with client.websocket_connect(f"/v1/peers/{PEER}/publish") as ws:
                for i in range(6):
                    ws.send_text(json.dumps({"type": "publish", "id": f"c{i}", "body": f"p{i}"}))
                first = call_ids() | call_ids()
                assert len(first) == 3  # the other three are not read yet
                acks = [json.loads(ws.receive_text()) for _ in range(6)]
            assert [a["id"] for a in acks] == [f"c{i}" for i in range(6)]
            assert acks[0]["results"][0]["timeout"] is True
    finally:
        silent.close()
