"""In-process gateways for fast API tests.

The app runs under Starlette's TestClient, whose lifespan starts a real DmqServer on a
free loopback port; other DMQ nodes the tests need (a sender, a receiver) are real
DmqServers started on the same event loop through the client's portal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from app.api.app import create_app
from app.dmq.config import NodeConfig
from app.dmq.events import SendOperation
from app.dmq.peers import PeerMessage, PeerReply
from app.dmq.sip import SipUri
from app.dmq.transaction import TimerSettings
from app.gateway.config import GatewayConfig
from app.transport.server import DmqServer
from harness.ports import free_port

#: Retransmit from 50 ms, give up after 1 s: a lost or unanswered request ends fast.
FAST = TimerSettings(t1=0.05, t2=0.2, timer_f=1.0)


def node_config(*notify: str, timers: TimerSettings = FAST) -> NodeConfig:
    return NodeConfig(
        server_address=SipUri.parse(f"sip:127.0.0.1:{free_port()}"),
        notification_addresses=tuple(SipUri.parse(uri) for uri in notify),
        ping_interval=1.0,
        timers=timers,
    )


class Node:
    """Another DMQ node on the bus, on the app's event loop."""

    def __init__(self, client: TestClient, config: NodeConfig) -> None:
        self.client = client
        self.server = DmqServer(config)
        self.uri = str(config.server_address)
        self.received: list[PeerMessage] = []

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        portal = self.client.portal
        assert portal is not None
        return portal.call(function, *args)

    def start(self) -> Node:
        self.call(self.server.start)
        return self

    def stop(self) -> None:
        self.call(self.server.stop)

    def listen(self, peer_id: str) -> None:
        """Register ``peer_id`` here; what arrives for it is kept in ``received``."""

        def handler(message: PeerMessage) -> PeerReply:
            self.received.append(message)
            return PeerReply()

        async def register() -> None:
            self.server.register_peer(peer_id, handler)

        self.call(register)

    def send_later(self, peer_id: str, body: bytes, to: str) -> Callable[[], SendOperation]:
        """Start a send to ``to`` now; call the result to wait for its operation."""

        async def start() -> asyncio.Future[SendOperation]:
            _, waiter = self.server.send_nowait(peer_id, body, "text/plain", SipUri.parse(to))
            return waiter

        waiter = self.call(start)

        async def result() -> SendOperation:
            return await asyncio.wait_for(waiter, 5)

        def wait() -> SendOperation:
            operation: SendOperation = self.call(result)
            return operation

        return wait


def stop_all(client: TestClient, nodes: list[Node]) -> None:
    """Stop several nodes at once: each leave waits for answers (up to 2 s)."""

    async def stop() -> None:
        await asyncio.gather(*(node.server.stop() for node in nodes))

    portal = client.portal
    assert portal is not None
    portal.call(stop)


@pytest.fixture
def gateway_config(tmp_path: Path) -> GatewayConfig:
    return GatewayConfig(node=node_config(), state_dir=tmp_path / "state")


@contextmanager
def running(config: GatewayConfig) -> Iterator[TestClient]:
    with TestClient(create_app(config)) as client:
        yield client


@pytest.fixture
def client(gateway_config: GatewayConfig) -> Iterator[TestClient]:
    with running(gateway_config) as client:
        yield client


def with_node(config: GatewayConfig, **changes: Any) -> GatewayConfig:
    return replace(config, node=replace(config.node, **changes))


def assert_problem(response: Any, status: int, *mentions: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    for text in mentions:
        assert text in problem["detail"], problem
    return problem
