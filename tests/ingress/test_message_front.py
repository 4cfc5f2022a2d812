"""The fast path in front of FastAPI (as ``serve`` runs it) answers what the router does.

:class:`MessageFront` takes broadcast and send POSTs before FastAPI's own middleware
sees them, with the application's guard in front of the fast path. Every documented
status is asked of a gateway served that way and of one with no fast path at all
(every request through FastAPI's router), and the answers compared, as
``test_fastpath`` does for the fast path inside FastAPI; refusals are counted once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from app.api.app import create_app
from app.api.routes import peers
from app.api.routes.fastpath import MessageFastPath, MessageFront
from app.gateway.config import GatewayConfig
from tests.gateway.conftest import node_config
from tests.ingress.test_fastpath import CASES, TEXT, TOKEN, _masked


@contextmanager
def gateway(tmp_path: Path, front: bool) -> Iterator[tuple[TestClient, Any]]:
    """A served gateway (``front``) or a routed-only one, and its FastAPI app."""
    config = GatewayConfig(
        node=node_config(),
        state_dir=tmp_path / ("front" if front else "routed"),
        api_tokens=(TOKEN,),
    )
    app = create_app(config)
    if not front:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not MessageFastPath]
    with TestClient(MessageFront(app, app) if front else app) as client:
        yield client, app


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[tuple[TestClient, Any], tuple[TestClient, Any]]]:
    with gateway(tmp_path, True) as front, gateway(tmp_path, False) as routed:
        yield front, routed


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_the_front_and_the_router_give_the_same_answer(
    pair: tuple[tuple[TestClient, Any], ...], case: tuple[Any, ...]
) -> None:
    _, path, params, headers, body, status = case
    answers = [
        client.post(path, params=params, headers=headers, content=body) for client, _ in pair
    ]
    assert answers[0].status_code == status, answers[0].text
    assert _masked(answers[0]) == _masked(answers[1])
    if status >= 400:
        assert answers[0].headers["content-type"] == "application/problem+json"
        assert json.loads(answers[0].text)["status"] == status
    # The refusal is counted by the guard once, as inside FastAPI.
    counted = [
        app.state.guard_stats.http_unauthorized + app.state.guard_stats.http_bodies_too_large
        for _, app in pair
    ]
    assert counted[0] == counted[1]


def test_a_stopping_gateway_answers_503_through_the_front(
    pair: tuple[tuple[TestClient, Any], ...],
) -> None:
    for _, app in pair:
        app.state.gateway.begin_stop()
    answers = [
        client.post("/v1/peers/p/broadcast", headers=TEXT, content=b"x") for client, _ in pair
    ]
    assert answers[0].status_code == 503
    assert _masked(answers[0]) == _masked(answers[1])


def test_the_front_answers_plain_posts_itself_and_passes_on_everything_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the POST the fast path leaves to FastAPI (a timeout spelled with an
    exponent) reaches the routed endpoint's body reader; other routes still work."""
    routed: list[str] = []
    original = peers._body

    async def watched(request: Any) -> tuple[bytes, str]:
        routed.append(request.url.path)
        return await original(request)

    monkeypatch.setattr(peers, "_body", watched)
    with gateway(tmp_path, True) as (client, _):
        plain = client.post("/v1/peers/p/broadcast", params={"wait": "false"}, headers=TEXT)
        spelled = client.post("/v1/peers/q/broadcast", params={"timeout": "3e1"}, headers=TEXT)
        health = client.get("/v1/health", headers={"authorization": f"Bearer {TOKEN}"})
    assert (plain.status_code, spelled.status_code, health.status_code) == (202, 202, 200)
    assert routed == ["/v1/peers/q/broadcast"]
