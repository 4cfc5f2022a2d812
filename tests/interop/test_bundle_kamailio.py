"""Bundles on a bus with a real Kamailio 5.6 node: gateways A and B and Kamailio K.

A batch broadcast on A reaches both: B (which says ``Supported: dmq-bundle``) gets
bundles, K (which says nothing of the kind) gets one KDMQ request per message, exactly
as before, answers each 200 and applies each htable set. Every message's result names
both nodes with their own 200, and K's table holds every key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from harness.delivery import htable_body
from harness.gateway import Gateway
from harness.kamailio import KamailioNode, KamailioNodeFactory
from harness.waiting import wait_until
from tests.api.gateway_procs import dump_logs_on_failure, running

pytestmark = [
    pytest.mark.interop,
    pytest.mark.usefixtures("kamailio_required"),
    pytest.mark.timeout(90),
]

PATIENCE = 15.0


def active_others(gateway: Gateway) -> int:
    health = gateway.health()
    return int(health["active_nodes"]) if health else -1


def k_lists_active(k: KamailioNode, ports: set[int]) -> bool:
    return {n["port"] for n in k.list_nodes() if n["status"] == "active" and not n["local"]} >= (
        ports
    )


@pytest.fixture
def bus(
    request: pytest.FixtureRequest, kamailio_node: KamailioNodeFactory, tmp_path: Path
) -> Iterator[tuple[KamailioNode, Gateway, Gateway]]:
    k = kamailio_node(fr_timer_ms=2000)
    a = Gateway("A", tmp_path, notify=[k.server_address], ping_interval=1.0)
    # B joins through A itself: A hears B's request (and its Supported header) at once.
    b = Gateway("B", tmp_path, notify=[a], ping_interval=1.0)
    with running([a, b]), dump_logs_on_failure(request, lambda: [a, b]):
        a.start()
        b.start()
        wait_until(
            lambda: (
                active_others(a) == 2
                and active_others(b) == 2
                and k_lists_active(k, {a.sip_port, b.sip_port})
            ),
            20.0,
            "A, B and Kamailio to hold each other as active",
        )
        yield k, a, b


def kdmq_sent(http: httpx.Client, gateway: Gateway, peer: str) -> float:
    text = http.get(f"{gateway.url}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "dmq_kdmq_sent_total" and sample.labels.get("peer") == peer
    )


def test_a_batch_reaches_a_bundling_gateway_and_kamailio_each_its_own_way(
    bus: tuple[KamailioNode, Gateway, Gateway],
) -> None:
    k, a, b = bus
    count = 200
    with httpx.Client(timeout=PATIENCE, trust_env=False) as http:
        answer = http.put(f"{b.url}/v1/peers/htable", json={"description": "raw"})
        assert answer.status_code in (200, 201), answer.text
        with connect(f"{b.ws_url}/v1/peers/htable/subscribe", open_timeout=5, proxy=None) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "subscribed"
            before = kdmq_sent(http, a, "htable")
            batch = [{"body": htable_body("bundle", n).decode()} for n in range(count)]
            answer = http.post(
                f"{a.url}/v1/peers/htable/broadcast/batch?wait=true",
                json=batch,
                headers={"content-type": "application/json"},
            )
            assert answer.status_code == 200, answer.text
            got = [json.loads(ws.recv(timeout=PATIENCE)) for _ in range(count)]
            sent = kdmq_sent(http, a, "htable") - before
    assert [f["body"] for f in got] == [m["body"] for m in batch]
    # Each message has both results, each node's own 200: Kamailio answered every
    # single request (a bundle would have been refused by its htable module).
    k_uri = f"sip:127.0.0.1:{k.port}"
    for result in answer.json()["results"]:
        codes = {r["node"]: r["code"] for r in result["results"]}
        assert codes == {k_uri: 200, b.uri: 200}, result
    # K got one request per message, B far fewer than one per message.
    assert count < sent < count + count / 10, sent
    names = set(re.findall(r"^\s*name: (\S+)\s*$", k.kamcmd("htable.dump", "s:ht"), re.M))
    assert {f"bundle-{n}" for n in range(count)} <= names
