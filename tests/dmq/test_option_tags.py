"""SIP option tags (``Supported``): what the embedding service understands beyond plain
KDMQ, said on every request and answer, and what each other node said of itself.

A node without option tags sends no ``Supported`` header (byte for byte what it sent
before, and what Kamailio sends); a gateway's node lists ``dmq-bundle``, and only a
node that said so is ever sent bundles."""

from __future__ import annotations

import pytest

from app.dmq.config import NodeConfig
from app.dmq.errors import ConfigError
from app.dmq.node import DmqNode
from app.dmq.sip import SipRequest, SipUri, parse_message
from tests.dmq.test_node import NODE, SOURCE, make_node, one_answer, request

OTHER = SipUri.parse("sip:127.0.0.1:5090")


def sent_request(node: DmqNode) -> SipRequest:
    [(data, _)] = node.datagrams_to_send()
    message = parse_message(data)
    assert isinstance(message, SipRequest)
    return message


@pytest.mark.parametrize(
    ("tags", "header"), [((), None), (("dmq-bundle",), "dmq-bundle"), (("a", "b"), "a, b")]
)
def test_requests_and_answers_carry_the_option_tags(
    tags: tuple[str, ...], header: str | None
) -> None:
    node, _ = make_node(notification_addresses=(OTHER,), option_tags=tags)
    node.start(0.0)
    assert sent_request(node).headers.get("supported") == header
    answer = one_answer(node, request(branch="z9hG4bKtags"))
    assert answer.headers.get("supported") == header
    # A request with two Via headers is answered by the other path: the same header.
    two_vias = request(
        branch="z9hG4bKtwo",
        replace={
            "Via": "SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bKtwo\r\nVia: SIP/2.0/UDP 10.0.0.9"
        },
    )
    assert one_answer(node, two_vias).headers.get("supported") == header


def test_a_nodes_tags_are_kept_from_its_requests_and_its_answers() -> None:
    node, _ = make_node(notification_addresses=(OTHER,))
    node.start(0.0)
    join = sent_request(node)
    other = node.nodes.find(OTHER)
    assert other is not None and other.option_tags == frozenset()
    # A request of its own, without the header: nothing learnt.
    one_answer(node, request(branch="z9hG4bKplain"))
    assert other.option_tags == frozenset()
    # Its answer to our join says what it reads.
    via = join.headers.get("via") or ""
    answer = (
        f"SIP/2.0 200 OK\r\nVia: {via}\r\nFrom: {join.headers.get('from')}\r\n"
        f"To: {join.headers.get('to')};tag=x\r\nCall-ID: {join.headers.get('call-id')}\r\n"
        "CSeq: 10 KDMQ\r\nSupported: dmq-bundle, Other\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    node.receive(answer, SOURCE, 0.1)
    assert other.option_tags == frozenset({"dmq-bundle", "other"})
    # ... and a later request says what it reads now: another program may have taken
    # the address over, so what it no longer says is forgotten ...
    one_answer(node, request(branch="z9hG4bKmore", replace={"Supported": "more"}))
    assert other.option_tags == frozenset({"more"})
    # ... down to nothing, for a message without the header (a Kamailio node).
    one_answer(node, request(branch="z9hG4bKnone", replace={"Supported": None}))
    assert other.option_tags == frozenset()


def test_a_broadcast_can_be_narrowed_to_the_nodes_that_read_a_tag() -> None:
    node, _ = make_node(notification_addresses=(OTHER,))
    node.start(0.0)
    node.datagrams_to_send()
    other = node.nodes.find(OTHER)
    assert other is not None
    none = node.broadcast("htable", b"x", None, 0.0, only=lambda n: "t" in n.option_tags)
    assert none.targets == () and node.datagrams_to_send() == []
    other.note_supported("t")
    some = node.broadcast("htable", b"x", None, 0.0, only=lambda n: "t" in n.option_tags)
    assert some.targets == (other.uri,)
    assert isinstance(parse_message(node.datagrams_to_send()[0][0]), SipRequest)


def test_an_option_tag_must_be_a_sip_token() -> None:
    with pytest.raises(ConfigError, match="option_tags"):
        NodeConfig(server_address=NODE, option_tags=("bad tag",))
