"""Thousands of TLS connections that never finish a handshake, and garbage, against a
real TLS gateway: the handshake bound and the connection caps hold, memory and
descriptors stay bounded, and the node keeps serving its bus and its API.

Gateway A listens for SIP over TLS with a 1 s handshake bound, at most
:data:`TOTAL` inbound connections and :data:`PER_SOURCE` per source address; B is a
TLS node on its bus. :data:`FLOOD` connections come from :data:`SOURCES` addresses of
127.0.0.0/8 (so that both caps are met), some send nothing, some random bytes.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.gateway import Gateway
from harness.waiting import wait_until
from tests.abuse.support import Probe, descriptors, rss_mb
from tests.api.gateway_procs import dump_logs_on_failure, running
from tests.tls.conftest import Pki

PATIENCE = 20.0
HANDSHAKE_TIMEOUT = 1.0
TOTAL = 64
PER_SOURCE = 8
SOURCES = 100
FLOOD = 2000
#: The most A's RSS may grow while the flood is held, in MB.
RSS_CEILING_MB = 40.0


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[tuple[Gateway, Gateway]]:
    workdir: Path = tmp_path_factory.mktemp("flood")
    a = Gateway(
        "A",
        workdir,
        transport="tls",
        tls=pki.issue("127.0.0.1", "a.bus"),
        extra=[
            *("--tls-handshake-timeout", str(HANDSHAKE_TIMEOUT)),
            *("--tcp-max-connections", str(TOTAL)),
            *("--tcp-max-connections-per-source", str(PER_SOURCE)),
            *("--peer", "probe"),
        ],
    )
    b = Gateway(
        "B",
        workdir,
        notify=[a],
        transport="tls",
        tls=pki.issue("127.0.0.1", "b.bus"),
        extra=["--peer", "probe"],
    )
    with running([a, b]):
        a.start()
        b.start()
        wait_until(
            lambda: (
                (a.health() or {}).get("active_nodes") == 1
                and (b.health() or {}).get("active_nodes") == 1
            ),
            PATIENCE,
            "A and B to hold each other as active",
        )
        yield a, b


@pytest.fixture(autouse=True)
def _logs(request: pytest.FixtureRequest, bus: tuple[Gateway, Gateway]) -> Iterator[None]:
    with dump_logs_on_failure(request, lambda: list(bus)):
        yield


def scrape(gateway: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{gateway.url}/metrics", timeout=PATIENCE, trust_env=False)
    response.raise_for_status()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def broadcast_reaches(sender: Gateway, receiver: Gateway) -> bool:
    answer = httpx.post(
        f"{sender.url}/v1/peers/probe/broadcast",
        params={"wait": "true"},
        json={"still": "serving"},
        timeout=PATIENCE,
        trust_env=False,
    )
    answer.raise_for_status()
    codes = {r["node"]: r["code"] for r in answer.json()["results"]}
    return codes.get(receiver.uri) == 200


def test_a_flood_of_silent_and_garbage_connections_is_bounded(
    bus: tuple[Gateway, Gateway],
) -> None:
    a, b = bus
    before = scrape(a)
    rss_before, fds_before = rss_mb(a), descriptors(a)
    socks: list[socket.socket] = []
    held_fds: list[int] = []
    try:
        with Probe(a) as probe:
            for number in range(FLOOD):
                source = f"127.0.1.{number % SOURCES + 1}"
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind((source, 0))
                sock.settimeout(PATIENCE)
                try:
                    sock.connect(("127.0.0.1", a.sip_port))
                    if number % 4 == 0:
                        sock.sendall(os.urandom(512))  # garbage where a hello should be
                except OSError:
                    pass  # refused or reset at once: what a cap does
                socks.append(sock)
                if number % 200 == 0:
                    held_fds.append(descriptors(a))
            held_fds.append(descriptors(a))
            rss_during = rss_mb(a)
            # Every one of them is closed by A: over a cap at once, the rest at the
            # handshake bound (or on their garbage).
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT + PATIENCE
            for sock in socks:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    while sock.recv(65536):
                        pass
                except TimeoutError:
                    pytest.fail("a connection stayed open past the handshake bound")
                except OSError:
                    pass
    finally:
        for sock in socks:
            sock.close()
    # The connections A held at any one time never went over its total cap (plus
    # the descriptors of its own sockets, B's connections and the API probe).
    assert max(held_fds) <= fds_before + TOTAL + 8, held_fds
    assert rss_during - rss_before < RSS_CEILING_MB, (rss_before, rss_during)
    assert not probe.failures, probe.failures[:5]
    assert probe.latencies, "the API probe never got an answer"
    wait_until(lambda: descriptors(a) <= fds_before + 2, PATIENCE, "A's descriptors back")
    after = scrape(a)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before[key]

    refused = moved("dmq_tcp_refused_total", reason="max_connections") + moved(
        "dmq_tcp_refused_total", reason="max_per_source"
    )
    failed = sum(
        value - before.get(key, 0)
        for key, value in after.items()
        if key[0] == "dmq_tls_handshakes_failed_total" and ("direction", "inbound") in key[1]
    )
    # Every connection was either refused on accept or failed its handshake.
    assert refused + failed >= FLOOD, (refused, failed)
    assert refused > 0 and failed > 0, (refused, failed)
    assert moved("dmq_tls_handshake_timeouts_total", direction="inbound") > 0
    assert moved("dmq_tls_handshakes_failed_total", direction="inbound", reason="not_tls") > 0
    assert after[("dmq_tls_connections", ())] >= 1  # B's, never dropped
    assert broadcast_reaches(b, a) and broadcast_reaches(a, b)
