"""The API's edge cases against an in-process gateway: errors, peers, metrics, docs."""

from __future__ import annotations

import json
import re
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from app.dmq.transaction import TimerSettings
from app.gateway.config import GatewayConfig
from tests.gateway.conftest import Node, assert_problem, node_config, running, stop_all

PEER = "things"


# ---------------------------------------------------------------- errors


def test_every_refusal_is_a_problem_with_its_status(client: TestClient) -> None:
    local = client.get("/v1/health").json()["node"]
    assert_problem(client.get("/v1/peers/nobody"), 404, "nobody")
    assert_problem(client.delete("/v1/peers/nobody"), 404, "nobody")
    assert_problem(client.put("/v1/peers/notification_peer", json={}), 409, "notification")
    assert_problem(client.put("/v1/peers/not%20valid", json={}), 422, "peer id")
    assert_problem(
        client.post("/v1/nodes", json={"uri": "sip:127.0.0.1:5060;transport=sctp"}), 422, "sctp"
    )
    assert_problem(client.post("/v1/nodes", json={"uri": local}), 409, "this node itself")
    assert_problem(client.delete(f"/v1/nodes/{local}"), 409, "this node itself")
    assert_problem(client.delete("/v1/nodes/sip:127.0.0.1:9"), 404, "sip:127.0.0.1:9")
    assert_problem(
        client.post("/v1/peers/p/send", params={"node": "sip:127.0.0.1:9"}, content=b"{}"),
        404,
        "not a node of this bus",
    )
    assert_problem(
        client.post("/v1/peers/p/broadcast", content=b"x" * 70_000, headers=TEXT), 413, "bytes"
    )
    assert_problem(
        client.post("/v1/peers/notification_peer/broadcast", content=b"{}"), 409, "membership"
    )


TEXT = {"content-type": "text/plain"}


def test_a_form_body_is_refused_with_415_naming_the_fix(client: TestClient) -> None:
    response = client.post(
        "/v1/peers/p/broadcast",
        content=b"k=v",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert_problem(response, 415, "Content-Type")


def test_a_body_without_content_type_goes_out_as_json(
    client: TestClient, gateway_config: GatewayConfig
) -> None:
    receiver = Node(client, node_config()).start()
    try:
        receiver.listen(PEER)
        assert client.post("/v1/nodes", json={"uri": receiver.uri}).status_code == 201
        done = client.post(
            f"/v1/peers/{PEER}/send",
            params={"node": receiver.uri, "wait": "true"},
            content=b'{"k": 1}',
        )
        assert done.status_code == 200, done.text
        assert [r["code"] for r in done.json()["results"]] == [200]
        [message] = receiver.received
        assert (message.content_type, message.body) == ("application/json", b'{"k": 1}')
    finally:
        receiver.stop()


def test_stopping_gateway_refuses_with_503(client: TestClient) -> None:
    client.app.state.gateway.begin_stop()  # type: ignore[attr-defined]
    assert_problem(client.post("/v1/peers/p/broadcast", content=b"{}"), 503, "stopping")
    assert client.get("/v1/health").json()["status"] == "stopping"


# ---------------------------------------------------------------- peers


def test_reply_timeout_beyond_timer_f_is_refused_and_changes_nothing(client: TestClient) -> None:
    refused = client.put(f"/v1/peers/{PEER}", json={"reply": "subscriber", "reply_timeout": 5})
    assert_problem(refused, 422, "Timer F")
    assert client.get(f"/v1/peers/{PEER}").status_code == 404
    ok = client.put(f"/v1/peers/{PEER}", json={"reply": "subscriber", "reply_timeout": 0.5})
    assert ok.status_code == 201
    again = client.put(f"/v1/peers/{PEER}", json={"reply": "subscriber", "reply_timeout": 2})
    assert_problem(again, 422, "Timer F")
    assert client.get(f"/v1/peers/{PEER}").json()["reply_timeout"] == 0.5


def test_a_corrupt_peer_store_is_kept_aside_and_the_gateway_starts(
    gateway_config: GatewayConfig, caplog: pytest.LogCaptureFixture
) -> None:
    assert gateway_config.state_dir is not None
    store = gateway_config.state_dir / "peers.json"
    store.parent.mkdir(parents=True)
    store.write_text('{"version": 1, "peers": {"half": {"reply": "sometimes"')
    with running(gateway_config) as client:
        assert client.get("/v1/peers").json() == []
        assert "cannot read" in caplog.text
        broken = store.with_suffix(".json.broken")
        assert broken.read_text().startswith('{"version": 1')
        assert client.put(f"/v1/peers/{PEER}", json={"history": 3}).status_code == 201
    # The registry now lives in the state database; peers.json is not written again.
    assert not store.exists()
    with running(gateway_config) as client:
        assert [(p["peer_id"], p["history"]) for p in client.get("/v1/peers").json()] == [(PEER, 3)]


def test_a_long_node_list_is_warned_about(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A node list holds the active nodes: 32 real ones make it longer than 1024 bytes,
    and the gateway's node says so when it announces it."""
    nodes = [Node(client, node_config(timers=TimerSettings())).start() for _ in range(32)]
    try:
        for node in nodes:
            assert client.post("/v1/nodes", json={"uri": node.uri}).status_code == 201
        warning = r"our node list is \d+ bytes; Kamailio reads at most 1024"
        # 32 nodes must answer a ping first: generous for a loaded machine.
        deadline = time.monotonic() + 30
        while not re.search(warning, caplog.text):
            assert time.monotonic() < deadline, "no warning about the node list's size"
            time.sleep(0.05)
    finally:
        stop_all(client, nodes)


# ---------------------------------------------------------------- metrics, health


def test_metrics_parse_and_carry_the_process_metrics(client: TestClient) -> None:
    assert client.put(f"/v1/peers/{PEER}", json={}).status_code == 201
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name in (
        "dmq_kdmq_received",
        "dmq_peer_reply_timeouts",
        "dmq_nodes",
        "dmq_websocket_clients",
        "dmq_websocket_queue_overflows",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds",
        "python_gc_objects_collected",
    ):
        assert name in families, name
    [clients] = families["dmq_websocket_clients"].samples
    assert (clients.labels, clients.value) == ({"peer": PEER}, 0)
    assert "dmq_subscriber_reply_timeouts" not in families
    openmetrics = client.get("/metrics", headers={"accept": "application/openmetrics-text"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")


def test_public_health_answers_without_a_token(gateway_config: GatewayConfig) -> None:
    from dataclasses import replace

    config = replace(gateway_config, api_tokens=("secret-token",), public_health=True)
    with running(config) as client:
        assert client.get("/v1/health").status_code == 200
        assert_problem(client.get("/v1/peers"), 401)
    with running(replace(config, public_health=False)) as client:
        assert_problem(client.get("/v1/health"), 401)


# ---------------------------------------------------------------- documentation


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_documentation_pages_load_everything_from_the_gateway(
    client: TestClient, page: str
) -> None:
    html = client.get(page)
    assert html.status_code == 200
    parser = _Assets()
    parser.feed(html.text)
    inline = re.findall(r"""(?:url|spec-url|src)\s*[:=]\s*['"]([^'"]+)['"]""", html.text)
    urls = parser.urls + inline
    assert any(u.endswith(".js") for u in urls), urls
    for url in urls:
        parts = urlsplit(url)
        assert not parts.netloc, f"{page} loads {url} from another host"
        assert client.get(url).status_code == 200, url
    assert not re.search(
        r"https?://(?!127\.0\.0\.1|localhost)[\w.-]+/[\w./-]*\.(js|css)", html.text
    )


def test_asyncapi_document_is_served_and_linked(client: TestClient) -> None:
    document = client.get("/asyncapi.json").json()
    assert document["asyncapi"].startswith("3.")
    committed = Path(__file__).resolve().parents[2] / "openapi" / "websocket.json"
    assert document == json.loads(committed.read_text())
    assert "(/asyncapi.json)" in client.get("/openapi.json").json()["info"]["description"]


def test_health_uptime_grows(client: TestClient) -> None:
    first = client.get("/v1/health").json()["uptime"]
    time.sleep(0.01)
    assert client.get("/v1/health").json()["uptime"] > first
