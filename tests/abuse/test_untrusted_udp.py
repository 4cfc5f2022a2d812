"""Untrusted KDMQ over UDP: every request refused (403) and counted, one log line per
source per ``--refusal-log-interval``; real datagrams to a real gateway that trusts a
network the test is not in.

Before, each refused datagram wrote a WARNING: a sender outside the trusted networks
could fill the disk with the gateway's log at the rate it could send.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.gateway import Gateway
from harness.waiting import wait_until
from tests.abuse.support import Probe, metric, refused_over_udp

REQUESTS = 1000
LINE = "KDMQ from untrusted"


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


def test_a_thousand_refusals_are_counted_and_logged_once(gateway: Gateway) -> None:
    start = gateway.log_size()
    before = metric(gateway, "dmq_forbidden_total")
    with Probe(gateway) as probe:
        assert refused_over_udp(gateway, "127.0.0.1", REQUESTS) == REQUESTS
    assert metric(gateway, "dmq_forbidden_total") - before == REQUESTS
    wait_until(lambda: LINE in gateway.log_text(start), 5, "the refusal logged")
    assert gateway.log_text(start).count(LINE) == 1
    assert probe.latencies and not probe.failures, probe.failures


def test_another_source_gets_a_line_of_its_own(gateway: Gateway) -> None:
    start = gateway.log_size()
    assert refused_over_udp(gateway, "127.0.0.2", 20) == 20
    wait_until(lambda: LINE in gateway.log_text(start), 5, "the second source's refusal logged")
    lines = [line for line in gateway.log_text(start).splitlines() if LINE in line]
    assert len(lines) == 1 and "127.0.0.2" in lines[0], lines
