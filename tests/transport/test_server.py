"""The asyncio driver in-process: two real DmqServers on loopback sockets.

What is checked here is the driver's own contract: deferred replies go through
``DmqServer.reply`` and time out in the core only, every event but SendCompleted reaches
``event_listeners``, and stop() fails the broadcasts and sends still waiting at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from app.dmq.config import NodeConfig
from app.dmq.errors import (
    ConfigError,
    NodeStoppedError,
    ReplyNotPendingError,
    UnknownPeerError,
)
from app.dmq.events import Event, NodeStatusChanged, PeerReplyTimedOut
from app.dmq.peers import PeerMessage, PeerReply
from app.dmq.sip import SipUri
from app.dmq.transaction import TimerSettings
from app.transport.server import DmqServer
from harness.ports import free_port
from tests.transport.dns_server import DnsTestServer

TIMERS = TimerSettings(t1=0.05, t2=0.2, timer_f=1.0)


def config(port: int, notify: int | None = None) -> NodeConfig:
    return NodeConfig(
        server_address=SipUri.parse(f"sip:127.0.0.1:{port}"),
        notification_addresses=(SipUri.parse(f"sip:127.0.0.1:{notify}"),) if notify else (),
        timers=TIMERS,
    )


@pytest.fixture
async def pair() -> AsyncIterator[tuple[DmqServer, DmqServer]]:
    """A and B, B joined through A, both active for each other."""
    port_a, port_b = free_port(), free_port()
    a, b = DmqServer(config(port_a)), DmqServer(config(port_b, port_a))
    await a.start()
    await b.start()
    try:
        for _ in range(200):
            if a.node.nodes.active_others() and b.node.nodes.active_others():
                break
            await asyncio.sleep(0.01)
        assert a.node.nodes.active_others() and b.node.nodes.active_others()
        yield a, b
    finally:
        await b.stop(grace=0.2)
        await a.stop(grace=0.2)


async def test_a_deferred_reply_goes_through_the_driver(
    pair: tuple[DmqServer, DmqServer],
) -> None:
    a, b = pair
    waiting: asyncio.Queue[PeerMessage] = asyncio.Queue()

    def later(message: PeerMessage) -> PeerReply | None:
        waiting.put_nowait(message)
        return None

    b.register_peer("rpc", later, reply_timeout=0.5)
    _, done = a.send_nowait("rpc", b"question", "text/plain", b.local_uri)
    message = await asyncio.wait_for(waiting.get(), 5)
    assert message.body == b"question"
    b.reply(message.id, PeerReply(202, "Accepted", "text/plain", b"answer"))
    operation = await asyncio.wait_for(done, 5)
    [result] = operation.results
    assert (result.code, result.reason, result.body) == (202, "Accepted", b"answer")
    with pytest.raises(ReplyNotPendingError, match="already answered 202 Accepted"):
        b.reply(message.id, PeerReply())


async def test_no_reply_is_answered_408_by_the_core_and_reported_once(
    pair: tuple[DmqServer, DmqServer],
) -> None:
    a, b = pair
    events: list[Event] = []
    b.event_listeners.append(events.append)
    waiting: asyncio.Queue[PeerMessage] = asyncio.Queue()

    def never(message: PeerMessage) -> PeerReply | None:
        waiting.put_nowait(message)
        return None

    b.register_peer("rpc", never, reply_timeout=0.2)
    operation = await asyncio.wait_for(a.send("rpc", b"?", None, b.local_uri), 5)
    [result] = operation.results
    # B answered 408 itself (an answer, not A's own Timer F).
    assert (result.code, result.timed_out) == (408, False)
    message = waiting.get_nowait()
    assert [e for e in events if isinstance(e, PeerReplyTimedOut)] == [
        PeerReplyTimedOut(message.id, "rpc")
    ]
    assert b.node.stats.reply_timeouts == 1
    with pytest.raises(ReplyNotPendingError, match=r"reply_timeout of 0\.2 s"):
        b.reply(message.id, PeerReply())


async def test_unregister_answers_waiting_messages_404(
    pair: tuple[DmqServer, DmqServer],
) -> None:
    a, b = pair
    waiting: asyncio.Queue[PeerMessage] = asyncio.Queue()

    def later(message: PeerMessage) -> PeerReply | None:
        waiting.put_nowait(message)
        return None

    b.register_peer("rpc", later)
    _, done = a.send_nowait("rpc", b"x", None, b.local_uri)
    await asyncio.wait_for(waiting.get(), 5)
    b.unregister_peer("rpc")
    operation = await asyncio.wait_for(done, 5)
    assert [r.code for r in operation.results] == [404]
    with pytest.raises(UnknownPeerError):
        b.unregister_peer("rpc")


async def test_status_changes_reach_the_event_listeners() -> None:
    port_a, port_b = free_port(), free_port()
    a, b = DmqServer(config(port_a)), DmqServer(config(port_b, port_a))
    seen: list[Event] = []
    a.event_listeners.append(seen.append)
    await a.start()
    await b.start()
    try:
        for _ in range(200):
            if any(isinstance(e, NodeStatusChanged) and e.node.port == port_b for e in seen):
                break
            await asyncio.sleep(0.01)
        assert any(isinstance(e, NodeStatusChanged) and e.node.port == port_b for e in seen)
    finally:
        await b.stop(grace=0.2)
        await a.stop(grace=0.2)


async def test_stop_fails_waiting_sends_at_once_and_refuses_new_ones() -> None:
    server = DmqServer(config(free_port()))
    await server.start()
    # A node nobody listens on: the send would wait for Timer F without the stop.
    silent = SipUri.parse(f"sip:127.0.0.1:{free_port()}")
    server.add_node(silent)
    _, waiter = server.send_nowait("rpc", b"x", None, silent)
    stopping = asyncio.create_task(server.stop(grace=0.1))
    await asyncio.sleep(0)  # stop() runs up to its first await
    assert waiter.done()
    with pytest.raises(NodeStoppedError):
        waiter.result()
    with pytest.raises(NodeStoppedError):
        server.broadcast_nowait("rpc", b"x", None)
    with pytest.raises(NodeStoppedError):
        server.send_nowait("rpc", b"x", None, silent)
    await stopping
    with pytest.raises(NodeStoppedError):
        server.broadcast_nowait("rpc", b"x", None)
    with pytest.raises(NodeStoppedError):
        server.reply(1, PeerReply())


@pytest.mark.parametrize("rate", [-0.1, 1.0, float("nan")])
def test_a_bad_drop_rate_names_its_field(rate: float) -> None:
    with pytest.raises(ConfigError) as caught:
        DmqServer(config(5060), drop_rate=rate)
    assert caught.value.field == "drop_rate"
    assert str(caught.value) == f"drop_rate {rate!r}: must be at least 0 and below 1"


async def test_a_server_address_that_does_not_resolve_names_its_field() -> None:
    async with DnsTestServer({"other.test": {"A": ["127.0.0.1"]}}) as dns_server:
        server = DmqServer(
            NodeConfig(server_address=SipUri.parse("sip:nowhere.test:5060")),
            dns_resolver=dns_server.resolver(),
        )
        with pytest.raises(ConfigError) as caught:
            await server.start()
    assert caught.value.field == "server_address"
    assert str(caught.value) == (
        "server_address 'nowhere.test': "
        "DNS resolution of 'nowhere.test' returned no usable address."
    )


async def test_a_tcp_stream_that_cannot_be_framed_is_closed_and_counted() -> None:
    server = DmqServer(config(free_port()))
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.local_uri.port)
        # A message announced larger than the node accepts on a stream: the stream
        # cannot be resynchronised after it.
        writer.write(b"KDMQ sip:htable@127.0.0.1 SIP/2.0\r\nContent-Length: 2000000\r\n\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the node
        writer.close()
        assert server.stats.stream_errors == 1
        assert server.stats.dropped_datagrams == 0
    finally:
        await server.stop(grace=0.1)
