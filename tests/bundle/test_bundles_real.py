"""Bundles between two real gateways (``dmq-gateway serve`` processes on loopback).

A sends, B receives: a batch POST and a publishing WebSocket on A reach a WebSocket
subscriber on B whole, in order and once, through fewer KDMQ requests than messages
(A's own ``/metrics`` count the requests), with one result per message; a bundle that
cannot be read is refused with a 400 that says why and delivers nothing; a bundle for a
``reply: subscriber`` peer is answered once every entry has its subscriber's reply.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import ClientConnection, connect

from app.gateway import bundle
from app.gateway.frames import AckFrame
from harness.gateway import Gateway
from harness.ports import free_port
from harness.waiting import wait_until
from tests.api.gateway_procs import dump_logs_on_failure, running

PATIENCE = 15.0
#: Fast retransmissions, and a Timer F long enough for a subscriber's replies.
TIMERS = ("--t1", "0.05", "--t2", "0.2", "--timer-f", "4")


class Pair:
    def __init__(self, a: Gateway, b: Gateway) -> None:
        self.a, self.b = a, b
        self.http = httpx.Client(timeout=PATIENCE, trust_env=False)

    def put_peer(self, gateway: Gateway, peer: str, **settings: Any) -> None:
        answer = self.http.put(f"{gateway.url}/v1/peers/{peer}", json=settings)
        assert answer.status_code in (200, 201), answer.text

    def metrics(self, gateway: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = self.http.get(f"{gateway.url}/metrics").text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def kdmq_sent(self, gateway: Gateway, peer: str) -> float:
        return sum(
            value
            for (name, labels), value in self.metrics(gateway).items()
            if name == "dmq_kdmq_sent_total" and ("peer", peer) in labels
        )

    def bundles(self, gateway: Gateway, direction: str) -> tuple[float, float]:
        """(bundles, entries) ``direction`` ("sent" or "received")."""
        metrics = self.metrics(gateway)
        return (
            metrics[(f"dmq_bundles_{direction}_entries_count", ())],
            metrics[(f"dmq_bundles_{direction}_entries_sum", ())],
        )

    @contextlib.contextmanager
    def subscribe(self, gateway: Gateway, peer: str) -> Iterator[ClientConnection]:
        url = f"{gateway.ws_url}/v1/peers/{peer}/subscribe"
        with connect(url, open_timeout=5, proxy=None) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "subscribed"
            yield ws


def frames(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    """The next ``count`` frames (failing after PATIENCE s without one)."""
    return [json.loads(ws.recv(timeout=PATIENCE)) for _ in range(count)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    workdir = tmp_path_factory.mktemp("bundles")
    a = Gateway("A", workdir, ping_interval=1.0, timers=TIMERS)
    b = Gateway("B", workdir, notify=[a], ping_interval=1.0, timers=TIMERS)
    with running([a, b]):
        a.start()
        b.start()
        bus = Pair(a, b)
        wait_until(
            lambda: all((g.health() or {}).get("active_nodes") == 1 for g in (a, b)),
            PATIENCE,
            "A and B to hold each other as active",
        )
        try:
            yield bus
        finally:
            bus.http.close()


@pytest.fixture(autouse=True)
def _logs(request: pytest.FixtureRequest, pair: Pair) -> Iterator[None]:
    with dump_logs_on_failure(request, lambda: [pair.a, pair.b]):
        yield


def fresh_peer(pair: Pair, **settings: Any) -> str:
    peer = f"b-{uuid.uuid4().hex[:8]}"
    pair.put_peer(pair.a, peer)
    pair.put_peer(pair.b, peer, **settings)
    return peer


def test_a_batch_arrives_in_order_once_in_fewer_requests_with_a_result_per_message(
    pair: Pair,
) -> None:
    peer = fresh_peer(pair)
    count = 600
    with pair.subscribe(pair.b, peer) as ws:
        bundles_before = pair.bundles(pair.a, "sent")
        received_before = pair.bundles(pair.b, "received")
        batch = [
            {"body": f"message {n} " + "x" * (n % 50), "content_type": f"text/n{n % 3}"}
            for n in range(count)
        ]
        answer = pair.http.post(
            f"{pair.a.url}/v1/peers/{peer}/broadcast/batch?wait=true", json=batch
        )
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        got = frames(ws, count)
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.5)  # nothing more: no copy delivered twice
    # Once, in order, each with its own content type.
    assert [f["body"] for f in got] == [m["body"] for m in batch]
    assert [f["content_type"] for f in got] == [m["content_type"] for m in batch]
    assert [f["offset"] for f in got] == list(range(got[0]["offset"], got[0]["offset"] + count))
    # One result per message, each with B's own answer, and an id of its own.
    assert len(results) == count
    assert len({r["id"] for r in results}) == count
    assert all(
        [(n["node"], n["code"]) for n in r["results"]] == [(pair.b.uri, 200)] for r in results
    )
    # Far fewer requests than messages went to B, in bundles A and B both counted.
    requests = pair.kdmq_sent(pair.a, peer)
    assert 0 < requests < count / 10, requests
    sent = tuple(x - y for x, y in zip(pair.bundles(pair.a, "sent"), bundles_before, strict=True))
    received = tuple(
        x - y for x, y in zip(pair.bundles(pair.b, "received"), received_before, strict=True)
    )
    assert sent == received
    assert sent[0] == requests and sent[1] == count


def test_websocket_publishes_are_bundled_and_each_acknowledged_with_its_result(
    pair: Pair,
) -> None:
    peer = fresh_peer(pair)
    count = 400
    before = pair.bundles(pair.a, "sent")
    with (
        pair.subscribe(pair.b, peer) as sub,
        connect(f"{pair.a.ws_url}/v1/peers/{peer}/publish", open_timeout=5, proxy=None) as pub,
    ):
        for n in range(count):
            pub.send(json.dumps({"type": "publish", "id": f"c{n}", "body": f"p{n}"}))
        acks = frames(pub, count)
        got = frames(sub, count)
    assert [a["id"] for a in acks] == [f"c{n}" for n in range(count)]
    # Each ack is exactly the text the documented model gives.
    assert all(
        AckFrame.model_validate(a).text()
        == json.dumps(a, separators=(",", ":"), ensure_ascii=False)
        for a in acks
    )
    assert all(a["type"] == "ack" for a in acks), acks[0]
    assert len({a["message_id"] for a in acks}) == count
    assert all([(r["node"], r["code"]) for r in a["results"]] == [(pair.b.uri, 200)] for a in acks)
    assert [f["body"] for f in got] == [f"p{n}" for n in range(count)]
    after = pair.bundles(pair.a, "sent")
    # The publishes read in one loop turn left together: some went as bundles.
    assert after[0] > before[0] and after[1] - before[1] <= count


def test_a_malformed_bundle_is_refused_with_its_reason_and_delivers_nothing(
    pair: Pair,
) -> None:
    peer = fresh_peer(pair)
    good = bundle.encode([(b"one", "text/plain"), (b"two", "text/plain")])
    cases = [
        (good, "seq=1;count=3", "bundle holds 2 entries, its stamp counts 3"),
        (good[:-1], "seq=1;count=2", "bundle entry 1 is cut short: 3 bytes announced, 2 left"),
        (good, "seq=1", "a bundle needs an X-DMQ-Origin stamp with count"),
        (b"\x07" + good[1:], "seq=1;count=2", "bundle version 7 is not understood"),
    ]
    with pair.subscribe(pair.b, peer) as ws:
        for body, params, reason in cases:
            code, phrase = kdmq(pair.b, peer, body, params)
            assert code == 400, (params, phrase)
            assert reason in phrase, phrase
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.5)
        # The same bundle, well formed, is taken whole.
        assert kdmq(pair.b, peer, good, "seq=1;count=2") == (200, "OK")
        assert [f["body"] for f in frames(ws, 2)] == ["one", "two"]
    assert pair.metrics(pair.b)[("dmq_bundles_malformed_total", ())] >= len(cases)


def test_a_subscriber_peer_answers_a_bundle_once_every_entry_is_replied_to(
    pair: Pair,
) -> None:
    """Entry replies are collected; the first refusal (by entry) is the bundle's
    answer, its reason naming the entry, and every message's result is that answer."""
    peer = fresh_peer(pair, reply="subscriber", reply_timeout=3)
    count = 5
    outcome: dict[str, Any] = {}

    def post() -> None:
        with httpx.Client(timeout=PATIENCE, trust_env=False) as client:
            outcome["answer"] = client.post(
                f"{pair.a.url}/v1/peers/{peer}/broadcast/batch?wait=true",
                json=[{"body": f"q{n}"} for n in range(count)],
            )

    with pair.subscribe(pair.b, peer) as ws:
        poster = threading.Thread(target=post)
        poster.start()
        got = frames(ws, count)
        for n, frame in enumerate(got):
            code = 486 if n in (2, 4) else 200
            ws.send(json.dumps({"type": "reply", "id": frame["id"], "code": code}))
        poster.join(PATIENCE)
    answer = outcome["answer"]
    assert answer.status_code == 200, answer.text
    codes = {(r["results"][0]["code"], r["results"][0]["reason"]) for r in answer.json()["results"]}
    assert len(codes) == 1, codes
    ((code, reason),) = codes
    assert code == 486 and "bundle entry 2" in reason, reason


def kdmq(gateway: Gateway, peer: str, body: bytes, params: str) -> tuple[int, str]:
    """Send one KDMQ bundle request over UDP from a throwaway socket; its answer's code
    and reason phrase."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(PATIENCE)
        port = sock.getsockname()[1]
        epoch = uuid.uuid4().hex[:8]
        head = (
            f"KDMQ sip:{peer}@127.0.0.1:{gateway.sip_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{uuid.uuid4().hex}\r\n"
            f"To: <sip:{peer}@127.0.0.1:{gateway.sip_port}>\r\n"
            f"From: <sip:{peer}@127.0.0.1:{port}>;tag=t{uuid.uuid4().hex[:8]}\r\n"
            f"CSeq: 10 KDMQ\r\nCall-ID: {uuid.uuid4().hex}@test\r\nMax-Forwards: 1\r\n"
            f"X-DMQ-Origin: <sip:127.0.0.1:{free_port()}>;epoch={epoch};{params}\r\n"
            f"Content-Type: {bundle.CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendto(head.encode() + body, ("127.0.0.1", gateway.sip_port))
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            data = sock.recv(65536).decode()
            status = data.split("\r\n", 1)[0]
            _, code, phrase = status.split(" ", 2)
            if int(code) >= 200:
                return int(code), phrase
        raise AssertionError("no final answer")


def test_a_send_batch_to_one_gateway_is_bundled_in_its_own_stream(pair: Pair) -> None:
    """A send counts its seqs apart (``;to=``): bundled, it still arrives whole and in
    order, and a broadcast after it is not taken for a copy of it."""
    peer = fresh_peer(pair)
    count = 250
    with pair.subscribe(pair.b, peer) as ws:
        before = pair.bundles(pair.a, "sent")
        answer = pair.http.post(
            f"{pair.a.url}/v1/peers/{peer}/send/batch",
            params={"node": pair.b.uri},
            json=[{"body": f"s{n}"} for n in range(count)],
        )
        assert answer.status_code == 202, answer.text
        assert len(set(answer.json()["ids"])) == count
        broadcast = pair.http.post(
            f"{pair.a.url}/v1/peers/{peer}/broadcast/batch", json=[{"body": "after"}]
        )
        assert broadcast.status_code == 202, broadcast.text
        got = frames(ws, count + 1)
    assert [f["body"] for f in got] == [f"s{n}" for n in range(count)] + ["after"]
    after = pair.bundles(pair.a, "sent")
    assert after[0] - before[0] == 3 and after[1] - before[1] == count
