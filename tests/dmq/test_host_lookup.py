"""Host names in the sans-IO core: asked for as events, answered by host_resolved.

The core never resolves a name itself. Its resolver answers from memory (``None``:
unknown yet); the node then holds the node by name, emits HostLookupNeeded once, and
identifies it by address when the driver calls host_resolved.
"""

from __future__ import annotations

import ipaddress

from app.dmq.config import NodeConfig
from app.dmq.events import HostLookupNeeded, NodeStatusChanged
from app.dmq.node import DmqNode
from app.dmq.sip import SipUri
from app.dmq.transaction import Endpoint

SOURCE = Endpoint("udp", "127.0.0.1", 5090)


def memory_resolver(host: str) -> str | None:
    """Addresses are themselves; names are unknown until the node is told."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def make_node(address: str = "sip:127.0.0.1:5091") -> DmqNode:
    return DmqNode(NodeConfig(server_address=SipUri.parse(address)), resolver=memory_resolver)


def node_list(*lines: str, branch: str = "z9hG4bKlist") -> bytes:
    body = "".join(f"{line}\r\n" for line in lines).encode()
    return (
        "KDMQ sip:notification_peer@127.0.0.1:5091 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5090;branch={branch}\r\n"
        "From: <sip:notification_peer@127.0.0.1:5090>;tag=f1\r\n"
        "To: <sip:notification_peer@127.0.0.1:5091>\r\n"
        f"Call-ID: {branch}@127.0.0.1\r\n"
        "CSeq: 10 KDMQ\r\n"
        "Max-Forwards: 1\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def events(node: DmqNode) -> list[object]:
    return list(iter(node.next_event, None))


def test_a_name_in_a_node_list_is_asked_for_once_and_held_by_name() -> None:
    node = make_node()
    node.receive(node_list("sip:db.test:5092;status=active"), SOURCE, 0.0)
    node.receive(node_list("sip:DB.test:5092;status=active", branch="z9hG4bK2"), SOURCE, 1.0)
    lookups = [e for e in events(node) if isinstance(e, HostLookupNeeded)]
    assert lookups == [HostLookupNeeded("db.test")]
    held = node.nodes.find(SipUri.parse("sip:db.test:5092"))
    assert held is not None and held.key == ("db.test", 5092, "udp")


def test_host_resolved_identifies_the_node_by_address() -> None:
    node = make_node()
    node.receive(node_list("sip:db.test:5092;status=active"), SOURCE, 0.0)
    events(node)
    node.datagrams_to_send()  # the 200 to the list
    node.host_resolved("db.test", "127.0.0.2", 1.0)
    held = node.nodes.find(SipUri.parse("sip:db.test:5092"))
    assert held is not None and held.key == ("127.0.0.2", 5092, "udp")
    assert node.nodes.find(SipUri.parse("sip:127.0.0.2:5092")) is held
    assert str(held.uri) == "sip:db.test:5092"  # announced as it was learned
    # Requests now go to the address.
    node.send("htable", b"x", None, held.uri, 1.0)
    [(_, destination)] = node.datagrams_to_send()
    assert destination == Endpoint("udp", "127.0.0.2", 5092)


def test_a_name_that_turns_out_to_be_a_known_node_is_dropped_as_a_duplicate() -> None:
    node = make_node()
    node.receive(
        node_list("sip:127.0.0.1:5090;status=active", "sip:peer.test:5090;status=active"),
        SOURCE,
        0.0,
    )
    events(node)
    assert len(node.nodes.others()) == 2
    node.host_resolved("peer.test", "127.0.0.1", 1.0)
    [kept] = node.nodes.others()
    assert str(kept.uri) == "sip:127.0.0.1:5090"
    [removed] = [e for e in events(node) if isinstance(e, NodeStatusChanged)]
    assert (str(removed.node), removed.new, removed.reason) == (
        "sip:peer.test:5090",
        None,
        "the same node as sip:127.0.0.1:5090",
    )


def test_a_node_named_like_us_is_found_to_be_us() -> None:
    node = make_node("sip:me.test:5091")
    assert [e for e in events(node) if isinstance(e, HostLookupNeeded)] == [
        HostLookupNeeded("me.test")
    ]
    # Another node lists us by address before our own name is resolved.
    node.receive(node_list("sip:127.0.0.1:5091;status=active"), SOURCE, 0.0)
    assert len(node.nodes.others()) == 1
    node.host_resolved("me.test", "127.0.0.1", 1.0)
    assert node.nodes.others() == []
    assert node.nodes.local.key == ("127.0.0.1", 5091, "udp")
    assert str(node.nodes.local.uri) == "sip:me.test:5091"


def test_a_failed_look_up_keeps_the_name_and_is_asked_again_later() -> None:
    node = make_node()
    node.receive(node_list("sip:gone.test:5092;status=active"), SOURCE, 0.0)
    assert [e for e in events(node) if isinstance(e, HostLookupNeeded)] != []
    node.host_resolved("gone.test", None, 1.0)
    held = node.nodes.find(SipUri.parse("sip:gone.test:5092"))
    assert held is not None and held.key == ("gone.test", 5092, "udp")
    node.receive(node_list("sip:gone.test:5092;status=active", branch="z9hG4bK2"), SOURCE, 2.0)
    assert [e for e in events(node) if isinstance(e, HostLookupNeeded)] == [
        HostLookupNeeded("gone.test")
    ]
