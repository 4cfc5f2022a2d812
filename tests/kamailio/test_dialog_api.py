"""/v1/dialogs and the dialog mirror in-process, with another real DMQ node that sends
the gateway the bodies Kamailio 5.6 sent for one call (captured). Against real
Kamailio and sipp: test_dialog_kamailio.py.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from app.gateway.config import GatewayConfig
from app.kamailio.bootstrap import MIRROR_BODY
from tests.gateway.conftest import Node, assert_problem, node_config, running
from tests.kamailio.captured import dialog_body

CAPTURES = Path(__file__).parent / "captures" / "dialog"


class Bus:
    def __init__(self, client: TestClient, node: Node) -> None:
        self.client = client
        self.node = node
        self.gateway_uri = str(client.app.state.gateway.config.node.server_address)  # type: ignore[attr-defined]

    def send(self, body: bytes | str) -> tuple[int, bytes]:
        if isinstance(body, str):
            body = dialog_body(body)
        operation = self.node.send_later("dialog", body, self.gateway_uri)()
        (result,) = operation.results
        return result.code, result.body or b""


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    config = GatewayConfig(
        node=node_config(), state_dir=tmp_path / "state", kamailio_mirrors=("dialog",)
    )
    with running(config) as client:
        # It says it runs Kamailio: the node a dialog sync would be asked of, were
        # --dialog-sync on (it is off by default).
        kamailio = dataclasses.replace(
            node_config(str(config.node.server_address)), user_agent="kamailio (5.6.3)"
        )
        node = Node(client, kamailio).start()
        node.listen("dialog")
        try:
            deadline = time.monotonic() + 5
            while client.get("/v1/health").json()["active_nodes"] < 1:
                assert time.monotonic() < deadline, "the node did not join"
                time.sleep(0.02)
            yield Bus(client, node)
        finally:
            node.stop()


def test_a_call_is_listed_with_counts_and_goes_after_the_bye(bus: Bus) -> None:
    for name in ("02-update-new-dialog.json", "03-state-early.json", "04-state-confirmed.json"):
        assert bus.send(name)[0] == 200
    listing = bus.client.get("/v1/dialogs").json()
    assert listing["total"] == 1 and listing["counts"]["confirmed"] == 1
    (dialog,) = listing["items"]
    assert dialog["id"] == f"2502:1058@{bus.node.uri}"
    assert dialog["state"] == "confirmed" and dialog["vars"] == {"billing": "acct-42"}
    assert dialog["caller"]["tag"] == "17651SIPpTag001"
    assert bus.client.get(f"/v1/dialogs/{dialog['id']}").json()["callid"] == "1-17651@127.0.0.1"
    assert bus.client.get("/v1/dialogs", params={"state": "early"}).json()["items"] == []
    assert bus.send("06-state-deleted.json")[0] == 200
    listing = bus.client.get("/v1/dialogs").json()
    assert listing["total"] == 0 and listing["counts"]["deleted"] == 1
    deleted = bus.client.get("/v1/dialogs", params={"state": "deleted"}).json()
    assert [d["id"] for d in deleted["items"]] == [dialog["id"]]
    assert bus.send("07-rm.json")[0] == 200
    assert sum(bus.client.get("/v1/dialogs").json()["counts"].values()) == 0
    assert_problem(bus.client.get(f"/v1/dialogs/{dialog['id']}"), 404, "no dialog")


def test_what_kamailio_answers_500_and_400_and_a_sync_request(bus: Bus) -> None:
    assert bus.send("04-state-confirmed.json")[0] == 500  # a dialog it never saw
    assert bus.send(b'{"action":1}')[0] == 400
    assert bus.send(b"{")[0] == 400
    assert bus.send("01-sync-request.json") == (200, MIRROR_BODY)
    assert not [m for m in bus.node.received if m.body == b'{"action":4}']  # never asks
    assert bus.client.get("/v1/dialogs").json()["sync"] == {
        "state": "off",
        "donor": None,
        "requests_sent": 0,
        "asked": [],
        "resyncs": 0,
    }
    metrics = bus.client.get("/metrics").text
    assert 'dmq_kamailio_mirror{mirror="dialog",what="unknown"} 1.0' in metrics
    assert 'kind="missing",mirror="dialog"' in metrics and 'kind="json",mirror="dialog"' in metrics


def test_pages_follow_the_cursor(bus: Bus) -> None:
    raw = (CAPTURES / "02-update-new-dialog.json").read_text().strip()
    for h_id in range(5):
        body = raw.replace('"h_id":1058', f'"h_id":{h_id}').replace("1-17651", f"call-{h_id}")
        assert bus.send(body.encode())[0] == 200
    first = bus.client.get("/v1/dialogs", params={"limit": 2}).json()
    assert first["total"] == 5 and len(first["items"]) == 2 and first["next"]
    ids = [d["id"] for d in first["items"]]
    after: str | None = first["next"]
    while after is not None:
        page = bus.client.get("/v1/dialogs", params={"limit": 2, "after": after}).json()
        ids += [d["id"] for d in page["items"]]
        after = page["next"]
    assert ids == sorted(ids) and len(set(ids)) == 5


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"state": "ringing"}, "state"),
        ({"limit": 0}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"after": "x" * 1025}, "after"),
    ],
)
def test_bad_queries_are_422_naming_the_field(bus: Bus, params: dict[str, Any], field: str) -> None:
    assert_problem(bus.client.get("/v1/dialogs", params=params), 422, field)


def test_the_change_stream_shows_each_state(bus: Bus) -> None:
    with bus.client.websocket_connect("/v1/dialogs/changes") as ws:
        assert json.loads(ws.receive_text())["type"] == "subscribed"
        for name in (
            "02-update-new-dialog.json",
            "03-state-early.json",
            "04-state-confirmed.json",
            "05-update-from-sync-confirmed.json",  # a repeat: no change
            "06-state-deleted.json",
            "07-rm.json",
        ):
            bus.send(name)
        frames = [json.loads(ws.receive_text()) for _ in range(5)]
    assert [(f["event"], f["data"]["state"]) for f in frames] == [
        ("created", "unconfirmed"),
        ("state", "early"),
        ("state", "confirmed"),
        ("state", "deleted"),
        ("removed", "deleted"),
    ]
    assert frames[2]["data"]["previous"] == "early"


def test_a_dialog_id_too_long_is_422_naming_the_path_field(bus: Bus) -> None:
    assert_problem(bus.client.get("/v1/dialogs/" + "1" * 1025), 422, "path.dialog_id")


def test_a_raw_dialog_peer_and_the_mirror_coexist(bus: Bus) -> None:
    """A raw peer ``dialog`` gets every body as sent and answers it (200 even to a STATE
    the mirror cannot match); the mirror still applies each; unregistered, the mirror
    answers as Kamailio again."""
    assert bus.client.put("/v1/peers/dialog", json={}).status_code == 201
    with bus.client.websocket_connect("/v1/peers/dialog/subscribe") as raw:
        assert raw.receive_json()["type"] == "subscribed"
        new = (CAPTURES / "02-update-new-dialog.json").read_bytes().strip()
        assert bus.send(new)[0] == 200
        assert raw.receive_json()["body"] == new.decode()  # exactly as sent
        assert bus.client.get("/v1/dialogs").json()["counts"]["unconfirmed"] == 1
        rm = (CAPTURES / "07-rm.json").read_bytes().strip()
        assert bus.send(rm)[0] == 200
        assert raw.receive_json()["body"] == rm.decode()
        assert sum(bus.client.get("/v1/dialogs").json()["counts"].values()) == 0  # applied
        assert bus.send("04-state-confirmed.json")[0] == 200  # the raw peer's answer
        raw.receive_json()
    assert bus.client.delete("/v1/peers/dialog").status_code == 204
    assert bus.send("04-state-confirmed.json")[0] == 500  # the mirror's, as Kamailio's


def test_with_dialog_sync_the_mirror_asks_one_node_once(tmp_path: Path) -> None:
    """--dialog-sync: one request to the one Kamailio node, sent once (the node's 200
    ends the bootstrap: it has no dialog to send)."""
    config = GatewayConfig(
        node=node_config(),
        state_dir=tmp_path / "state",
        kamailio_mirrors=("dialog",),
        dialog_sync=True,
    )
    with running(config) as client:
        kamailio = dataclasses.replace(
            node_config(str(config.node.server_address)), user_agent="kamailio (5.6.3)"
        )
        # Listening before it joins: a request that came first would be answered 404
        # and asked again, which is not what this test is about.
        node = Node(client, kamailio)
        node.listen("dialog")
        node.start()
        try:
            deadline = time.monotonic() + 5
            while not [m for m in node.received if m.body == b'{"action":4}']:
                assert time.monotonic() < deadline, "no dialog sync request"
                time.sleep(0.02)
            time.sleep(0.3)  # a retransmission would have come by now
            assert [m.body for m in node.received] == [b'{"action":4}']
            metric = 'dmq_kamailio_mirror{mirror="dialog",what="sync_requests_sent"} 1.0'
            assert metric in client.get("/metrics").text
            sync = client.get("/v1/dialogs").json()["sync"]
            assert (sync["state"], sync["donor"], sync["asked"]) == ("synced", node.uri, [node.uri])
        finally:
            node.stop()
