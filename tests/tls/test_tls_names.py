"""Nodes added through ``POST /v1/nodes`` with ``;transport=tls``, named by host name.

A TLS node's certificate names a host, and a node URI names it the same way:
``sip:localhost:PORT;transport=tls``. A connects to the address the name resolves to
(127.0.0.1, from ``/etc/hosts``) but checks the certificate against the *name*, and
sends it as SNI. B's certificate is issued for ``localhost`` only (no IP address), so
a check against the address would refuse it; C's names ``node.test``, so A must refuse
it, with a log line saying why, as it refuses E's expired one. B demands a
certificate from the bus CA of every TLS peer (``--tls-verify-peer``) and listens for
TLS only: a node it answers reached it over TLS. D has no TLS settings at all and
refuses to add a TLS node, in one sentence.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.gateway import Gateway
from harness.waiting import wait_until
from tests.api.gateway_procs import dump_logs_on_failure, running
from tests.tls.conftest import Pki

PATIENCE = 15.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics(gateway: Gateway) -> Samples:
    """Every sample of the gateway's ``/metrics``, by name and labels."""
    response = httpx.get(f"{gateway.url}/metrics", timeout=PATIENCE, trust_env=False)
    response.raise_for_status()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def active_nodes(gateway: Gateway) -> int:
    health = gateway.health()
    return -1 if health is None else int(health["active_nodes"])


def add_node(gateway: Gateway, uri: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/nodes", json={"uri": uri}, timeout=PATIENCE, trust_env=False
    )


@dataclass
class Hosts:
    a: Gateway
    b: Gateway
    c: Gateway
    d: Gateway
    e: Gateway


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Hosts]:
    workdir = tmp_path_factory.mktemp("names")
    probe = ("--peer", "probe")
    a = Gateway("A", workdir, transport="tls", tls=pki.issue("127.0.0.1", "a.bus"), extra=probe)
    b = Gateway(
        "B",
        workdir,
        transport="tls",
        tls=pki.issue("localhost"),
        extra=[*probe, "--tls-verify-peer"],
    )
    c = Gateway("C", workdir, transport="tls", tls=pki.issue("node.test"), extra=probe)
    d = Gateway("D", workdir, extra=probe)
    now = datetime.datetime.now(datetime.UTC)
    stale = pki.issue(
        "localhost",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    e = Gateway("E", workdir, transport="tls", tls=stale, extra=probe)
    every = [a, b, c, d, e]
    with running(every):
        for gateway in every:
            gateway.spawn()
        for gateway in every:
            gateway.wait_ready()
        yield Hosts(a, b, c, d, e)


@pytest.fixture(autouse=True)
def _logs(request: pytest.FixtureRequest, hosts: Hosts) -> Iterator[None]:
    with dump_logs_on_failure(request, lambda: [hosts.a, hosts.b, hosts.c, hosts.d, hosts.e]):
        yield


def test_a_tls_node_added_by_name_is_reached_over_tls(hosts: Hosts) -> None:
    a, b = hosts.a, hosts.b
    before_a, before_b = metrics(a), metrics(b)
    uri = f"sip:localhost:{b.sip_port};transport=tls"
    answer = add_node(a, uri)
    assert answer.status_code == 201, answer.text
    node = answer.json()
    assert (node["host"], node["transport"]) == ("localhost", "tls")
    wait_until(
        lambda: active_nodes(a) >= 1 and active_nodes(b) >= 1,
        PATIENCE,
        "A and B to hold each other as active",
    )
    broadcast = httpx.post(
        f"{a.url}/v1/peers/probe/broadcast",
        params={"wait": "true"},
        json={"over": "tls"},
        timeout=PATIENCE,
        trust_env=False,
    )
    broadcast.raise_for_status()
    codes = {r["node"]: r["code"] for r in broadcast.json()["results"]}
    assert codes.get(uri) == 200, codes
    after_a, after_b = metrics(a), metrics(b)
    # A opened a TLS connection to B (its handshake checked "localhost"), and B, which
    # listens for TLS only, accepted one.
    outbound = ("dmq_tls_handshakes_completed_total", (("direction", "outbound"),))
    inbound = ("dmq_tls_handshakes_completed_total", (("direction", "inbound"),))
    assert after_a[outbound] >= before_a[outbound] + 1
    assert after_b[inbound] >= before_b[inbound] + 1
    assert after_a[("dmq_tls_connections", ())] >= 1
    assert after_b[("dmq_tls_connections", ())] >= 1
    # No handshake of A failed on the way, for any reason.
    failed = [
        key
        for key, value in after_a.items()
        if key[0] == "dmq_tls_handshakes_failed_total" and value != before_a.get(key, 0)
    ]
    assert not failed, failed


def test_a_node_whose_certificate_names_another_host_is_refused(hosts: Hosts) -> None:
    a, c = hosts.a, hosts.c
    key = (
        "dmq_tls_handshakes_failed_total",
        (("direction", "outbound"), ("reason", "hostname_mismatch")),
    )
    before = metrics(a)[key]
    answer = add_node(a, f"sip:localhost:{c.sip_port};transport=tls")
    assert answer.status_code == 201, answer.text
    found: list[str] = []

    def logged() -> bool:
        found[:] = [
            line
            for line in a.log_text().splitlines()
            if f"TLS connect to localhost (127.0.0.1:{c.sip_port}) failed" in line
        ]
        return bool(found)

    wait_until(logged, PATIENCE, "A to log the refused certificate")
    assert "certificate was refused" in found[0]
    assert "not valid for 'localhost'" in found[0], found[0]
    assert metrics(a)[key] >= before + 1
    # C never heard from A: nothing reached it over a connection A refused.
    assert active_nodes(c) == 0


def test_a_node_with_an_expired_certificate_is_refused(hosts: Hosts) -> None:
    """E's certificate names the right host and comes from the CA, but has expired."""
    a, e = hosts.a, hosts.e
    key = (
        "dmq_tls_handshakes_failed_total",
        (("direction", "outbound"), ("reason", "expired_certificate")),
    )
    before = metrics(a)[key]
    answer = add_node(a, f"sip:localhost:{e.sip_port};transport=tls")
    assert answer.status_code == 201, answer.text
    found: list[str] = []

    def logged() -> bool:
        found[:] = [
            line
            for line in a.log_text().splitlines()
            if f"TLS connect to localhost (127.0.0.1:{e.sip_port}) failed" in line
        ]
        return bool(found)

    wait_until(logged, PATIENCE, "A to log the expired certificate")
    assert "certificate has expired" in found[0], found[0]
    assert metrics(a)[key] >= before + 1
    assert active_nodes(e) == 0


def test_a_gateway_without_tls_settings_refuses_a_tls_node(hosts: Hosts) -> None:
    answer = add_node(hosts.d, f"sip:127.0.0.1:{hosts.a.sip_port};transport=tls")
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    detail = answer.json()["detail"]
    assert "no TLS settings" in detail and "--tls-cert" in detail, detail
    assert active_nodes(hosts.d) == 0
    # Its dmq_tls_* series are there all the same, at zero: a dashboard sees them.
    samples = metrics(hosts.d)
    for direction in ("inbound", "outbound"):
        labels = (("direction", direction),)
        assert samples[("dmq_tls_handshakes_completed_total", labels)] == 0
        assert samples[("dmq_tls_handshake_timeouts_total", labels)] == 0
    assert samples[("dmq_tls_peers_refused_total", (("reason", "no_certificate"),))] == 0
    assert samples[("dmq_tls_connections", ())] == 0


def test_an_unknown_transport_is_still_refused(hosts: Hosts) -> None:
    answer = add_node(hosts.a, f"sip:127.0.0.1:{hosts.b.sip_port};transport=sctp")
    assert answer.status_code == 422, answer.text
    assert "'sctp' is not supported (udp, tcp, tls)" in answer.json()["detail"]
