"""Taps: a typed mirror sees every message of its peer id, beside any raw peer.

Real DmqServers on loopback UDP: a sender node and a gateway whose ``htable`` peer id
is tapped. The tap answers alone when no raw peer is registered; with a raw peer the
tap still sees each message and the raw peer (its history, its subscribers) answers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from app.dmq.peers import PeerMessage, PeerReply
from app.dmq.sip import SipUri
from app.gateway.config import GatewayConfig
from app.gateway.models import PeerSettings
from app.gateway.service import Gateway
from app.transport.server import DmqServer

from .conftest import node_config


async def _exchange(tmp_path: Path) -> None:
    gateway = Gateway(GatewayConfig(node=node_config(), state_dir=tmp_path / "state"))
    sender = DmqServer(node_config(str(gateway.config.node.server_address)))
    seen: list[bytes] = []
    inits: list[str] = []

    def tap(message: PeerMessage) -> PeerReply:
        seen.append(message.body)
        if message.body.startswith(b"{"):
            return PeerReply()
        return PeerReply(400, "Bad Request")

    gateway.attach_tap("htable", tap, init=lambda: inits.append("init"), description="mirror")
    await gateway.start()
    await sender.start()
    target = SipUri.parse(str(gateway.config.node.server_address))
    sender.register_peer("htable", lambda m: PeerReply())
    try:
        for _ in range(200):  # the sender joins through the gateway
            if sender.node.nodes.find(target) is not None and inits:
                break
            await asyncio.sleep(0.01)
        assert inits == ["init"]  # the tap's init ran once the gateway reached a node

        async def send(body: bytes) -> int:
            _, waiter = sender.send_nowait("htable", body, "application/json", target)
            operation = await asyncio.wait_for(waiter, 5)
            (result,) = operation.results
            return result.code

        # No raw peer: the tap is the peer, its reply is the SIP reply.
        assert await send(b'{"a":1}') == 200
        assert await send(b"not json") == 400
        assert seen == [b'{"a":1}', b"not json"]

        # A raw peer of the same id: the tap sees the message, the raw peer answers
        # (auto: 200 whatever the body) and keeps it in its history.
        gateway.put_peer("htable", PeerSettings())
        assert await send(b"raw bytes") == 200
        assert seen[-1] == b"raw bytes"
        history = gateway._hub.channel("htable").history
        assert [entry[6] for entry in history] == [b"raw bytes"]
        assert [p.peer_id for p in gateway.peers()] == ["htable"]

        # Unregistered again: the tap answers alone once more.
        gateway.delete_peer("htable")
        assert await send(b"again") == 400
        assert seen[-1] == b"again"
        assert gateway.peers() == []
    finally:
        await sender.stop()
        await gateway.stop()


def test_a_tap_answers_alone_and_beside_a_raw_peer(tmp_path: Path) -> None:
    asyncio.run(_exchange(tmp_path))
