"""A TCP connect whose SYNs go unanswered, then a link that comes back while it waits:
what was queued on it late still reaches the node, on a new connect.

The fault is the kernel's: an nftables table of the test's own, in this namespace,
drops the SYNs (and only the SYNs) sent to one loopback port, so the connect to that
port waits for the kernel's next SYN retransmission (1 s, then 3 s after the first).
The rule goes away while the connect still waits; the connect itself times out at
Timer F. A request queued a moment before that has most of its own Timer F ahead: it
must not be failed with the connect (after a partition heals, that is how a ping
queued behind a stale connect disabled a node that was talking to us again).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace

import pytest

from app.dmq.config import NodeConfig
from app.dmq.nodes import NodeStatus
from app.dmq.peers import PeerMessage, PeerReply
from app.dmq.sip import SipUri
from app.dmq.transaction import TimerSettings
from app.transport.server import DmqServer
from harness.ports import free_port

pytestmark = pytest.mark.usefixtures("lab_required")

#: Timer F 2 s: the connect's bound, between the kernel's SYN retransmissions at 1 s
#: and 3 s, so the connect cannot succeed on its own once the rule is gone.
TIMERS = TimerSettings(t1=0.05, t2=0.2, timer_f=2.0)


def config(port: int, notify: int | None = None) -> NodeConfig:
    return NodeConfig(
        server_address=SipUri.parse(f"sip:127.0.0.1:{port};transport=tcp"),
        notification_addresses=(
            (SipUri.parse(f"sip:127.0.0.1:{notify};transport=tcp"),) if notify else ()
        ),
        timers=TIMERS,
        ping_interval=30.0,  # no ping of the test's interval but its own sends
    )


@contextlib.contextmanager
def syns_dropped(port: int) -> Iterator[None]:
    """Drop every TCP SYN sent to 127.0.0.1:``port`` while the block runs."""
    table = f"dmq_test_syn_{os.getpid()}_{port}"
    script = (
        f"table inet {table} {{\n"
        "  chain out {\n"
        "    type filter hook output priority 0; policy accept;\n"
        f"    ip daddr 127.0.0.1 tcp dport {port} tcp flags & (syn | ack) == syn drop\n"
        "  }\n"
        "}\n"
    )
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=True)


async def test_a_request_queued_late_on_a_connect_that_times_out_goes_on_a_new_one() -> None:
    port_a, port_b = free_port(), free_port()
    a = DmqServer(config(port_a))
    b = DmqServer(config(port_b, port_a))
    got: list[PeerMessage] = []

    def handle(message: PeerMessage) -> PeerReply:
        got.append(message)
        return PeerReply()

    b.register_peer("htable", handle)
    loop = asyncio.get_running_loop()
    await a.start()
    try:
        with syns_dropped(port_b):
            # B joins through A over B's own connection (SYNs to A pass); A, learning
            # of B, tells it the news: that opens A's connect to B, whose SYN is lost.
            await b.start()
            for _ in range(500):
                if a.node.nodes.active_others():
                    break
                await asyncio.sleep(0.01)
            [node_b] = a.node.nodes.active_others()
            connect_began = loop.time()
            assert node_b.status is NodeStatus.ACTIVE
            await asyncio.sleep(1.2)
            # Queued on the connect that waits, 0.8 s before it times out.
            _, answered = a.send_once_nowait("htable", b"late", "text/plain", node_b.uri)
            await asyncio.sleep(0.4)
            assert not answered.done(), "the send did not wait on the stuck connect"
            assert loop.time() - connect_began < TIMERS.timer_f_value - 0.2
        # The link is back; the connect waits for a SYN retransmission due at 3 s.
        operation = await asyncio.wait_for(answered, 10)
        [result] = operation.results
        assert (result.code, [m.body for m in got]) == (200, [b"late"]), result
        assert a.stats.tcp_connect_requests_carried >= 1
        assert a.node.nodes.find(node_b.uri) is not None
        assert a.node.nodes.find(node_b.uri).status is NodeStatus.ACTIVE  # type: ignore[union-attr]
    finally:
        await b.stop(grace=0.2)
        await a.stop(grace=0.2)


#: Timer F 8 s: long enough that without a new start the connect would wait for the
#: kernel's SYN retransmission at 3 s, and succeed then.
PATIENT = TimerSettings(t1=0.05, t2=0.2, timer_f=8.0)


async def test_a_sign_of_life_from_the_host_starts_a_stuck_connect_over() -> None:
    """The link comes back while the connect waits for the kernel's next SYN (3 s
    after it began); the host then sends us something: a new connect goes at once and
    takes the queued request, long before that SYN."""
    port_a, port_b = free_port(), free_port()
    a = DmqServer(replace(config(port_a), timers=PATIENT))
    b = DmqServer(replace(config(port_b, port_a), timers=PATIENT))
    got: list[PeerMessage] = []

    def handle(message: PeerMessage) -> PeerReply:
        got.append(message)
        return PeerReply()

    b.register_peer("htable", handle)
    a.register_peer("htable", lambda message: PeerReply())
    loop = asyncio.get_running_loop()
    await a.start()
    try:
        with syns_dropped(port_b):
            await b.start()
            for _ in range(500):
                if a.node.nodes.active_others():
                    break
                await asyncio.sleep(0.01)
            [node_b] = a.node.nodes.active_others()
            connect_began = loop.time()
            # Past the first SYN retransmission (1 s): the next is due at 3 s.
            await asyncio.sleep(1.2)
            _, answered = a.send_once_nowait("htable", b"queued", "text/plain", node_b.uri)
            await asyncio.sleep(0.2)
            assert not answered.done(), "the send did not wait on the stuck connect"
        assert a.stats.tcp_connects_revived == 0
        # The link is back. B speaks to A over the connection B opened: a sign of life.
        [node_a] = b.node.nodes.active_others()
        spoke = await b.send("htable", b"hello", "text/plain", node_a.uri)
        assert [r.code for r in spoke.results] == [200]
        operation = await asyncio.wait_for(answered, 10)
        delivered_after = loop.time() - connect_began
        [result] = operation.results
        assert (result.code, [m.body for m in got]) == (200, [b"queued"]), result
        assert a.stats.tcp_connects_revived == 1
        # Before the kernel's own retransmission would have connected.
        assert delivered_after < 2.8, delivered_after
    finally:
        await b.stop(grace=0.2)
        await a.stop(grace=0.2)
