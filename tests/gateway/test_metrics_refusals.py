"""Every refusal of a bound shows in ``/metrics``: the SIP driver's and the API's."""

from __future__ import annotations

import socket
from dataclasses import replace

from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from app.api.app import create_app
from app.api.limits import ServeLimits
from app.api.routes.metrics import HTTP_REFUSALS, TCP_REFUSALS
from app.gateway.config import GatewayConfig
from app.transport.limits import TransportLimits

TOKEN = "metrics-token"


def _samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_a_refused_sip_connection_and_a_refused_request_are_counted(
    gateway_config: GatewayConfig,
) -> None:
    config = replace(gateway_config, api_tokens=(TOKEN,))
    limits = ServeLimits(transport=TransportLimits(idle_timeout=0.2))
    with TestClient(create_app(config, limits)) as client:
        before = _samples(client)
        # Every reason is exported from the start, at zero: a dashboard sees the series
        # before the first attack.
        for reason in TCP_REFUSALS.values():
            assert before[("dmq_tcp_refused_total", (("reason", reason),))] == 0
        for reason in HTTP_REFUSALS.values():
            assert before[("dmq_http_refused_total", (("reason", reason),))] == 0
        assert before[("dmq_tcp_connections", ())] == 0
        assert ("dmq_outbox_parked_total", ()) in before
        assert ("dmq_outbox_unparked_total", ()) in before

        # The API refuses a request without the token...
        assert client.get("/v1/peers").status_code == 401
        # ...and the driver closes a SIP TCP connection that never sends a byte.
        address = config.node.server_address
        with socket.create_connection((address.host, address.port), timeout=10) as idle:
            assert _samples(client)[("dmq_tcp_connections", ())] == 1
            assert idle.recv(1) == b""

        after = _samples(client)
        assert after[("dmq_http_refused_total", (("reason", "unauthorized"),))] == 1
        assert after[("dmq_tcp_refused_total", (("reason", "idle_timeout"),))] == 1
        assert after[("dmq_tcp_connections", ())] == 0
        untouched = {r for r in TCP_REFUSALS.values() if r != "idle_timeout"}
        for reason in untouched:
            assert after[("dmq_tcp_refused_total", (("reason", reason),))] == 0
