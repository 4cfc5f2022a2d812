"""Mutual TLS as node trust, on real sockets in one process: with ``verify_peer`` a
TLS peer with a certificate from the CA is served whatever its address, while plain
UDP and TCP from outside ``trusted`` never reach a peer handler.

The node trusts only 192.0.2.0/24 (nothing on this machine), so the loopback
clients of these tests are "outside".
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import AsyncIterator

import pytest

from app.dmq.config import NodeConfig, TlsConfig
from app.dmq.peers import PeerReply
from app.dmq.sip import SipUri, StreamFramer
from app.transport.server import DmqServer
from harness.ports import free_port
from tests.abuse.support import kdmq
from tests.tls.conftest import Pki

PEER = "guarded"


@pytest.fixture
async def node(pki: Pki) -> AsyncIterator[tuple[DmqServer, list[bytes]]]:
    files = pki.issue("127.0.0.1", "node.bus")
    port = free_port()
    config = NodeConfig(
        SipUri.parse(f"sip:127.0.0.1:{port};transport=tls"),
        trusted=(ipaddress.ip_network("192.0.2.0/24"),),
        tls=TlsConfig(files.cert, files.key, files.ca, verify_peer=True),
    )
    server = DmqServer(config)
    received: list[bytes] = []

    def handler(message: object) -> PeerReply:
        received.append(getattr(message, "body", b""))
        return PeerReply()

    await server.start()
    server.register_peer(PEER, handler)
    try:
        yield server, received
    finally:
        await server.stop(grace=0.1)


async def test_verified_tls_peer_is_served_outside_trusted_networks(
    node: tuple[DmqServer, list[bytes]], pki: Pki
) -> None:
    server, received = node
    port = server.config.server_address.effective_port
    files = pki.issue("127.0.0.1", "peer.bus")
    context = ssl.create_default_context(cafile=files.ca)
    context.load_cert_chain(files.cert, files.key)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
    )
    writer.write(kdmq(port, PEER, b"by certificate"))
    framer = StreamFramer(1 << 16)
    answers: list[bytes] = []
    async with asyncio.timeout(10):
        while not answers:
            answers = framer.feed(await reader.read(65536))
    writer.close()
    assert answers[0].startswith(b"SIP/2.0 200")
    assert received == [b"by certificate"]


async def test_plain_udp_from_outside_trusted_is_dropped(
    node: tuple[DmqServer, list[bytes]],
) -> None:
    server, received = node
    port = server.config.server_address.effective_port
    loop = asyncio.get_running_loop()
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            answers.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))
    try:
        transport.sendto(kdmq(port, PEER, b"by address"))
        async with asyncio.timeout(10):
            while server.stats.udp_untrusted_dropped == 0:
                await asyncio.sleep(0.01)
        # Nothing comes back, not even a 403: the request never reached the core.
        await asyncio.sleep(0.2)
        assert answers.empty()
        assert received == []
    finally:
        transport.close()
