"""Ordered, exactly-once, gap-aware delivery and durable history, in-process.

A real DmqServer plays the origin gateway and puts its own X-DMQ-Origin stamps on
KDMQ requests, so each test decides the order (and the duplicates) the gateway sees.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from app.dmq.events import SendOperation
from app.dmq.sip import SipUri
from app.gateway.config import GatewayConfig
from app.gateway.origin import ORIGIN_HEADER, build_origin, parse_origin
from app.gateway.store import HistoryStore
from tests.gateway.conftest import Node, node_config, running

PEER = "orders"
ORIGIN = "sip:127.0.0.1:5999"


def frame(ws: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ws.receive_text())
    return data


def send(node: Node, to: str, seq: int, body: str, epoch: str = "e1") -> int:
    """Send ``body`` stamped as message ``seq`` of ORIGIN; return the SIP code."""
    header = build_origin(ORIGIN, epoch, seq)

    async def go() -> SendOperation:
        _, waiter = node.server.send_nowait(
            PEER, body.encode(), "text/plain", SipUri.parse(to), headers=((ORIGIN_HEADER, header),)
        )
        return await waiter

    operation: SendOperation = node.call(go)
    return operation.results[0].code


def client_uri(config: GatewayConfig) -> str:
    return str(config.node.server_address)


def join(client: TestClient, node: Node) -> str:
    """Put ``node`` on the gateway's bus; return the gateway's SIP URI."""
    assert client.post("/v1/nodes", json={"uri": node.uri}).status_code == 201
    uri: str = client.get("/v1/health").json()["node"]
    return uri


def history(client: TestClient, since: int = 0) -> list[dict[str, Any]]:
    """Every entry after ``since``, read with a subscription that resumes."""
    info = client.get(f"/v1/peers/{PEER}").json()
    frames = []
    with client.websocket_connect(
        f"/v1/peers/{PEER}/subscribe?since={since}&epoch={info['epoch']}"
    ) as ws:
        assert frame(ws)["type"] == "subscribed"
        # Up to the offset the peer had: a message frame reaches one offset, a gap
        # frame (entries trimmed meanwhile) a range of them.
        reached = since
        while reached < info["offset"]:
            frames.append(frame(ws))
            reached = frames[-1]["offset" if frames[-1]["type"] == "message" else "to"]
    return frames


def bodies(frames: list[dict[str, Any]]) -> list[str]:
    return [f["body"] if f["type"] == "message" else f"gap {f['from']}-{f['to']}" for f in frames]


@pytest.fixture
def config(tmp_path: Path) -> GatewayConfig:
    return GatewayConfig(node=node_config(), state_dir=tmp_path / "state", reorder_wait=0.3)


def test_stamped_messages_are_delivered_in_order_once(config: GatewayConfig) -> None:
    with running(config) as client:
        origin = Node(client, node_config()).start()
        try:
            assert client.put(f"/v1/peers/{PEER}", json={}).status_code == 201
            gateway = join(client, origin)
            for seq in (1, 3, 4, 3, 1, 2, 5, 2):
                assert send(origin, gateway, seq, f"m{seq}") == 200
            assert bodies(history(client)) == ["m1", "m2", "m3", "m4", "m5"]
            assert client.get(f"/v1/peers/{PEER}").json()["received"] == 5
            # One hole (2) filled; m3 and m4 were held behind it.
            metrics = {
                s.name: s.value
                for family in text_string_to_metric_families(client.get("/metrics").text)
                for s in family.samples
            }
            assert metrics["dmq_reorder_hole_fill_seconds_count"] == 1
            assert metrics["dmq_reorder_held_peak"] == 2
            assert metrics["dmq_reorder_late_total"] == 0
        finally:
            origin.stop()


def test_a_live_subscriber_sees_a_gap_after_the_time_bound(config: GatewayConfig) -> None:
    with running(config) as client:
        origin = Node(client, node_config()).start()
        try:
            assert client.put(f"/v1/peers/{PEER}", json={}).status_code == 201
            gateway = join(client, origin)
            with client.websocket_connect(f"/v1/peers/{PEER}/subscribe") as ws:
                assert frame(ws)["type"] == "subscribed"
                assert send(origin, gateway, 1, "m1") == 200
                assert frame(ws)["body"] == "m1"
                assert send(origin, gateway, 4, "m4") == 200
                gap = frame(ws)  # after --reorder-wait (0.3 s here)
                assert gap["type"] == "gap"
                assert (gap["origin"], gap["origin_epoch"], gap["from"], gap["to"]) == (
                    ORIGIN,
                    "e1",
                    2,
                    3,
                )
                assert gap["offset"] == 2 and "reorder-wait" in gap["reason"]
                assert (frame(ws)["body"], send(origin, gateway, 2, "late")) == ("m4", 200)
                assert send(origin, gateway, 5, "m5") == 200
                assert frame(ws)["body"] == "m5"
            # On resume the gap entry is replayed in its place; the late copy is not.
            assert bodies(history(client)) == ["m1", "gap 2-3", "m4", "m5"]
        finally:
            origin.stop()


def test_a_new_origin_epoch_restarts_the_sequence(config: GatewayConfig) -> None:
    with running(config) as client:
        origin = Node(client, node_config()).start()
        try:
            assert client.put(f"/v1/peers/{PEER}", json={}).status_code == 201
            gateway = join(client, origin)
            for seq in (1, 2):
                send(origin, gateway, seq, f"a{seq}")
            send(origin, gateway, 1, "b1", epoch="e2")
            send(origin, gateway, 2, "b2", epoch="e2")
            assert bodies(history(client)) == ["a1", "a2", "b1", "b2"]
        finally:
            origin.stop()


def test_history_and_stream_state_survive_a_restart(config: GatewayConfig) -> None:
    # Held message 4 must still wait for 3 after the restart however slow the machine
    # is: this test is about what survives, not about giving up (tested below).
    config = replace(config, reorder_wait=60.0)
    with running(config) as client:
        origin = Node(client, node_config()).start()
        try:
            assert client.put(f"/v1/peers/{PEER}", json={"history": 50}).status_code == 201
            gateway = join(client, origin)
            for seq in (1, 2, 4):  # 4 is held (stored) when the gateway stops
                assert send(origin, gateway, seq, f"m{seq}") == 200
            before = client.get(f"/v1/peers/{PEER}").json()
            assert before["offset"] == 2
        finally:
            origin.stop()
    with running(config) as client:
        origin = Node(client, node_config()).start()
        try:
            after = client.get(f"/v1/peers/{PEER}").json()
            assert (after["epoch"], after["offset"]) == (before["epoch"], 2)
            gateway = join(client, origin)
            # A resent copy of a delivered message is not delivered again; 3 releases 4.
            assert send(origin, gateway, 2, "again") == 200
            assert send(origin, gateway, 3, "m3") == 200
            assert bodies(history(client, since=1)) == ["m2", "m3", "m4"]
        finally:
            origin.stop()


def test_held_messages_given_up_after_a_restart_leave_a_gap(config: GatewayConfig) -> None:
    with running(config) as client:
        origin = Node(client, node_config()).start()
        try:
            assert client.put(f"/v1/peers/{PEER}", json={}).status_code == 201
            gateway = join(client, origin)
            send(origin, gateway, 1, "m1")
            send(origin, gateway, 3, "m3")
        finally:
            origin.stop()
    with running(config) as client:
        deadline = time.monotonic() + 5
        while client.get(f"/v1/peers/{PEER}").json()["offset"] < 3:
            assert time.monotonic() < deadline, "the held message was never released"
            time.sleep(0.05)
        assert bodies(history(client)) == ["m1", "gap 2-2", "m3"]


def test_unstamped_messages_are_delivered_as_they_come(config: GatewayConfig) -> None:
    with running(config) as client:
        sender = Node(client, node_config()).start()
        try:
            assert client.put(f"/v1/peers/{PEER}", json={}).status_code == 201
            gateway = join(client, sender)
            for body in (b"x", b"x"):
                assert sender.send_later(PEER, body, gateway)().results[0].code == 200
            assert bodies(history(client)) == ["x", "x"]
        finally:
            sender.stop()


def test_retention_by_count_and_by_age(config: GatewayConfig) -> None:
    with running(config) as client:
        origin = Node(client, node_config()).start()
        try:
            # Long enough for a loaded machine to read the history back before it ages.
            put = client.put(f"/v1/peers/{PEER}", json={"history": 3, "history_max_age": 3.0})
            assert put.json()["history_max_age"] == 3.0
            gateway = join(client, origin)
            for seq in range(1, 6):
                send(origin, gateway, seq, f"m{seq}")
            info = client.get(f"/v1/peers/{PEER}").json()
            assert (info["offset"], info["history_size"]) == (5, 3)
            assert bodies(history(client, since=2)) == ["m3", "m4", "m5"]
            time.sleep(3.1)
            with client.websocket_connect(f"/v1/peers/{PEER}/subscribe?since=0") as ws:
                assert frame(ws)["type"] == "subscribed"
                gap = frame(ws)
                assert (gap["type"], gap["from"], gap["to"]) == ("gap", 1, 5)
            assert client.get(f"/v1/peers/{PEER}").json()["history_size"] == 0
        finally:
            origin.stop()
    # Trimmed rows stay trimmed; offsets go on after them.
    with running(config) as client:
        info = client.get(f"/v1/peers/{PEER}").json()
        assert (info["offset"], info["history_size"]) == (5, 0)


def test_the_memory_history_store_starts_a_new_epoch(config: GatewayConfig) -> None:
    config = replace(config, history_store=HistoryStore.MEMORY)
    with running(config) as client:
        assert client.put(f"/v1/peers/{PEER}", json={}).status_code == 201
        epoch = client.get(f"/v1/peers/{PEER}").json()["epoch"]
    with running(config) as client:
        info = client.get(f"/v1/peers/{PEER}").json()  # the registration is kept
        assert info["epoch"] != epoch and info["offset"] == 0


def test_our_stamps_go_on_across_a_restart(config: GatewayConfig) -> None:
    def stamps(client: TestClient) -> list[str | None]:
        receiver = Node(client, node_config()).start()
        try:
            receiver.listen(PEER)
            assert client.post("/v1/nodes", json={"uri": receiver.uri}).status_code == 201
            result = client.post(f"/v1/peers/{PEER}/broadcast?wait=true")
            assert result.json()["results"][0]["code"] == 200
            result = client.post(f"/v1/peers/{PEER}/send?node={receiver.uri}&wait=true")
            assert result.json()["results"][0]["code"] == 200
            return [m.origin for m in receiver.received]
        finally:
            receiver.stop()

    with running(config) as client:
        first = [parse_origin(s) for s in stamps(client)]
        # A send the node refuses uses up no seq (a receiver would wait for it).
        refused = client.post(f"/v1/peers/{PEER}/send?node=sip:127.0.0.1:9&wait=true")
        assert refused.status_code == 404
    with running(config) as client:
        second = [parse_origin(s) for s in stamps(client)]
    assert all(first + second)
    origin = first[0]
    assert origin is not None and origin.origin == client_uri(config)
    # Broadcasts count per peer; sends per peer and node (a new node each run here).
    assert [(s.seq, s.to != "") for s in first + second if s] == [
        (1, False),
        (1, True),
        (2, False),
        (1, True),
    ]
    assert len({(s.origin, s.epoch) for s in first + second if s}) == 1


def test_peers_json_is_imported_once(config: GatewayConfig) -> None:
    assert config.state_dir is not None
    config.state_dir.mkdir(parents=True)
    legacy = config.state_dir / "peers.json"
    legacy.write_text(json.dumps({"version": 1, "peers": {PEER: {"history": 7}}}))
    with running(config) as client:
        assert client.get(f"/v1/peers/{PEER}").json()["history"] == 7
        assert client.delete(f"/v1/peers/{PEER}").status_code == 204
    assert not legacy.exists() and legacy.with_suffix(".json.imported").exists()
    with running(config) as client:
        assert client.get("/v1/peers").json() == []


def test_a_corrupt_database_is_moved_aside(
    config: GatewayConfig, caplog: pytest.LogCaptureFixture
) -> None:
    assert config.state_dir is not None
    config.state_dir.mkdir(parents=True)
    database = config.state_dir / "gateway.db"
    database.write_bytes(b"this is not a database" * 100)
    with running(config) as client:
        assert client.put(f"/v1/peers/{PEER}", json={}).status_code == 201
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "cannot read" in errors[0].getMessage()
    assert (config.state_dir / "gateway.db.broken").read_bytes().startswith(b"this is not")
    with running(config) as client:
        assert [p["peer_id"] for p in client.get("/v1/peers").json()] == [PEER]


def test_subscriber_mode_delivers_at_once_and_answers_copies_itself(
    config: GatewayConfig,
) -> None:
    with running(config) as client:
        origin = Node(client, node_config()).start()
        try:
            put = client.put(
                f"/v1/peers/{PEER}", json={"reply": "subscriber", "reply_timeout": 0.9}
            )
            assert put.status_code == 201
            gateway = join(client, origin)
            with client.websocket_connect(f"/v1/peers/{PEER}/subscribe") as ws:
                assert frame(ws)["type"] == "subscribed"
                codes: list[int] = []

                def answer_next(body: str) -> None:
                    message = frame(ws)
                    assert message["body"] == body
                    ws.send_text(json.dumps({"type": "reply", "id": message["id"], "code": 202}))

                for seq in (2, 1):  # out of order: not held back
                    sent = origin.call(_start_send, origin, gateway, seq)
                    answer_next(f"m{seq}")
                    codes.append(origin.call(_wait, sent))
                # A copy is answered by the gateway (200), the subscriber sees nothing.
                codes.append(send(origin, gateway, 2, "m2"))
                assert codes == [202, 202, 200]
            assert client.get(f"/v1/peers/{PEER}").json()["offset"] == 2
        finally:
            origin.stop()


async def _start_send(node: Node, to: str, seq: int) -> Any:
    _, waiter = node.server.send_nowait(
        PEER,
        f"m{seq}".encode(),
        "text/plain",
        SipUri.parse(to),
        headers=((ORIGIN_HEADER, build_origin(ORIGIN, "e1", seq)),),
    )
    return waiter


async def _wait(waiter: Any) -> int:
    operation: SendOperation = await waiter
    return operation.results[0].code


def test_a_streams_position_outlives_the_history_rows_that_recorded_it(
    config: GatewayConfig,
) -> None:
    def offset_after_copy(seq: int) -> int:
        with running(config) as client:
            origin = Node(client, node_config()).start()
            try:
                gateway = join(client, origin)
                assert send(origin, gateway, seq, "copy") == 200
                offset: int = client.get(f"/v1/peers/{PEER}").json()["offset"]
                return offset
            finally:
                origin.stop()

    with running(config) as client:
        origin = Node(client, node_config()).start()
        try:
            assert client.put(f"/v1/peers/{PEER}", json={"history": 2}).status_code == 201
            gateway = join(client, origin)
            for seq in range(1, 6):
                assert send(origin, gateway, seq, f"m{seq}") == 200
        finally:
            origin.stop()
    # The start trims the rows of seqs 1-3; a copy of 2 is still known as delivered.
    assert offset_after_copy(2) == 5
    with running(config) as client:
        assert client.put(f"/v1/peers/{PEER}", json={"history": 0}).status_code == 200
    assert offset_after_copy(5) == 5  # nothing held any more, the position is kept


def test_subscriber_mode_deduplication_survives_a_restart(config: GatewayConfig) -> None:
    """Copies of messages a subscriber already answered, resent after the gateway
    restarted (the sender never got those answers), are answered 200 by the gateway
    and never shown to a subscriber again; one not seen before still is."""
    settings = {"reply": "subscriber", "reply_timeout": 0.9}

    def deliver(client: TestClient, origin: Node, gateway: str, seqs: tuple[int, ...]) -> None:
        with client.websocket_connect(f"/v1/peers/{PEER}/subscribe") as ws:
            assert frame(ws)["type"] == "subscribed"
            for seq in seqs:
                sent = origin.call(_start_send, origin, gateway, seq)
                message = frame(ws)
                assert message["body"] == f"m{seq}"
                ws.send_text(json.dumps({"type": "reply", "id": message["id"], "code": 202}))
                assert origin.call(_wait, sent) == 202

    with running(config) as client:
        origin = Node(client, node_config()).start()
        try:
            assert client.put(f"/v1/peers/{PEER}", json=settings).status_code == 201
            # 1 and 2 move the watermark; 4 is seen above it (3 has not come yet).
            deliver(client, origin, join(client, origin), (1, 2, 4))
        finally:
            origin.stop()
    with running(config) as client:
        origin = Node(client, node_config()).start()
        try:
            gateway = join(client, origin)
            with client.websocket_connect(f"/v1/peers/{PEER}/subscribe") as ws:
                assert frame(ws)["type"] == "subscribed"
                for seq in (1, 2, 4):
                    assert send(origin, gateway, seq, f"m{seq}") == 200
            assert client.get(f"/v1/peers/{PEER}").json()["offset"] == 3
            # 3 was never delivered: it still reaches the subscriber.
            deliver(client, origin, gateway, (3,))
            assert client.get(f"/v1/peers/{PEER}").json()["offset"] == 4
        finally:
            origin.stop()


def test_retention_by_bytes(config: GatewayConfig) -> None:
    """history_bytes trims the oldest entries once the bodies pass it (the newest is
    kept however large); a client resuming from a trimmed entry gets a gap frame, and
    the bound and what it trimmed outlive a restart."""
    with running(config) as client:
        origin = Node(client, node_config()).start()
        try:
            assert client.put(f"/v1/peers/{PEER}", json={"history": 100}).status_code == 201
            assert client.get(f"/v1/peers/{PEER}").json()["history_bytes"] == 16 * 1024 * 1024
            put = client.put(f"/v1/peers/{PEER}", json={"history": 100, "history_bytes": 10})
            assert put.json()["history_bytes"] == 10
            gateway = join(client, origin)
            for seq in range(1, 6):
                send(origin, gateway, seq, f"m{seq}xx")  # 4 bytes each: 2 fit in 10
            info = client.get(f"/v1/peers/{PEER}").json()
            assert (info["offset"], info["history_size"]) == (5, 2)
            with client.websocket_connect(f"/v1/peers/{PEER}/subscribe?since=1") as ws:
                assert frame(ws)["type"] == "subscribed"
                gap = frame(ws)
                assert (gap["type"], gap["from"], gap["to"]) == ("gap", 2, 3)
                assert [frame(ws)["body"] for _ in range(2)] == ["m4xx", "m5xx"]
            send(origin, gateway, 6, "x" * 50)  # larger than the bound: kept alone
            assert bodies(history(client, since=5)) == ["x" * 50]
            assert client.get(f"/v1/peers/{PEER}").json()["history_size"] == 1
        finally:
            origin.stop()
    with running(config) as client:
        info = client.get(f"/v1/peers/{PEER}").json()
        assert (info["history_bytes"], info["offset"], info["history_size"]) == (10, 6, 1)


def test_history_bytes_is_validated(config: GatewayConfig) -> None:
    with running(config) as client:
        response = client.put(f"/v1/peers/{PEER}", json={"history_bytes": -1})
        assert response.status_code == 422
        assert "history_bytes" in response.text
