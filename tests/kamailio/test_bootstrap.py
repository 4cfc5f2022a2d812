"""SyncBootstrap: one node asked at a time, each request sent once, gateways never asked.

Real DmqServers on loopback UDP play the bus; each says what it runs in its User-Agent
and Server headers, as Kamailio and the gateway do. The gateway's SIP timers are fast
(T1 = 50 ms), so a request that the transaction layer retransmitted would reach its
node several times within the bootstrap's answer timeout: it must reach it once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from app.dmq.peers import PeerMessage, PeerReply
from app.dmq.sip import SipUri
from app.gateway.config import GatewayConfig
from app.gateway.service import Gateway
from app.kamailio.bootstrap import MIRROR_REPLY
from app.kamailio.htable import HtableMirror
from app.kamailio.htable_codec import Cell, SyncAnswer, build
from app.kamailio.mirrors import attach_mirrors
from app.transport.server import DmqServer
from tests.gateway.conftest import node_config

SYNC_REQUEST = b'{"action":1}'


class FakeNode:
    """A node of the bus that keeps the htable bodies it receives."""

    def __init__(self, agent: str, answer: str) -> None:
        self.server = DmqServer(dataclasses.replace(node_config(), user_agent=agent))
        self.uri = str(self.server.node.config.server_address)
        self.received: list[bytes] = []
        self.answer = answer

    def handler(self, message: PeerMessage) -> PeerReply | None:
        self.received.append(message.body)
        if self.answer == "silent":
            return None  # never answers: the gateway's request times out
        if self.answer == "mirror":
            return MIRROR_REPLY
        # A Kamailio donor: its sync answer first, then its 200.
        cells = SyncAnswer((Cell("ht", "from-" + self.answer, "v", 0),))
        _, waiter = self.server.send_nowait(
            "htable", build(cells), "application/json", SipUri.parse(gateway_uri)
        )
        waiter.add_done_callback(lambda f: f.exception())
        return PeerReply()


gateway_uri = ""


async def _bootstrap(tmp_path: Path) -> None:
    global gateway_uri
    silent = FakeNode("kamailio (5.6.3 (x86_64/linux))", "silent")
    other_gateway = FakeNode("dmq-gateway/0.1", "donor-gw")
    mirror = FakeNode("sip-thing/1.0", "mirror")
    donor = FakeNode("sip-thing/2.0", "donor")
    nodes = [silent, other_gateway, mirror, donor]
    for node in nodes:
        node.server.register_peer("htable", node.handler, reply_timeout=1.0)
        await node.server.start()
    config = GatewayConfig(
        node=node_config(*(n.uri for n in nodes)),
        state_dir=tmp_path / "state",
        kamailio_mirrors=("htable",),
    )
    gateway_uri = str(config.node.server_address)
    gateway = Gateway(config)
    mirrors = attach_mirrors(gateway, config)
    htable = mirrors.get("htable")
    assert isinstance(htable, HtableMirror)
    htable.bootstrap.answer_timeout = 0.5
    htable.bootstrap.retry_interval = 0.2
    await gateway.start()
    try:
        for _ in range(500):
            if htable.bootstrap.status.state == "synced":
                break
            await asyncio.sleep(0.01)
        status = htable.bootstrap.status
        assert status.state == "synced", status
        # The Kamailio node first; it never answers: it got ONE copy in the 0.5 s the
        # bootstrap waited, where T1 = 50 ms would have retransmitted it 3 times.
        assert status.asked[0] == silent.uri
        assert silent.received == [SYNC_REQUEST]
        # (Our node would deliver a retransmission once too: count the datagrams.)
        assert silent.server.node.transactions.stats.retransmissions_absorbed == 0
        assert status.donor == donor.uri
        assert donor.received == [SYNC_REQUEST]
        # A gateway (by its User-Agent/Server) is never asked; a node that has not
        # said what it runs may be, and a mirror's answer does not count as a donor's.
        assert other_gateway.received == []
        assert status.asked.index(donor.uri) == len(status.asked) - 1
        assert set(status.asked) <= {silent.uri, mirror.uri, donor.uri}
        assert status.requests_sent == len(status.asked)
        assert htable.replica.get("ht", "from-donor", 0) is not None
        # Nothing more is asked later.
        await asyncio.sleep(0.8)
        assert status.requests_sent == len(status.asked)
        assert sum(n.received.count(SYNC_REQUEST) for n in nodes) == status.requests_sent
    finally:
        await gateway.stop()
        for node in nodes:
            await node.server.stop()


def test_one_node_is_asked_at_a_time_and_each_request_is_sent_once(tmp_path: Path) -> None:
    asyncio.run(_bootstrap(tmp_path))


async def _two_gateways(tmp_path: Path) -> None:
    first_config = GatewayConfig(
        node=node_config(), state_dir=tmp_path / "a", kamailio_mirrors=("htable",)
    )
    second_config = GatewayConfig(
        node=node_config(str(first_config.node.server_address)),
        state_dir=tmp_path / "b",
        kamailio_mirrors=("htable",),
    )
    gateways = [Gateway(first_config), Gateway(second_config)]
    mirrors = [
        attach_mirrors(g, c) for g, c in zip(gateways, (first_config, second_config), strict=True)
    ]
    for gateway in gateways:
        await gateway.start()
    try:
        for _ in range(300):
            if all(g.health().active_nodes == 1 for g in gateways):
                break
            await asyncio.sleep(0.01)
        assert all(g.health().active_nodes == 1 for g in gateways)
        await asyncio.sleep(0.5)
        for mirror in mirrors:
            htable = mirror.get("htable")
            assert isinstance(htable, HtableMirror)
            # Each knows the other is a gateway, from its join or its answer.
            assert htable.bootstrap.status.requests_sent == 0
            assert htable.bootstrap.status.state == "waiting"
        agents = [set(g.node_agents().values()) for g in gateways]
        assert agents == [{"dmq-gateway/0.1"}, {"dmq-gateway/0.1"}]
    finally:
        for gateway in gateways:
            await gateway.stop()


def test_gateways_never_ask_each_other_for_a_sync(tmp_path: Path) -> None:
    asyncio.run(_two_gateways(tmp_path))


async def _partition(tmp_path: Path) -> None:
    global gateway_uri
    donor = FakeNode("kamailio (5.6.3 (x86_64/linux))", "before")
    donor.server.register_peer("htable", donor.handler)
    await donor.server.start()
    config = GatewayConfig(
        node=node_config(donor.uri), state_dir=tmp_path / "state", kamailio_mirrors=("htable",)
    )
    gateway_uri = str(config.node.server_address)
    gateway = Gateway(config)
    htable = attach_mirrors(gateway, config).get("htable")
    assert isinstance(htable, HtableMirror)
    htable.bootstrap.retry_interval = 0.2
    await gateway.start()
    back: FakeNode | None = None
    try:
        status = htable.bootstrap.status
        for _ in range(300):
            if status.state == "synced":
                break
            await asyncio.sleep(0.01)
        assert status.state == "synced" and status.resyncs == 0
        await donor.server.stop()  # the only Kamailio node is gone
        for _ in range(1000):
            if not any(n.status == "active" for n in gateway.nodes() if not n.local):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        assert status.requests_sent == 1  # nobody to ask meanwhile
        # It comes back on the same address (the gateway pings it again) and holds
        # what changed meanwhile.
        back = FakeNode("kamailio (5.6.3 (x86_64/linux))", "after")
        back.server = DmqServer(
            dataclasses.replace(
                node_config(gateway_uri),
                server_address=SipUri.parse(donor.uri),
                user_agent="kamailio (5.6.3 (x86_64/linux))",
            )
        )
        back.server.register_peer("htable", back.handler)
        await back.server.start()
        for _ in range(1000):
            if status.resyncs == 1 and status.state == "synced":
                break
            await asyncio.sleep(0.01)
        assert status.resyncs == 1 and status.requests_sent == 2
        await asyncio.sleep(0.1)
        assert htable.replica.get("ht", "from-after", 0) is not None
        assert htable.replica.get("ht", "from-before", 0) is not None  # kept
    finally:
        await gateway.stop()
        if back is not None:
            await back.server.stop()


def test_a_partition_healed_is_synced_again_from_one_node(tmp_path: Path) -> None:
    asyncio.run(_partition(tmp_path))
