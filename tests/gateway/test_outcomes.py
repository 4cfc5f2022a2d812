"""wait=true results say delivered, queued or dropped; /metrics shows the outboxes."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from harness.ports import free_port
from harness.waiting import wait_until
from tests.gateway.conftest import Node, node_config

PEER = "orders"


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_node_that_answers_is_delivered(client: TestClient) -> None:
    receiver = Node(client, node_config()).start()
    try:
        receiver.listen(PEER)
        assert client.post("/v1/nodes", json={"uri": receiver.uri}).status_code == 201
        result = client.post(f"/v1/peers/{PEER}/send?node={receiver.uri}&wait=true").json()
        (one,) = result["results"]
        assert (one["outcome"], one["code"], one["timeout"]) == ("delivered", 200, False)
    finally:
        receiver.stop()


def test_a_silent_node_gets_its_message_queued_and_metrics_show_it(client: TestClient) -> None:
    silent = f"sip:127.0.0.1:{free_port()}"
    assert client.post("/v1/nodes", json={"uri": silent}).status_code == 201
    result = client.post(f"/v1/peers/{PEER}/send?node={silent}&wait=true").json()
    (one,) = result["results"]
    assert (one["outcome"], one["code"]) == ("queued", None), one
    assert one["reason"]
    metrics = samples(client)
    assert metrics[("dmq_outbox_messages", (("node", silent),))] == 1
    assert metrics[("dmq_outbox_queued_total", ())] >= 1
    # Removing the node drops what waited for it, counted by reason.
    assert client.delete(f"/v1/nodes/{silent}").status_code == 204
    metrics = samples(client)
    assert metrics[("dmq_outbox_dropped_total", (("reason", "removed"),))] == 1
    assert ("dmq_outbox_messages", (("node", silent),)) not in metrics


def test_a_send_to_a_parked_node_is_queued_and_delivered_when_it_comes_back(
    client: TestClient,
) -> None:
    """A node removed after missed pings keeps its outbox parked; a send to it is
    store-and-forward like a broadcast: queued (not 404), then delivered, in order,
    once a node answers on that address again."""
    config = node_config()
    receiver = Node(client, config).start()
    receiver.listen(PEER)
    assert client.post("/v1/nodes", json={"uri": receiver.uri}).status_code == 201
    first = client.post(f"/v1/peers/{PEER}/send?node={receiver.uri}&wait=true", content=b"0")
    assert first.json()["results"][0]["outcome"] == "delivered"
    receiver.stop()

    def parked() -> bool:
        listed = {n["uri"] for n in client.get("/v1/nodes").json()}
        return receiver.uri not in listed and samples(client)[("dmq_outbox_parked_total", ())] >= 1

    wait_until(parked, 15, "the stopped node to be removed and parked")
    results = []
    for body in (b"1", b"2", b"3"):
        response = client.post(f"/v1/peers/{PEER}/send?node={receiver.uri}&wait=true", content=body)
        assert response.status_code == 200, response.text
        results.append(response.json()["results"][0])
    assert [r["outcome"] for r in results] == ["queued"] * 3, results

    back = Node(client, config).start()
    try:
        back.listen(PEER)
        wait_until(lambda: len(back.received) >= 3, 15, "the parked sends to arrive")
        assert [m.body for m in back.received] == [b"1", b"2", b"3"]
    finally:
        back.stop()
