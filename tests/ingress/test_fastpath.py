"""The broadcast/send fast path answers exactly what the routed endpoint answers.

Two in-process gateways: one as served (with :class:`MessageFastPath`), one with the
fast path taken out, so every request goes through FastAPI's router. Every status the
two routes document is asked of both, and the answers compared: status, headers that
matter, and the body byte for byte (message ids aside, which differ per gateway).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

from app.api.app import create_app
from app.api.routes import peers
from app.api.routes.fastpath import MessageFastPath, _accepted
from app.gateway.config import GatewayConfig
from app.gateway.models import Dispatch
from tests.gateway.conftest import Node, node_config, stop_all

TOKEN = "s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
TEXT = {**AUTH, "content-type": "text/plain"}


@contextmanager
def gateway(tmp_path: Path, fast: bool) -> Iterator[TestClient]:
    config = GatewayConfig(
        node=node_config(), state_dir=tmp_path / ("fast" if fast else "routed"), api_tokens=(TOKEN,)
    )
    app = create_app(config)
    if not fast:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not MessageFastPath]
    with TestClient(app) as client:
        yield client


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    with gateway(tmp_path, True) as fast, gateway(tmp_path, False) as routed:
        yield fast, routed


def _masked(response: Any) -> tuple[int, str, str, Any]:
    text = re.sub(r'"id":"[^"]*"', '"id":"*"', response.text)
    text = re.sub(r"sip:127\.0\.0\.1:\d+", "sip:N", text)
    return (
        response.status_code,
        response.headers.get("content-type"),
        int(response.headers["content-length"]) == len(response.content),
        response.headers.get("www-authenticate"),
        text,
    )


CASES: list[tuple[str, str, dict[str, str], dict[str, str], bytes, int]] = [
    # (name, path, params, headers, body, expected status)
    ("accepted", "/v1/peers/p/broadcast", {}, TEXT, b"hi", 202),
    ("waited, no node", "/v1/peers/p/broadcast", {"wait": "true", "timeout": "2"}, TEXT, b"x", 200),
    ("no token", "/v1/peers/p/broadcast", {}, {}, b"x", 401),
    ("wrong token", "/v1/peers/p/broadcast", {}, {"authorization": "Bearer nope-nope"}, b"x", 401),
    ("unknown node", "/v1/peers/p/send", {"node": "sip:127.0.0.1:9"}, TEXT, b"x", 404),
    ("reserved", "/v1/peers/notification_peer/broadcast", {}, TEXT, b"x", 409),
    ("too large", "/v1/peers/p/broadcast", {}, TEXT, b"x" * 70_000, 413),
    ("over the guard", "/v1/peers/p/broadcast", {}, TEXT, b"x" * 1_100_000, 413),
    (
        "form",
        "/v1/peers/p/broadcast",
        {},
        {**AUTH, "content-type": "application/x-www-form-urlencoded"},
        b"k=v",
        415,
    ),
    ("bad peer id", "/v1/peers/not%20valid/broadcast", {}, TEXT, b"x", 422),
    ("bad wait", "/v1/peers/p/broadcast", {"wait": "maybe"}, TEXT, b"x", 422),
    ("bad timeout", "/v1/peers/p/broadcast", {"timeout": "0"}, TEXT, b"x", 422),
    ("big timeout", "/v1/peers/p/broadcast", {"timeout": "301"}, TEXT, b"x", 422),
    ("no node", "/v1/peers/p/send", {}, TEXT, b"x", 422),
    ("short node", "/v1/peers/p/send", {"node": "sip"}, TEXT, b"x", 422),
    (
        "bad node uri",
        "/v1/peers/p/send",
        {"node": "sip:127.0.0.1:5060;transport=sctp"},
        TEXT,
        b"x",
        422,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fast_path_and_router_give_the_same_answer(
    pair: tuple[TestClient, TestClient], case: tuple[Any, ...]
) -> None:
    _, path, params, headers, body, status = case
    answers = [client.post(path, params=params, headers=headers, content=body) for client in pair]
    assert answers[0].status_code == status, answers[0].text
    assert _masked(answers[0]) == _masked(answers[1])
    if status >= 400:
        assert answers[0].headers["content-type"] == "application/problem+json"
        assert json.loads(answers[0].text)["status"] == status


def test_stopping_gateways_answer_503_alike(pair: tuple[TestClient, TestClient]) -> None:
    for client in pair:
        client.app.state.gateway.begin_stop()  # type: ignore[attr-defined]
    answers = [client.post("/v1/peers/p/broadcast", headers=TEXT, content=b"x") for client in pair]
    assert answers[0].status_code == 503
    assert _masked(answers[0]) == _masked(answers[1])


def test_a_waited_send_gives_the_same_results_through_both(
    pair: tuple[TestClient, TestClient],
) -> None:
    receivers = [Node(client, node_config()).start() for client in pair]
    try:
        answers = []
        for client, receiver in zip(pair, receivers, strict=True):
            receiver.listen("p")
            added = client.post("/v1/nodes", json={"uri": receiver.uri}, headers=AUTH)
            assert added.status_code == 201, added.text
            answers.append(
                client.post(
                    "/v1/peers/p/send",
                    params={"node": receiver.uri, "wait": "yes"},
                    headers=TEXT,
                    content=b"\xffbinary",
                )
            )
        assert answers[0].status_code == 200, answers[0].text
        assert [r["code"] for r in answers[0].json()["results"]] == [200]
        assert _masked(answers[0]) == _masked(answers[1])
        assert [m.body for r in receivers for m in r.received] == [b"\xffbinary"] * 2
    finally:
        for client, receiver in zip(pair, receivers, strict=True):
            stop_all(client, [receiver])


def test_the_fast_path_answers_plain_requests_and_leaves_the_rest_to_the_router(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The comparisons above would pass with no fast path at all: here the routed
    endpoint's body reader is watched, and only the request the fast path leaves to
    FastAPI (a timeout spelled with an exponent) reaches it."""
    routed: list[str] = []
    original = peers._body

    async def watched(request: Any) -> tuple[bytes, str]:
        routed.append(request.url.path)
        return await original(request)

    monkeypatch.setattr(peers, "_body", watched)
    with gateway(tmp_path, True) as client:
        plain = client.post("/v1/peers/p/broadcast", params={"wait": "false"}, headers=TEXT)
        spelled = client.post("/v1/peers/q/broadcast", params={"timeout": "3e1"}, headers=TEXT)
    assert (plain.status_code, spelled.status_code) == (202, 202)
    assert routed == ["/v1/peers/q/broadcast"]


@pytest.mark.parametrize(
    "dispatch",
    [
        Dispatch("c8e8a24d-1", "news", ()),
        Dispatch("c8e8a24d-2", "p", ("sip:127.0.0.1:5072", "sip:[::1]:5074;transport=tcp")),
        # Strings JSON must escape or keep as they are: quotes, backslashes, control
        # characters, non-ASCII and the line separators a JavaScript parser minds.
        Dispatch('i"d\\-3', "pe'er", ('sip:"q"@h:1', "sip:\u00e9\u2028\x01@h:2")),
    ],
)
async def test_the_accepted_answer_is_the_routed_endpoints_bytes(dispatch: Dispatch) -> None:
    """The fast path writes its 202 body by hand; the routed endpoint renders
    SendAccepted with JSONResponse. Both give the same bytes and headers."""
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await _accepted(send, dispatch)
    model, status = peers.answer(dispatch)
    routed = JSONResponse(model.model_dump(mode="json"), status_code=status)
    assert sent[0]["status"] == status == 202
    assert sent[1]["body"] == routed.body
    assert sorted(sent[0]["headers"]) == sorted(routed.raw_headers)
