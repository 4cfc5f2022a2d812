"""What a TLS node refuses, and that it goes on serving its bus meanwhile.

Gateway A listens for SIP over TLS with ``--tls-verify-peer`` and an allow-list
(``b.bus``, ``d.bus``), a 1 s handshake bound, at most 8 connections per source and a
2 s idle time-out; gateway B (``b.bus``) is on its bus. Every misbehaving client comes
from an address of its own in 127.0.0.0/8, because a refusal is logged once per address.
After each case B's broadcast still reaches A.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.gateway import Gateway, TlsFiles
from harness.waiting import wait_until
from tests.abuse.support import kdmq
from tests.api.gateway_procs import dump_logs_on_failure, running
from tests.tls.conftest import Pki, expired

PATIENCE = 15.0
HANDSHAKE_TIMEOUT = 1.0
IDLE_TIMEOUT = 2.0
PER_SOURCE = 8


@dataclass
class Bus:
    a: Gateway
    b: Gateway
    pki: Pki
    workdir: Path

    def still_serving(self) -> None:
        """B's broadcast is answered 200 by A: the node goes on serving its bus."""
        answer = httpx.post(
            f"{self.b.url}/v1/peers/probe/broadcast",
            params={"wait": "true"},
            json={"still": "serving"},
            timeout=PATIENCE,
            trust_env=False,
        )
        answer.raise_for_status()
        codes = {r["node"]: r["code"] for r in answer.json()["results"]}
        assert codes[self.a.uri] == 200

    def wait_log(self, text: str) -> str:
        """The first line of A's log holding ``text`` (waiting for it)."""
        found: list[str] = []

        def logged() -> bool:
            found[:] = [line for line in self.a.log_text().splitlines() if text in line]
            return bool(found)

        wait_until(logged, PATIENCE, f"A to log {text!r}")
        return found[0]


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Bus]:
    workdir = tmp_path_factory.mktemp("refusals")
    a = Gateway(
        "A",
        workdir,
        transport="tls",
        tls=pki.issue("127.0.0.1", "a.bus"),
        extra=[
            "--tls-verify-peer",
            *("--tls-allow-name", "b.bus", "--tls-allow-name", "d.bus"),
            *("--tls-handshake-timeout", str(HANDSHAKE_TIMEOUT)),
            *("--tcp-max-connections-per-source", str(PER_SOURCE)),
            *("--tcp-idle-timeout", str(IDLE_TIMEOUT)),
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
        yield Bus(a, b, pki, workdir)


@pytest.fixture(autouse=True)
def _logs(request: pytest.FixtureRequest, bus: Bus) -> Iterator[None]:
    with dump_logs_on_failure(request, lambda: [bus.a, bus.b]):
        yield


def connect(bus: Bus, source: str) -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", bus.a.sip_port), timeout=PATIENCE, source_address=(source, 0)
    )
    return sock


def closed_by_peer(sock: socket.socket | ssl.SSLSocket) -> bool:
    """Whether the other end closed (or reset) the connection: nothing more is read."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


def tls_client(files: TlsFiles | None, ca: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    if files is not None:
        context.load_cert_chain(files.cert, files.key)
    return context


def try_tls_kdmq(bus: Bus, source: str, files: TlsFiles | None) -> bool:
    """Handshake (as ``files``), send a KDMQ, and say whether A closed the connection
    without a SIP answer."""
    raw = connect(bus, source)
    try:
        with tls_client(files, bus.pki.ca_path).wrap_socket(
            raw, server_hostname="127.0.0.1"
        ) as sock:
            sock.settimeout(PATIENCE)
            sock.sendall(kdmq(bus.a.sip_port, "probe"))
            data = b""
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                data = sock.recv(65536)
            assert not data.startswith(b"SIP/2.0"), f"{source} was answered: {data[:40]!r}"
            return True
    except (ssl.SSLError, ConnectionError):
        return True  # refused during the handshake (TLS 1.2) or right after it
    finally:
        raw.close()


def test_plain_text_on_the_tls_port_is_closed(bus: Bus) -> None:
    with connect(bus, "127.0.0.2") as sock:
        sock.sendall(kdmq(bus.a.sip_port, "probe"))
        assert closed_by_peer(sock)
    line = bus.wait_log("TLS connection from 127.0.0.2")
    assert "does not speak TLS" in line
    bus.still_serving()


def test_certificate_from_another_ca_is_refused(bus: Bus, rogue_pki: Pki) -> None:
    assert try_tls_kdmq(bus, "127.0.0.3", rogue_pki.issue("127.0.0.1", "b.bus"))
    line = bus.wait_log("TLS connection from 127.0.0.3")
    assert "certificate was refused" in line and "issuer" in line
    bus.still_serving()


def test_no_certificate_is_refused(bus: Bus) -> None:
    assert try_tls_kdmq(bus, "127.0.0.4", None)
    line = bus.wait_log("TLS connection from 127.0.0.4")
    assert "presented no certificate" in line
    bus.still_serving()


def test_expired_certificate_is_refused(bus: Bus) -> None:
    assert try_tls_kdmq(bus, "127.0.0.5", expired(bus.pki))
    line = bus.wait_log("TLS connection from 127.0.0.5")
    assert "expired" in line
    bus.still_serving()


def test_certificate_without_an_allowed_name_is_refused(bus: Bus) -> None:
    assert try_tls_kdmq(bus, "127.0.0.6", bus.pki.issue("127.0.0.1", "intruder.bus"))
    line = bus.wait_log("TLS connection from 127.0.0.6")
    assert "intruder.bus" in line and "--tls-allow-name" in line
    bus.still_serving()


def test_refusals_of_one_address_are_logged_once(bus: Bus, rogue_pki: Pki) -> None:
    files = rogue_pki.issue("127.0.0.1")
    for _ in range(3):
        assert try_tls_kdmq(bus, "127.0.0.7", files)
    bus.wait_log("TLS connection from 127.0.0.7")
    bus.still_serving()
    lines = [line for line in bus.a.log_text().splitlines() if "from 127.0.0.7" in line]
    assert len(lines) == 1, lines


def test_handshakes_that_never_complete_are_bounded(bus: Bus) -> None:
    """Clients that connect and never say hello hold a slot for the handshake bound
    at most, and no more than the per-source cap of them is held at once."""
    socks = [connect(bus, "127.0.0.8") for _ in range(PER_SOURCE + 4)]
    try:
        started = time.monotonic()
        # The ones over the cap are closed on accept; the rest at the handshake bound.
        for sock in socks:
            sock.settimeout(PATIENCE)
            assert closed_by_peer(sock)
        assert time.monotonic() - started < PATIENCE
    finally:
        for sock in socks:
            sock.close()
    line = bus.wait_log("TLS connection from 127.0.0.8")
    assert f"no TLS handshake within {HANDSHAKE_TIMEOUT:g} s" in line
    assert "refused" in bus.wait_log(f"{PER_SOURCE} TCP connections open from 127.0.0.8")
    bus.still_serving()


def test_idle_tls_connections_are_closed(bus: Bus) -> None:
    files = bus.pki.issue("127.0.0.1", "d.bus")
    context = tls_client(files, bus.pki.ca_path)
    opened = [
        context.wrap_socket(connect(bus, "127.0.0.9"), server_hostname="127.0.0.1")
        for _ in range(3)
    ]
    try:
        for sock in opened:
            sock.settimeout(PATIENCE)
            assert closed_by_peer(sock)
    finally:
        for sock in opened:
            sock.close()
    bus.still_serving()


def test_node_with_a_certificate_for_another_host_is_not_reached(bus: Bus, pki: Pki) -> None:
    """D's certificate is from the CA but names 127.0.0.99, not the 127.0.0.1 it
    announces: A refuses to talk to it, with a line saying why."""
    d = Gateway(
        "D",
        bus.workdir,
        notify=[bus.a],
        transport="tls",
        tls=pki.issue("127.0.0.99", "d.bus"),
    )
    with running([d]):
        d.start()
        line = bus.wait_log(f"TLS connect to 127.0.0.1:{d.sip_port} failed")
        assert "certificate was refused" in line and "mismatch" in line
    bus.still_serving()


def test_refusals_move_the_tls_counters(bus: Bus, rogue_pki: Pki) -> None:
    """Each kind of refusal above, from an address of its own, moves its own series
    of A's ``/metrics`` by exactly one; the completed handshakes and the open
    connections (B's, at least) show too."""
    before = scrape(bus.a)
    with connect(bus, "127.0.0.20") as sock:
        sock.sendall(kdmq(bus.a.sip_port, "probe"))
        assert closed_by_peer(sock)
    assert try_tls_kdmq(bus, "127.0.0.21", rogue_pki.issue("127.0.0.1", "b.bus"))
    assert try_tls_kdmq(bus, "127.0.0.22", None)
    assert try_tls_kdmq(bus, "127.0.0.23", expired(bus.pki))
    assert try_tls_kdmq(bus, "127.0.0.24", bus.pki.issue("127.0.0.1", "intruder.bus"))
    with connect(bus, "127.0.0.25") as sock:
        sock.settimeout(PATIENCE)
        assert closed_by_peer(sock)  # said nothing: closed at the handshake bound
    for source in ("127.0.0.2" + str(n) for n in range(6)):
        bus.wait_log(f"TLS connection from {source}")
    after = scrape(bus.a)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before[key]

    failed = "dmq_tls_handshakes_failed_total"
    for reason in ("not_tls", "untrusted_certificate", "no_certificate", "expired_certificate"):
        assert moved(failed, direction="inbound", reason=reason) == 1, reason
    assert moved(failed, direction="inbound", reason="timeout") == 1
    assert moved("dmq_tls_handshake_timeouts_total", direction="inbound") == 1
    refused = "dmq_tls_peers_refused_total"
    for reason in ("untrusted_certificate", "no_certificate", "expired_certificate"):
        assert moved(refused, reason=reason) == 1, reason
    assert moved(refused, reason="name_not_allowed") == 1
    # The intruder's handshake itself completed: its names were refused after it.
    assert moved("dmq_tls_handshakes_completed_total", direction="inbound") >= 1
    assert after[("dmq_tls_connections", ())] >= 1  # B's connection to A
    bus.still_serving()


def scrape(gateway: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a gateway's ``/metrics``, by name and labels."""
    response = httpx.get(f"{gateway.url}/metrics", timeout=PATIENCE, trust_env=False)
    response.raise_for_status()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
