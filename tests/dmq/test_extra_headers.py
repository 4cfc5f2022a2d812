"""Extra headers on the KDMQ requests we send, and the origin stamp we read back."""

from __future__ import annotations

import pytest

from app.dmq.errors import DmqUsageError, InvalidHeaderError, MessageTooLargeError
from app.dmq.peers import ORIGIN_HEADER
from app.dmq.sip import SipRequest
from tests.dmq.helpers import Cluster

ORIGIN = "<sip:127.0.0.1:7001>;epoch=5;seq=42"


def two_nodes() -> Cluster:
    cluster = Cluster()
    cluster.add(7001)
    cluster.add(7002, [7001])
    cluster.advance(1)
    return cluster


def sent_requests(cluster: Cluster, since: int, peer_id: str = "htable") -> list[SipRequest]:
    out = []
    for wire in cluster.trace[since:]:
        request = wire.request()
        if request is not None and request.uri.startswith(f"sip:{peer_id}@"):
            out.append(request)
    return out


def test_broadcast_carries_extra_headers_and_the_receiver_reads_the_origin() -> None:
    cluster = two_nodes()
    a, b = cluster.members[7001], cluster.members[7002]
    since = len(cluster.trace)
    a.node.broadcast(
        "htable", b"{}", "application/json", cluster.now, headers=[(ORIGIN_HEADER, ORIGIN)]
    )
    cluster.flush()
    [request] = sent_requests(cluster, since)
    assert request.headers.get("x-dmq-origin") == ORIGIN
    [message] = b.received
    assert message.origin == ORIGIN


def test_send_carries_extra_headers_in_the_order_given() -> None:
    cluster = two_nodes()
    a = cluster.members[7001]
    since = len(cluster.trace)
    a.node.send(
        "htable",
        b"x",
        None,
        cluster.members[7002].node.nodes.local.uri,
        cluster.now,
        headers=[("X-One", "1"), ("X-Two", "two words")],
    )
    cluster.flush()
    [request] = sent_requests(cluster, since)
    names = [name for name, _ in request.headers]
    assert names.index("x-one") < names.index("x-two")
    assert request.headers.get("x-two") == "two words"


def test_a_request_without_origin_is_delivered_with_origin_none() -> None:
    cluster = two_nodes()
    cluster.members[7001].node.broadcast("htable", b"x", None, cluster.now)
    cluster.flush()
    [message] = cluster.members[7002].received
    assert message.origin is None


def test_without_extra_headers_the_request_is_unchanged_on_the_wire() -> None:
    cluster = two_nodes()
    since = len(cluster.trace)
    cluster.members[7001].node.broadcast("htable", b"x", None, cluster.now)
    cluster.flush()
    [request] = sent_requests(cluster, since)
    assert [name for name, _ in request.headers] == [
        "via",
        "to",
        "from",
        "cseq",
        "call-id",
        "max-forwards",
        "user-agent",
        "content-length",
    ]


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (("X Bad", "v"), "must be a SIP token"),
        (("", "v"), "must be a SIP token"),
        (("X-Dmq:", "v"), "must be a SIP token"),
        (("Via", "SIP/2.0/UDP evil"), "written by the DMQ node itself"),
        (("call-id", "x"), "written by the DMQ node itself"),
        (("i", "x"), "written by the DMQ node itself"),
        (("Content-Length", "0"), "written by the DMQ node itself"),
        (("X-A", "one\r\nVia: injected"), "single line"),
        (("X-A", "nul\x00"), "single line"),
    ],
)
def test_bad_extra_headers_are_refused_with_a_sentence_naming_them(
    header: tuple[str, str], words: str
) -> None:
    cluster = two_nodes()
    node = cluster.members[7001].node
    since = len(cluster.trace)
    with pytest.raises(InvalidHeaderError, match=words) as caught:
        node.broadcast("htable", b"x", None, cluster.now, headers=[header])
    assert isinstance(caught.value, DmqUsageError) and not isinstance(caught.value, ValueError)
    assert caught.value.status_hint == 422
    with pytest.raises(InvalidHeaderError):
        node.send(
            "htable", b"x", None, cluster.members[7002].node.nodes.local.uri, 0.0, headers=[header]
        )
    cluster.flush()
    assert sent_requests(cluster, since) == []


def test_extra_headers_count_towards_the_message_size() -> None:
    cluster = two_nodes()
    node = cluster.members[7001].node
    body = b"x" * node.max_body_size
    node.broadcast("htable", body, None, cluster.now)  # fits without headers
    with pytest.raises(MessageTooLargeError, match="extra headers"):
        node.broadcast("htable", body, None, cluster.now, headers=[("X-A", "v")])
