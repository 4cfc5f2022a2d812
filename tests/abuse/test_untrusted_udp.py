"""Untrusted KDMQ over UDP: every request refused (403) and counted, one log line per
source per ``--refusal-log-interval``; real datagrams to a real gateway that trusts a
network the test is not in.

Before, each refused datagram wrote a WARNING: a sender outside the trusted networks
could fill the disk with the gateway's log at the rate it could send.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator

import pytest

from harness.gateway import Gateway
from harness.waiting import wait_until
from tests.abuse.support import Probe, metric

REQUESTS = 1000
#: Datagrams sent before their answers are read: the socket buffers hold them all.
BATCH = 50
LINE = "KDMQ from untrusted"

_branches = itertools.count(1)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    served = Gateway(
        "udp-untrusting",
        tmp_path_factory.mktemp("udp-u"),
        extra=("--trusted", "10.255.0.0/16", "--refusal-log-interval", "600"),
    ).start()
    try:
        yield served
    finally:
        served.stop()


def _request(gateway: Gateway, source: tuple[str, int]) -> bytes:
    branch = f"z9hG4bKudp{next(_branches)}"
    host, port = source
    return (
        f"KDMQ sip:htable@127.0.0.1:{gateway.sip_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch={branch}\r\n"
        f"From: <sip:htable@{host}:{port}>;tag=u1\r\n"
        f"To: <sip:htable@127.0.0.1:{gateway.sip_port}>\r\n"
        f"Call-ID: {branch}@{host}\r\n"
        "CSeq: 10 KDMQ\r\n"
        "Max-Forwards: 1\r\n"
        "Content-Type: text/plain\r\n"
        "Content-Length: 1\r\n\r\nx"
    ).encode()


def _refused(gateway: Gateway, host: str, count: int) -> int:
    """Send ``count`` distinct KDMQ requests from ``host``; the 403s that came back."""
    answers = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.settimeout(2)
        source = sock.getsockname()
        for start in range(0, count, BATCH):
            batch = min(BATCH, count - start)
            for _ in range(batch):
                sock.sendto(_request(gateway, source), ("127.0.0.1", gateway.sip_port))
            for _ in range(batch):
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    break
                answers += data.startswith(b"SIP/2.0 403 ")
    return answers


def test_a_thousand_refusals_are_counted_and_logged_once(gateway: Gateway) -> None:
    start = gateway.log_size()
    before = metric(gateway, "dmq_forbidden_total")
    with Probe(gateway) as probe:
        assert _refused(gateway, "127.0.0.1", REQUESTS) == REQUESTS
    assert metric(gateway, "dmq_forbidden_total") - before == REQUESTS
    wait_until(lambda: LINE in gateway.log_text(start), 5, "the refusal logged")
    assert gateway.log_text(start).count(LINE) == 1
    assert probe.latencies and not probe.failures, probe.failures


def test_another_source_gets_a_line_of_its_own(gateway: Gateway) -> None:
    start = gateway.log_size()
    assert _refused(gateway, "127.0.0.2", 20) == 20
    wait_until(lambda: LINE in gateway.log_text(start), 5, "the second source's refusal logged")
    lines = [line for line in gateway.log_text(start).splitlines() if LINE in line]
    assert len(lines) == 1 and "127.0.0.2" in lines[0], lines
