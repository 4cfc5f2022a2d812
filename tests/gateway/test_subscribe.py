"""Subscriptions against an in-process gateway: first frames, resume, replies."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from tests.gateway.conftest import Node, node_config

PEER = "rpc"


def frame(ws: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ws.receive_text())
    return data


def test_first_frame_says_where_the_stream_starts(client: TestClient) -> None:
    assert client.put(f"/v1/peers/{PEER}", json={}).status_code == 201
    epoch = client.get(f"/v1/peers/{PEER}").json()["epoch"]
    with client.websocket_connect(f"/v1/peers/{PEER}/subscribe") as ws:
        assert frame(ws) == {
            "type": "subscribed",
            "peer": PEER,
            "epoch": epoch,
            "offset": 0,
            "since": 0,
        }


def test_since_beyond_the_offset_gets_a_gap_and_the_history(client: TestClient) -> None:
    sender = Node(client, node_config()).start()
    try:
        assert client.put(f"/v1/peers/{PEER}", json={}).status_code == 201
        assert client.post("/v1/nodes", json={"uri": sender.uri}).status_code == 201
        gateway_uri = client.get("/v1/health").json()["node"]
        for n in range(2):
            assert sender.send_later(PEER, f"m{n}".encode(), gateway_uri)().results[0].code == 200
        with client.websocket_connect(f"/v1/peers/{PEER}/subscribe?since=7") as ws:
            first = frame(ws)
            assert (first["type"], first["offset"], first["since"]) == ("subscribed", 2, 0)
            gap = frame(ws)
            assert gap["type"] == "gap" and "since=7 is beyond" in gap["reason"], gap
            assert [frame(ws)["body"] for _ in range(2)] == ["m0", "m1"]
    finally:
        sender.stop()


@pytest.mark.parametrize(
    ("query", "mentions"),
    [("?epoch=abc", "epoch needs since"), ("?since=-1", "non-negative integer")],
)
def test_bad_query_is_closed_1008_with_a_reason(
    client: TestClient, query: str, mentions: str
) -> None:
    assert client.put(f"/v1/peers/{PEER}", json={}).status_code == 201
    with (
        client.websocket_connect(f"/v1/peers/{PEER}/subscribe{query}") as ws,
        pytest.raises(WebSocketDisconnect) as closed,
    ):
        ws.receive_text()
    assert closed.value.code == 1008
    assert mentions in closed.value.reason


def test_a_late_reply_gets_an_error_frame(client: TestClient) -> None:
    gateway_uri = client.get("/v1/health").json()["node"]
    sender = Node(client, node_config(gateway_uri)).start()
    try:
        body = {"reply": "subscriber", "reply_timeout": 0.2}
        assert client.put(f"/v1/peers/{PEER}", json=body).status_code == 201
        with client.websocket_connect(f"/v1/peers/{PEER}/subscribe") as ws:
            assert frame(ws)["type"] == "subscribed"
            result = sender.send_later(PEER, b"question", gateway_uri)
            message = frame(ws)
            # Nobody answers in reply_timeout: the node answers 408 itself...
            assert result().results[0].code == 408
            # ...and the reply that comes after is refused, saying why.
            ws.send_text(json.dumps({"type": "reply", "id": message["id"], "code": 200}))
            error = frame(ws)
            assert (error["type"], error["id"]) == ("error", message["id"])
            assert "408" in error["error"], error

            # Answered in time: the reply is the SIP answer; a second one is refused.
            result = sender.send_later(PEER, b"again", gateway_uri)
            message = frame(ws)
            reply = {"type": "reply", "id": message["id"], "code": 486, "reason": "Busy Here"}
            ws.send_text(json.dumps(reply))
            assert result().results[0].code == 486
            ws.send_text(json.dumps(reply))
            error = frame(ws)
            assert "already answered 486" in error["error"], error
            ws.send_text(json.dumps({"type": "reply", "id": "nope", "code": 200}))
            assert "not waiting for a reply" in frame(ws)["error"]
        assert client.get("/metrics").text.count("dmq_peer_reply_timeouts_total 1.0") == 1
    finally:
        sender.stop()


def test_unregister_answers_every_pending_reply(client: TestClient) -> None:
    gateway_uri = client.get("/v1/health").json()["node"]
    sender = Node(client, node_config(gateway_uri)).start()
    try:
        body = {"reply": "subscriber", "reply_timeout": 0.9}
        assert client.put(f"/v1/peers/{PEER}", json=body).status_code == 201
        with client.websocket_connect(f"/v1/peers/{PEER}/subscribe") as ws:
            assert frame(ws)["type"] == "subscribed"
            results = [sender.send_later(PEER, f"q{n}".encode(), gateway_uri) for n in range(3)]
            assert [frame(ws)["body"] for _ in range(3)] == ["q0", "q1", "q2"]
            assert client.delete(f"/v1/peers/{PEER}").status_code == 204
            assert [r().results[0].code for r in results] == [404, 404, 404]
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
            assert closed.value.code == 4004
    finally:
        sender.stop()
