"""Host name look-ups are capped: with ``max_dns_lookups`` in flight against a slow DNS
server (a real one on 127.0.0.1), one more name fails at once, counted, instead of
adding a look-up; a name IDNA refuses is a failed look-up like any other."""

from __future__ import annotations

import asyncio

import pytest

from app.dmq.config import NodeConfig
from app.dmq.sip import SipUri
from app.transport.dns import DnsResolutionError
from app.transport.limits import TransportLimits
from app.transport.server import DmqServer
from harness.ports import free_port
from tests.transport.dns_server import DnsTestServer

ZONE = {f"n{i}.test": {"A": ["127.0.0.1"]} for i in range(4)}


async def test_lookups_in_flight_are_capped() -> None:
    dns_server = DnsTestServer(ZONE, delay=1.0)
    await dns_server.start()
    server = DmqServer(
        NodeConfig(server_address=SipUri.parse(f"sip:127.0.0.1:{free_port()}")),
        dns_resolver=dns_server.resolver(lifetime=5.0),
        limits=TransportLimits(max_dns_lookups=2),
    )
    await server.start()
    try:
        slow = [
            asyncio.ensure_future(server.resolve_node(SipUri.parse(f"sip:n{i}.test:5060")))
            for i in range(2)
        ]
        await asyncio.sleep(0.1)
        with pytest.raises(DnsResolutionError):
            await asyncio.wait_for(
                server.resolve_node(SipUri.parse("sip:n2.test:5060")), timeout=0.5
            )
        assert server.stats.dns_lookups_refused == 1
        assert await asyncio.gather(*slow) == ["127.0.0.1", "127.0.0.1"]
        # With the look-ups done, the same name resolves.
        assert await server.resolve_node(SipUri.parse("sip:n2.test:5060")) == "127.0.0.1"
    finally:
        await server.stop()
        await dns_server.stop()


async def test_a_name_idna_refuses_is_a_failed_lookup() -> None:
    server = DmqServer(NodeConfig(server_address=SipUri.parse(f"sip:127.0.0.1:{free_port()}")))
    await server.start()
    try:
        with pytest.raises(DnsResolutionError):
            await server.resolve_node(SipUri.parse("sip:" + "a" * 70 + ".example:5060"))
    finally:
        await server.stop()
