"""Three real gateways on one bus over SIP TLS with mutual certificates.

A, B and C are ``dmq-gateway serve`` processes on loopback whose server addresses carry
``;transport=tls``, each with a certificate from the bus CA, ``--tls-verify-peer``, and
an allow-list naming the three. B and C join through A. Membership, broadcasts with
every node's answer over one reused connection per node (no handshake of their own),
the node lists announcing TLS, ``kill -9``, and the killed node's restart and rejoin.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.gateway import Gateway
from harness.waiting import wait_until
from tests.api.gateway_procs import dump_logs_on_failure, running
from tests.tls.conftest import Pki

PATIENCE = 15.0
BROADCASTS = 20


def active_nodes(gateway: Gateway) -> int:
    health = gateway.health()
    return -1 if health is None else int(health["active_nodes"])


def tls_gateway(name: str, workdir: Path, pki: Pki, notify: list[Gateway]) -> Gateway:
    files = pki.issue("127.0.0.1", f"{name.lower()}.bus")
    return Gateway(
        name,
        workdir,
        notify=notify,
        transport="tls",
        tls=files,
        extra=[
            "--tls-verify-peer",
            *("--tls-allow-name", "a.bus", "--tls-allow-name", "b.bus"),
            *("--tls-allow-name", "c.bus"),
        ],
    )


@pytest.fixture
def bus(
    tmp_path: Path, pki: Pki, request: pytest.FixtureRequest
) -> Iterator[tuple[Gateway, Gateway, Gateway]]:
    a = tls_gateway("A", tmp_path, pki, [])
    b = tls_gateway("B", tmp_path, pki, [a])
    c = tls_gateway("C", tmp_path, pki, [a])
    gateways = [a, b, c]
    with running(gateways), dump_logs_on_failure(request, lambda: gateways):
        a.start()
        b.spawn()
        c.spawn()
        b.wait_ready()
        c.wait_ready()
        wait_until(
            lambda: all(active_nodes(g) == 2 for g in gateways),
            PATIENCE,
            "A, B and C to hold each other as active over TLS",
        )
        yield a, b, c


def test_membership_broadcast_and_kill_over_tls(bus: tuple[Gateway, Gateway, Gateway]) -> None:
    a, b, c = bus
    nodes = httpx.get(f"{b.url}/v1/nodes", timeout=PATIENCE, trust_env=False).json()
    uris = sorted(str(n["uri"]) for n in nodes)
    # Every node is announced (and reached) with ;transport=tls, as Kamailio lists them.
    assert uris == sorted([a.uri, b.uri, c.uri])
    assert all(uri.endswith(";transport=tls") for uri in uris)

    for gateway in bus:
        httpx.put(
            f"{gateway.url}/v1/peers/tls-demo", json={}, timeout=PATIENCE, trust_env=False
        ).raise_for_status()
    handshakes = outbound_handshakes(a)
    for number in range(BROADCASTS):
        answer = httpx.post(
            f"{a.url}/v1/peers/tls-demo/broadcast",
            params={"wait": "true"},
            json={"over": "tls", "number": number},
            timeout=PATIENCE,
            trust_env=False,
        )
        answer.raise_for_status()
        results = {r["node"]: r["code"] for r in answer.json()["results"]}
        assert results == {b.uri: 200, c.uri: 200}
    # One connection per node, reused: the broadcasts made no handshake of their own.
    assert outbound_handshakes(a) == handshakes
    # The messages arrived: each receiver's history holds the broadcasts.
    for receiver in (b, c):
        peer = httpx.get(
            f"{receiver.url}/v1/peers/tls-demo", timeout=PATIENCE, trust_env=False
        ).json()
        assert peer["offset"] == BROADCASTS

    c.kill()
    wait_until(
        lambda: active_nodes(a) == 1 and active_nodes(b) == 1,
        PATIENCE,
        "A and B to stop counting the killed C as active",
    )
    again = httpx.post(
        f"{b.url}/v1/peers/tls-demo/broadcast",
        params={"wait": "true"},
        json={"after": "kill"},
        timeout=PATIENCE,
        trust_env=False,
    ).json()
    after = {r["node"]: r for r in again["results"]}
    assert after[a.uri]["code"] == 200
    # The killed node is not reached (its message waits in the outbox, if anywhere).
    assert c.uri not in after or after[c.uri]["outcome"] != "delivered"

    # C comes back on the same ports and state: it rejoins over TLS and is served.
    c.restart()
    wait_until(
        lambda: all(active_nodes(g) == 2 for g in bus),
        PATIENCE,
        "the restarted C to rejoin A and B over TLS",
    )
    httpx.put(
        f"{c.url}/v1/peers/tls-demo", json={}, timeout=PATIENCE, trust_env=False
    ).raise_for_status()
    back = httpx.post(
        f"{c.url}/v1/peers/tls-demo/broadcast",
        params={"wait": "true"},
        json={"after": "restart"},
        timeout=PATIENCE,
        trust_env=False,
    ).json()
    assert {r["node"]: r["code"] for r in back["results"]} == {a.uri: 200, b.uri: 200}
    # Every handshake between the three succeeded: no refusal was logged anywhere.
    for gateway in bus:
        assert "TLS connection from" not in gateway.log_text()


def outbound_handshakes(gateway: Gateway) -> float:
    """The gateway's completed outbound TLS handshakes, from its ``/metrics``."""
    text = httpx.get(f"{gateway.url}/metrics", timeout=PATIENCE, trust_env=False).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "dmq_tls_handshakes_completed_total" and sample.labels == {
                "direction": "outbound"
            }:
                return float(sample.value)
    raise AssertionError("no dmq_tls_handshakes_completed_total{direction=outbound}")
