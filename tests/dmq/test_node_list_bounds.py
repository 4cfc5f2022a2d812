"""Bounded under abuse: a neighbour's lists cannot grow the node list, the messages we
send or the counters without bound (fake clock, one core, requests built by hand)."""

from __future__ import annotations

import logging

import pytest

from app.dmq.config import NodeConfig
from app.dmq.errors import ConfigError, NodeListFullError
from app.dmq.events import HostLookupNeeded
from app.dmq.node import DmqNode
from app.dmq.nodes import Resolver, literal_resolver
from app.dmq.sip import SipRequest, SipUri, parse_message
from app.dmq.transaction import Endpoint

NODE = SipUri.parse("sip:127.0.0.1:5091")
SOURCE = Endpoint("udp", "127.0.0.1", 5090)
_branches = iter(range(1_000_000))


def notification(
    body: bytes, *, max_forwards: int = 2, peer_id: str = "notification_peer"
) -> bytes:
    branch = f"z9hG4bKabuse{next(_branches)}"
    target = f"sip:{peer_id}@127.0.0.1:5091"
    lines = [
        f"KDMQ {target} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:5090;branch={branch}",
        "From: <sip:notification_peer@127.0.0.1:5090>;tag=x",
        f"To: <{target}>",
        f"Call-ID: {branch}",
        "CSeq: 10 KDMQ",
        f"Max-Forwards: {max_forwards}",
        "Content-Type: text/plain",
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def made_up(start: int, count: int, host: str = "192.0.2.{}") -> bytes:
    lines = ["sip:127.0.0.1:5090;status=active"]
    lines += [
        f"sip:{host.format(i % 250 + 1)}:{6000 + i};status=active"
        for i in range(start, start + count)
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


def node_with(resolver: Resolver = literal_resolver, **config: object) -> DmqNode:
    node = DmqNode(NodeConfig(server_address=NODE, **config), resolver=resolver)  # type: ignore[arg-type]
    node.start(0.0)
    return node


def requests_sent(node: DmqNode) -> list[SipRequest]:
    out = []
    for data, _ in node.datagrams_to_send():
        message = parse_message(data)
        if isinstance(message, SipRequest):
            out.append(message)
    return out


def test_one_list_adds_at_most_max_new_nodes_per_list() -> None:
    node = node_with(max_new_nodes_per_list=8)
    node.receive(notification(made_up(0, 50)), SOURCE, 1.0)
    assert len(node.nodes.others()) == 1 + 8  # the sender, and 8 of the 50
    assert node.stats.nodes_refused == {"max_new_nodes_per_list": 42}


def test_new_nodes_per_second_are_bounded_across_lists() -> None:
    node = node_with(max_new_nodes_per_list=8, max_new_nodes_per_second=2.0)
    for i in range(40):  # 40 lists of 50 made-up nodes, all at once
        node.receive(notification(made_up(50 * i, 50)), SOURCE, 1.0)
    assert len(node.nodes.others()) == 1 + 8  # one burst
    node.receive(notification(made_up(5000, 50)), SOURCE, 3.0)  # 2 s: 4 more
    assert len(node.nodes.others()) == 1 + 8 + 4
    assert node.stats.nodes_refused["max_new_nodes_per_second"] > 0


def test_the_node_list_never_holds_more_than_max_nodes() -> None:
    node = node_with(max_nodes=20, max_new_nodes_per_list=50, max_new_nodes_per_second=1000.0)
    for i in range(40):
        node.receive(notification(made_up(50 * i, 50)), SOURCE, 1.0 + i)
    assert len(node.nodes.others()) == 20
    assert node.stats.nodes_refused["max_nodes"] > 0
    with pytest.raises(NodeListFullError, match="max_nodes \\(20\\)") as caught:
        node.add_node(SipUri.parse("sip:127.0.0.1:7777"), 50.0)
    assert caught.value.status_hint == 507


def test_what_a_flood_makes_us_send_is_bounded() -> None:
    """Each list that changes ours is passed on to every active node: with the bounds,
    40 lists of 50 made-up nodes make a bounded number of requests, not 40 x 2 000."""
    node = node_with(max_nodes=64, max_new_nodes_per_list=16, max_new_nodes_per_second=16.0)
    node.datagrams_to_send()
    sent = 0
    for i in range(40):
        node.receive(notification(made_up(50 * i, 50)), SOURCE, 1.0 + i / 40)
        sent += len(requests_sent(node))
    held = len(node.nodes.others())
    assert held <= 1 + 16 + 16  # one burst and a second's worth
    assert sent <= 40 * held


def test_a_refused_name_is_not_looked_up() -> None:
    # A resolver that knows addresses only: every name has to be looked up.
    node = node_with(
        lambda host: literal_resolver(host) if host[0].isdigit() else None, max_new_nodes_per_list=2
    )
    node.receive(notification(made_up(0, 10, host="host{}.example")), SOURCE, 1.0)
    lookups = [e for e in iter(node.next_event, None) if isinstance(e, HostLookupNeeded)]
    assert len(lookups) == 2


def test_refusals_are_logged_at_most_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    node = node_with(max_new_nodes_per_list=1)
    with caplog.at_level(logging.WARNING, logger="dmq.node"):
        for i in range(30):
            node.receive(notification(made_up(10 * i, 10)), SOURCE, 1.0 + i)
        node.receive(notification(made_up(900, 10)), SOURCE, 62.0)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 2
    assert refusals[0].startswith("1 nodes named in node lists refused")
    assert "max_new_nodes_per_second" in refusals[1] or "max_new_nodes_per_list" in refusals[1]


def test_unknown_peer_ids_share_one_counter() -> None:
    node = node_with()
    for i in range(2000):
        node.receive(notification(b"x", peer_id=f"made-up-{i}"), SOURCE, 1.0)
    assert node.stats.received == {("(unknown)", 404): 2000}


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("max_nodes", 0, "max_nodes 0: must be a whole number, at least 1"),
        ("max_new_nodes_per_list", 0, "max_new_nodes_per_list 0: must be a whole number"),
        ("max_new_nodes_per_second", 0.0, "max_new_nodes_per_second 0.0: must be a positive"),
        ("outbox_max_messages", -1, "outbox_max_messages -1: must be a whole number, 0 or more"),
        ("outbox_max_bytes", -1, "outbox_max_bytes -1: must be a whole number, 0 or more"),
        ("outbox_max_age", 0.0, "outbox_max_age 0.0: must be a positive, finite number"),
        ("outbox_window", 0, "outbox_window 0: must be a whole number, at least 1"),
    ],
)
def test_bad_bounds_are_refused_with_a_sentence(field: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        NodeConfig(server_address=NODE, **{field: value})  # type: ignore[arg-type]
    assert str(caught.value) == words or str(caught.value).startswith(words)
