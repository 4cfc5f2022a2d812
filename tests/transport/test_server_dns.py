"""Host names met by a running DmqServer are resolved without blocking its loop.

A real node on loopback sockets is sent node lists naming hosts, and its look-ups go
to the in-process DNS server of tests/transport/dns_server.py, made slow (every answer
held back 3 s). A periodic task measures how late the loop wakes it meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from app.dmq.config import NodeConfig
from app.dmq.sip import SipResponse, SipUri, parse_message
from app.transport.dns import DnsResolutionError
from app.transport.server import DmqServer
from tests.support.ports import free_port
from tests.transport.dns_server import DnsTestServer, Zone

SLOW = 3.0
ZONE: Zone = {"slow.test": {"A": ["127.0.0.1"]}, "fast.test": {"A": ["127.0.0.1"]}}

StartDns = Callable[..., Awaitable[DnsTestServer]]


@pytest.fixture
async def start_dns() -> AsyncIterator[StartDns]:
    servers: list[DnsTestServer] = []

    async def start(delay: float = 0.0) -> DnsTestServer:
        server = DnsTestServer(ZONE, delay=delay)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


class Sender(asyncio.DatagramProtocol):
    """A bare UDP socket that plays another node: sends lists, collects answers."""

    def __init__(self) -> None:
        self.responses: asyncio.Queue[SipResponse] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.port = int(transport.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        message = parse_message(data)
        if isinstance(message, SipResponse):
            self.responses.put_nowait(message)

    def send_list(self, node_port: int, *lines: str) -> None:
        self.sent += 1
        branch = f"z9hG4bKlist{self.sent}"
        body = "".join(f"{line}\r\n" for line in lines).encode()
        data = (
            f"KDMQ sip:notification_peer@127.0.0.1:{node_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={branch}\r\n"
            f"From: <sip:notification_peer@127.0.0.1:{self.port}>;tag=f1\r\n"
            f"To: <sip:notification_peer@127.0.0.1:{node_port}>\r\n"
            f"Call-ID: {branch}@127.0.0.1\r\n"
            "CSeq: 10 KDMQ\r\n"
            "Max-Forwards: 1\r\n"
            "Content-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        assert self.transport is not None
        self.transport.sendto(data, ("127.0.0.1", node_port))


class LagMeter:
    """Sleeps 10 ms over and over and records how much later than asked it woke."""

    def __init__(self) -> None:
        self.ticks = 0
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, loop.time() - started - 0.01)
            self.ticks += 1

    def __enter__(self) -> LagMeter:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@pytest.fixture
async def sender() -> AsyncIterator[Sender]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(Sender, local_addr=("127.0.0.1", 0))
    yield protocol
    transport.close()


async def running_node(dns: DnsTestServer | None, **options: float) -> DmqServer:
    config = NodeConfig(server_address=SipUri.parse(f"sip:127.0.0.1:{free_port()}"))
    server = DmqServer(config, dns_resolver=dns.resolver(lifetime=10) if dns else None, **options)
    await server.start()
    return server


async def wait_for(condition: Callable[[], bool], seconds: float) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    assert condition()


async def test_the_loop_keeps_serving_while_a_slow_name_resolves(
    start_dns: StartDns, sender: Sender
) -> None:
    dns = await start_dns(delay=SLOW)
    node = await running_node(dns)
    port = node.local_uri.effective_port
    target = SipUri.parse("sip:slow.test:5999")
    try:
        with LagMeter() as lag:
            sender.send_list(port, f"sip:127.0.0.1:{sender.port};status=active")
            sender.send_list(port, f"{target};status=active")
            first = await asyncio.wait_for(sender.responses.get(), SLOW)
            second = await asyncio.wait_for(sender.responses.get(), SLOW)
            # Both lists were answered while the DNS server still held its answer.
            assert (first.code, second.code) == (200, 200)
            assert ("slow.test", "A") in dns.queries
            assert dns.answered == 0
            held = node.node.nodes.find(target)
            assert held is not None and held.key[0] == "slow.test"
            # A third list is answered at once too, lookup or not.
            sender.send_list(port, f"sip:127.0.0.1:{sender.port};status=active")
            assert (await asyncio.wait_for(sender.responses.get(), SLOW)).code == 200
            assert dns.answered == 0
            await wait_for(lambda: node.node.nodes.find(target).key[0] == "127.0.0.1", 2 * SLOW)  # type: ignore[union-attr]
        # The loop ran all along: it never stalled for anything like the DNS wait.
        assert lag.ticks > 50
        assert lag.worst < SLOW / 2
        assert node.resolver("slow.test") == "127.0.0.1"
    finally:
        await node.stop(grace=0.1)


async def test_a_look_up_that_times_out_is_remembered_and_not_repeated(
    start_dns: StartDns, sender: Sender
) -> None:
    dns = await start_dns(delay=SLOW)
    node = await running_node(dns, dns_timeout=0.2, dns_negative_ttl=60.0)
    port = node.local_uri.effective_port
    try:
        sender.send_list(port, "sip:slow.test:5999;status=active")
        assert (await asyncio.wait_for(sender.responses.get(), SLOW)).code == 200
        await wait_for(lambda: "slow.test" in node.resolver.failed, SLOW)
        asked = len(dns.queries)
        sender.send_list(port, "sip:slow.test:5999;status=disabled")
        sender.send_list(port, "sip:slow.test:5998;status=active")
        for _ in range(2):
            assert (await asyncio.wait_for(sender.responses.get(), SLOW)).code == 200
        assert len(dns.queries) == asked, "the negative cache spares the DNS server"
        held = node.node.nodes.find(SipUri.parse("sip:slow.test:5998"))
        assert held is not None and held.key[0] == "slow.test"
    finally:
        await node.stop(grace=0.1)


async def test_a_name_that_cannot_be_a_dns_name_does_not_break_the_node(
    sender: Sender,
) -> None:
    # A 64-character label is refused by IDNA before any query is sent.
    bad = "x" * 64 + ".invalid"
    node = await running_node(None)
    port = node.local_uri.effective_port
    try:
        sender.send_list(port, f"sip:{bad}:5999;status=active")
        assert (await asyncio.wait_for(sender.responses.get(), SLOW)).code == 200
        await wait_for(lambda: bad in node.resolver.failed, SLOW)
        with pytest.raises(DnsResolutionError):
            await node.resolve_node(SipUri.parse(f"sip:{bad}:5999"))
        sender.send_list(port, f"sip:127.0.0.1:{sender.port};status=active")
        assert (await asyncio.wait_for(sender.responses.get(), SLOW)).code == 200
    finally:
        await node.stop(grace=0.1)


async def test_resolve_node_returns_the_address_and_tells_the_core(
    start_dns: StartDns,
) -> None:
    dns = await start_dns()
    node = await running_node(dns)
    try:
        assert await node.resolve_node(SipUri.parse("sip:10.0.0.7:5060")) == "10.0.0.7"
        assert dns.queries == []
        uri = SipUri.parse("sip:fast.test:5999")
        assert await node.resolve_node(uri) == "127.0.0.1"
        assert node.node.nodes.key_of(uri) == ("127.0.0.1", 5999, "udp")
        with pytest.raises(DnsResolutionError, match=r"nowhere\.test"):
            await node.resolve_node(SipUri.parse("sip:nowhere.test:5060"))
    finally:
        await node.stop(grace=0.1)


async def test_resolve_node_gives_up_after_the_dns_timeout(start_dns: StartDns) -> None:
    dns = await start_dns(delay=SLOW)
    node = await running_node(dns, dns_timeout=0.2)
    try:
        with pytest.raises(DnsResolutionError, match=r"slow\.test"):
            await node.resolve_node(SipUri.parse("sip:slow.test:5060"))
    finally:
        await node.stop(grace=0.1)
