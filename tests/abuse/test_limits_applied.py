"""The bounds reach the code that applies them, however the driver and the app are
built: limits set on a driver after it was made (as ``create_app`` does) replace the
look-up bounds and the core's log interval, and ``/metrics`` reads the guard's
counters from the start (no scrape-time patching)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.api.app import create_app
from app.api.limits import ApiLimits, ServeLimits
from app.api.routes.metrics import GatewayRegistry
from app.dmq.config import NodeConfig
from app.dmq.sip import SipUri
from app.gateway.config import GatewayConfig
from app.transport.limits import TransportLimits
from app.transport.server import DmqServer
from harness.ports import free_port

CONFIG = NodeConfig(server_address=SipUri.parse("sip:127.0.0.1:5060"))


def test_a_driver_takes_its_look_up_bounds_and_log_interval_from_its_limits() -> None:
    server = DmqServer(
        CONFIG, limits=TransportLimits(dns_timeout=1.5, dns_negative_ttl=7, log_interval=3)
    )
    assert (server.dns_timeout, server.dns_negative_ttl) == (1.5, 7)
    assert server.node.untrusted_log_interval == 3
    server.limits = TransportLimits(dns_timeout=0.5, dns_negative_ttl=2, log_interval=60)
    assert (server.dns_timeout, server.dns_negative_ttl) == (0.5, 2)
    assert server.node.untrusted_log_interval == 60


def test_look_up_bounds_given_to_the_driver_itself_win() -> None:
    server = DmqServer(CONFIG, dns_timeout=0.2, dns_negative_ttl=60.0)
    assert (server.dns_timeout, server.dns_negative_ttl) == (0.2, 60.0)


def test_metrics_count_the_guards_refusals_from_the_first_scrape(tmp_path: Path) -> None:
    port = free_port()
    config = GatewayConfig(
        node=NodeConfig(server_address=SipUri.parse(f"sip:127.0.0.1:{port}")),
        state_dir=tmp_path,
        api_tokens=("a-token-for-metrics",),
    )
    app = create_app(config, ServeLimits(api=ApiLimits(max_body=1024)))
    with TestClient(app) as client:
        registry = app.state.metrics
        assert isinstance(registry, GatewayRegistry)
        assert registry.gateway_collector.guard is app.state.guard_stats
        assert client.get("/v1/nodes").status_code == 401
        response = client.get("/metrics", headers={"Authorization": "Bearer a-token-for-metrics"})
    samples = {
        sample.labels.get("reason"): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "dmq_http_refused_total"
    }
    assert samples["unauthorized"] == 1
