"""/v1/registrations and the usrloc mirror in-process, with another real DMQ node.

The gateway runs under Starlette's TestClient (a real DmqServer on loopback UDP); a
second DmqServer plays a Kamailio registrar and sends the gateway Kamailio's own bodies
(the captured ones, their expiry moved into the future). Against real Kamailio
processes: test_usrloc_kamailio.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from app.gateway.config import GatewayConfig
from app.gateway.models import PeerSettings
from app.kamailio import usrloc
from app.kamailio.bootstrap import MIRROR_BODY
from tests.gateway.conftest import Node, assert_problem, node_config, running

CAPTURES = Path(__file__).parent / "captures" / "usrloc"


def fresh(name: str, expires_in: int = 300) -> usrloc.UsrlocMessage:
    """A captured body with its contacts' expiry moved ``expires_in`` s from now."""
    message = usrloc.parse((CAPTURES / name).read_bytes())
    expires = int(time.time()) + expires_in

    def moved(item: usrloc.ContactMessage) -> usrloc.ContactMessage:
        return dataclasses.replace(item, contact=dataclasses.replace(item.contact, expires=expires))

    if isinstance(message, usrloc.Multi):
        return usrloc.Multi(tuple(moved(item) for item in message.items))
    assert isinstance(message, usrloc.ContactMessage)
    return moved(message)


class Bus:
    def __init__(self, client: TestClient, node: Node) -> None:
        self.client = client
        self.node = node
        self.gateway_uri = str(client.app.state.gateway.config.node.server_address)  # type: ignore[attr-defined]

    def send(self, body: bytes | usrloc.UsrlocMessage) -> tuple[int, bytes]:
        """Send a usrloc body to the gateway as a Kamailio node; its SIP answer."""
        if not isinstance(body, bytes):
            body = usrloc.build(body)
        operation = self.node.send_later("usrloc", body, self.gateway_uri)()
        (result,) = operation.results
        return result.code, result.body or b""


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    config = GatewayConfig(
        node=node_config(), state_dir=tmp_path / "state", kamailio_mirrors=("usrloc",)
    )
    with running(config) as client:
        # It says it runs Kamailio, as a registrar would: the mirror asks such a node
        # for a sync (never another gateway, which donates nothing).
        kamailio = dataclasses.replace(
            node_config(str(config.node.server_address)), user_agent="kamailio (5.6.3)"
        )
        node = Node(client, kamailio).start()
        node.listen("usrloc")  # the mirror's sync request lands here
        try:
            deadline = time.monotonic() + 5
            while client.get("/v1/health").json()["active_nodes"] < 1:
                assert time.monotonic() < deadline, "the node did not join"
                time.sleep(0.02)
            yield Bus(client, node)
        finally:
            node.stop()


def test_a_contact_is_listed_by_aor_and_gone_on_unregister(bus: Bus) -> None:
    update = fresh("02-update-new-contact.json")
    assert bus.send(update)[0] == 200
    carol = bus.client.get("/v1/registrations/carol").json()
    (contact,) = carol["contacts"]
    assert contact["ruid"] == "uloc-6b0e9718-44ad-1"
    assert contact["contact"] == "sip:carol@127.0.0.1:6004"
    assert contact["q"] is None and contact["node"] == bus.node.uri
    listing = bus.client.get("/v1/registrations").json()
    assert (listing["aors"], listing["contacts"], listing["matched"]) == (1, 1, 1)
    assert isinstance(update, usrloc.ContactMessage)
    assert bus.send(usrloc.ContactMessage(usrloc.Action.RM, update.contact))[0] == 200
    assert_problem(bus.client.get("/v1/registrations/carol"), 404, "carol")


def test_a_batched_sync_answer_pages_and_prefixes(bus: Bus) -> None:
    assert bus.send(fresh("05-sync-answer-multi.json"))[0] == 200
    listing = bus.client.get("/v1/registrations", params={"limit": 4}).json()
    assert listing["contacts"] == 10 and listing["aors"] == 10
    first = [item["aor"] for item in listing["items"]]
    assert first == sorted(first) and len(first) == 4
    rest = bus.client.get(
        "/v1/registrations", params={"limit": 100, "after": listing["next"]}
    ).json()
    assert len(rest["items"]) == 6 and rest["next"] is None
    assert bus.client.get("/v1/registrations", params={"prefix": "bulk05"}).json()["matched"] > 0
    assert bus.client.get("/v1/registrations", params={"prefix": "zz"}).json()["items"] == []


def test_the_mirror_asked_one_node_for_a_sync_once_and_donates_nothing(bus: Bus) -> None:
    deadline = time.monotonic() + 5
    while not [m for m in bus.node.received if m.body == b'{"action":3}']:
        assert time.monotonic() < deadline, "no sync request"
        time.sleep(0.02)
    time.sleep(0.3)
    assert [m.body for m in bus.node.received] == [b'{"action":3}']
    assert bus.send(b'{"action":3}') == (200, MIRROR_BODY)


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"not json", "json"),
        (b'{"action":1,"aor":"x"}', "missing"),
        (b'{"action":3,"extra":1}', "field"),
        (b'{"action":9}', "action"),
    ],
)
def test_a_malformed_body_is_400_counted_and_leaves_the_replica(
    bus: Bus, body: bytes, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert bus.send(fresh("06-sync-answer-single.json"))[0] == 200
    with caplog.at_level(logging.DEBUG, logger="dmq.kamailio"):
        assert bus.send(body)[0] == 400
        assert bus.send(body)[0] == 400
    warnings = [
        r for r in caplog.records if r.levelno >= logging.WARNING and "usrloc" in r.getMessage()
    ]
    assert len(warnings) == 1  # once per sender and kind
    assert bus.client.get("/v1/registrations").json()["contacts"] == 1
    metrics = bus.client.get("/metrics").text
    line = (
        f'dmq_kamailio_malformed_total{{kind="{kind}",mirror="usrloc",sender="{bus.node.uri}"}} 2.0'
    )
    assert line in metrics


def test_a_raw_usrloc_peer_sees_the_body_and_the_replica_still_applies_it(bus: Bus) -> None:
    assert bus.client.put("/v1/peers/usrloc", json=PeerSettings().to_json()).status_code == 201
    assert bus.send(fresh("02-update-new-contact.json"))[0] == 200
    assert bus.client.get("/v1/registrations/carol").status_code == 200
    assert bus.client.get("/v1/peers/usrloc").json()["received"] == 1


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"prefix": "a" * 1025}, "prefix"),
        ({"after": "a" * 1025}, "after"),
    ],
)
def test_bad_queries_are_422_naming_the_field(bus: Bus, params: dict[str, Any], field: str) -> None:
    assert_problem(bus.client.get("/v1/registrations", params=params), 422, field)


def test_the_change_stream_shows_register_refresh_unregister(bus: Bus) -> None:
    update = fresh("02-update-new-contact.json")
    assert isinstance(update, usrloc.ContactMessage)
    refreshed = dataclasses.replace(update, contact=dataclasses.replace(update.contact, cseq=2))
    with bus.client.websocket_connect("/v1/registrations/changes?since=0") as ws:
        subscribed = json.loads(ws.receive_text())
        assert subscribed["type"] == "subscribed" and subscribed["peer"] == "registrations"
        for message in (update, update, refreshed):
            bus.send(message)
        bus.send(usrloc.ContactMessage(usrloc.Action.RM, refreshed.contact))
        frames = [json.loads(ws.receive_text()) for _ in range(3)]
    assert [(f["event"], f["offset"]) for f in frames] == [
        ("register", 1),
        ("refresh", 2),
        ("unregister", 3),
    ]
    assert {f["key"] for f in frames} == {"uloc-6b0e9718-44ad-1"}
    assert frames[1]["data"]["cseq"] == 2 and frames[0]["from"] == bus.node.uri


def test_an_aor_too_long_is_422_naming_the_path_field(bus: Bus) -> None:
    assert_problem(bus.client.get("/v1/registrations/" + "a" * 1025), 422, "path.aor")
