"""Interop with Kamailio 5.6 over SIP TLS (Debian's ``kamailio-tls-modules``), both ways.

Kamailio runs ``examples/kamailio/kamailio.cfg`` with ``WITH_TLS``: it presents a
certificate from the test CA, demands one from every node, and checks ours against
the CA. Our gateway runs with ``--tls-verify-peer`` and checks Kamailio's. Both
directions of joining, and htable replication both ways over the TLS bus.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from harness.gateway import Gateway, TlsFiles
from harness.kamailio import KamailioNode, kamailio_available, stop_all
from harness.ports import free_port
from harness.waiting import wait_until
from tests.api.gateway_procs import dump_logs_on_failure, running
from tests.tls.conftest import Pki

pytestmark = pytest.mark.interop

PATIENCE = 30.0
TLS_MODULE_DIRS = (
    Path("/usr/lib/x86_64-linux-gnu/kamailio/modules"),
    Path("/usr/lib/aarch64-linux-gnu/kamailio/modules"),
    Path("/usr/lib64/kamailio/modules"),
    Path("/usr/lib/kamailio/modules"),
)
MISSING = "kamailio with its tls module is not installed (apt-get install kamailio-tls-modules)"


@pytest.fixture(autouse=True)
def _require_kamailio_tls() -> None:
    if kamailio_available() and any((d / "tls.so").exists() for d in TLS_MODULE_DIRS):
        return
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{MISSING}; CI=true, so this is an error, not a skip")
    pytest.skip(MISSING)


def htable_body(key: str, value: str) -> dict[str, object]:
    return {"action": 2, "htname": "ht", "cname": key, "type": 2, "strval": value, "mode": 1}


def kamailio(directory: Path, files: TlsFiles, notify: list[str]) -> KamailioNode:
    node = KamailioNode(
        directory,
        free_port(),
        transport="tls",
        notification_addresses=notify,
        tls_files=(files.cert, files.key, files.ca),
        autostart=False,
    )
    return node


def gateway(directory: Path, files: TlsFiles, notify: list[str]) -> Gateway:
    return Gateway(
        "G",
        directory,
        notify=notify,
        transport="tls",
        tls=files,
        timers=(),  # Kamailio's own timers: Timer F 32 s, nothing shortened
        extra=["--tls-verify-peer", "--peer", "htable"],
    )


def replicate_both_ways(g: Gateway, k: KamailioNode) -> None:
    answer = httpx.post(
        f"{g.url}/v1/peers/htable/broadcast",
        params={"wait": "true"},
        json=htable_body("from-gateway", "over tls"),
        timeout=PATIENCE,
        trust_env=False,
    )
    answer.raise_for_status()
    assert [(r["node"], r["code"]) for r in answer.json()["results"]] == [(k.server_address, 200)]
    wait_until(
        lambda: k.htable_get("ht", "from-gateway") == "over tls",
        PATIENCE,
        "Kamailio to hold the value the gateway sent over TLS",
    )
    before = httpx.get(f"{g.url}/v1/peers/htable", timeout=PATIENCE, trust_env=False).json()
    k.htable_sets("ht", "from-kamailio", "also tls")
    wait_until(
        lambda: (
            httpx.get(f"{g.url}/v1/peers/htable", timeout=PATIENCE, trust_env=False).json()[
                "offset"
            ]
            > before["offset"]
        ),
        PATIENCE,
        "the gateway to receive Kamailio's htable set over TLS",
    )
    assert "from-kamailio" in g.log_text()


def active(g: Gateway) -> int:
    return int((g.health() or {}).get("active_nodes", -1))


def test_kamailio_joins_a_gateway_bus_over_tls(
    tmp_path: Path, pki: Pki, request: pytest.FixtureRequest
) -> None:
    g = gateway(tmp_path, pki.issue("127.0.0.1", "gateway.bus"), [])
    k = kamailio(tmp_path / "kamailio", pki.issue("127.0.0.1", "kamailio.bus"), [g.uri])
    with running([g]), dump_logs_on_failure(request, lambda: [g]):
        g.start()
        try:
            k.start()
            wait_until(lambda: active(g) == 1, PATIENCE, "the gateway to hold Kamailio active")
            wait_until(
                lambda: any(n["proto"] == "tls" for n in k.active_peers()),
                PATIENCE,
                "Kamailio to hold the gateway active over TLS",
            )
            replicate_both_ways(g, k)
        finally:
            if request.session.testsfailed:
                print(k.log_path.read_text()[-4000:])
            stop_all([k])


def test_gateway_joins_a_kamailio_bus_over_tls(
    tmp_path: Path, pki: Pki, request: pytest.FixtureRequest
) -> None:
    k = kamailio(tmp_path / "kamailio", pki.issue("127.0.0.1", "kamailio.bus"), [])
    g = gateway(tmp_path, pki.issue("127.0.0.1", "gateway.bus"), [k.server_address])
    try:
        k.start()
        with running([g]), dump_logs_on_failure(request, lambda: [g]):
            g.start()
            wait_until(lambda: active(g) == 1, PATIENCE, "the gateway to hold Kamailio active")
            replicate_both_ways(g, k)
    finally:
        if request.session.testsfailed:
            print(k.log_path.read_text()[-4000:])
        stop_all([k])


def test_kamailio_refuses_a_gateway_with_a_certificate_from_another_ca(
    tmp_path: Path, pki: Pki, rogue_pki: Pki, request: pytest.FixtureRequest
) -> None:
    """Kamailio checks our certificate: one from another CA never joins its bus."""
    k = kamailio(tmp_path / "kamailio", pki.issue("127.0.0.1", "kamailio.bus"), [])
    rogue = rogue_pki.issue("127.0.0.1")
    files = TlsFiles(rogue.cert, rogue.key, pki.ca_path)  # we would trust Kamailio
    g = gateway(tmp_path, files, [k.server_address])
    try:
        k.start()
        with running([g]), dump_logs_on_failure(request, lambda: [g]):
            g.start()
            wait_until(
                lambda: "certificate verify failed" in k.log_path.read_text(),
                PATIENCE,
                "Kamailio to refuse the gateway's certificate",
            )
            assert active(g) == 0
            assert not k.active_peers()
    finally:
        stop_all([k])


def test_gateway_refuses_a_kamailio_with_a_certificate_from_another_ca(
    tmp_path: Path, pki: Pki, rogue_pki: Pki, request: pytest.FixtureRequest
) -> None:
    """We check Kamailio's certificate: one from another CA never reaches a peer."""
    g = gateway(tmp_path, pki.issue("127.0.0.1", "gateway.bus"), [])
    rogue = rogue_pki.issue("127.0.0.1")
    k = kamailio(tmp_path / "kamailio", TlsFiles(rogue.cert, rogue.key, pki.ca_path), [g.uri])
    with running([g]), dump_logs_on_failure(request, lambda: [g]):
        g.start()
        try:
            k.start()
            wait_until(
                lambda: "TLS connection from 127.0.0.1" in g.log_text(),
                PATIENCE,
                "the gateway to refuse Kamailio's certificate",
            )
            line = next(line for line in g.log_text().splitlines() if "TLS connection from" in line)
            assert "certificate was refused" in line
            assert active(g) == 0
        finally:
            stop_all([k])
