"""One DmqNode in isolation: bytes in, bytes and events out, no other node."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.dmq.config import NodeConfig
from app.dmq.errors import (
    InvalidHeaderError,
    InvalidPeerIdError,
    MessageTooLargeError,
    ReservedPeerError,
    UnknownNodeError,
)
from app.dmq.events import NodeStatusChanged
from app.dmq.node import CACHE_SIZE, DmqNode
from app.dmq.nodes import NodeStatus, parse_node_list
from app.dmq.peers import PeerMessage, PeerReply
from app.dmq.sip import NameAddr, SipRequest, SipResponse, SipUri, Via, parse_message
from app.dmq.transaction import Endpoint
from tests.dmq.helpers import VECTOR_FILES, VECTORS, Cluster, mutated

NODE = SipUri.parse("sip:127.0.0.1:5091")
SOURCE = Endpoint("udp", "127.0.0.1", 5090)
#: Where responses to requests from SOURCE with ``Via: ...127.0.0.1:5090`` go.
REPLY_TO = Endpoint("udp", "127.0.0.1", 5090)


class Recorder:
    def __init__(self, reply: PeerReply | None = None) -> None:
        self.messages: list[PeerMessage] = []
        self.reply = reply or PeerReply()

    def __call__(self, message: PeerMessage) -> PeerReply:
        self.messages.append(message)
        return self.reply


def make_node(uri: SipUri = NODE, **config: object) -> tuple[DmqNode, Recorder]:
    node = DmqNode(NodeConfig(server_address=uri, **config))  # type: ignore[arg-type]
    recorder = Recorder()
    node.register_peer("htable", recorder)
    return node, recorder


def request(
    peer_id: str | None = "htable",
    *,
    method: str = "KDMQ",
    body: bytes = b"hello",
    branch: str = "z9hG4bKt1",
    replace: dict[str, str | None] | None = None,
    uri: str | None = None,
    content_length: bool = True,
) -> bytes:
    """A request from 127.0.0.1:5090 to NODE; ``replace`` changes (or, with None,
    removes) a header by its name as written."""
    target = uri or (f"sip:{peer_id}@127.0.0.1:5091" if peer_id else "sip:127.0.0.1:5091")
    headers: dict[str, str | None] = {
        "Via": f"SIP/2.0/UDP 127.0.0.1:5090;branch={branch}",
        "From": f"<sip:{peer_id or 'x'}@127.0.0.1:5090>;tag=f1",
        "To": f"<{target}>",
        "Call-ID": f"{branch}@127.0.0.1",
        "CSeq": f"10 {method}",
        "Max-Forwards": "1",
        "Content-Type": "text/plain",
    }
    headers.update(replace or {})
    lines = [f"{method} {target} SIP/2.0"]
    lines += [f"{name}: {value}" for name, value in headers.items() if value is not None]
    if content_length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def answers(node: DmqNode) -> list[tuple[SipResponse, Endpoint]]:
    out = []
    for data, to in node.datagrams_to_send():
        message = parse_message(data)
        assert isinstance(message, SipResponse)
        out.append((message, to))
    return out


def one_answer(node: DmqNode, data: bytes, source: Endpoint = SOURCE) -> SipResponse:
    node.receive(data, source, 0.0)
    sent = answers(node)
    assert len(sent) == 1, f"expected one response, got {sent}"
    response, to = sent[0]
    assert to == REPLY_TO
    return response


# --------------------------------------------------------------------------- routing


def test_unknown_peer_id_is_answered_404_user_not_found() -> None:
    node, recorder = make_node()
    response = one_answer(node, request("nosuchpeer"))
    assert (response.code, response.reason) == (404, "User Not Found")
    assert recorder.messages == []
    # One series for every unknown peer id: the ids are the sender's choice.
    assert node.stats.received == {("(unknown)", 404): 1}


def test_request_uri_without_user_part_is_answered_404() -> None:
    node, recorder = make_node()
    response = one_answer(node, request(None))
    assert response.code == 404
    assert recorder.messages == []


def test_untrusted_source_is_answered_403_and_never_reaches_the_peer() -> None:
    node, recorder = make_node()
    node.receive(request(), Endpoint("udp", "192.0.2.1", 5090), 0.0)
    [(response, to)] = answers(node)
    assert (response.code, response.reason) == (403, "Forbidden")
    assert to == Endpoint("udp", "192.0.2.1", 5090)
    node.receive(
        request("notification_peer", body=b"sip:192.0.2.1:5090;status=active\r\n"),
        Endpoint("udp", "192.0.2.1", 5090),
        0.0,
    )
    assert [r.code for r, _ in answers(node)] == [403]
    assert recorder.messages == []
    assert node.nodes.others() == [], "an untrusted node can't join"
    assert node.stats.forbidden == 2


def test_trusted_networks_are_configurable() -> None:
    node, recorder = make_node(trusted=(ipaddress.ip_network("192.0.2.0/24"),))
    node.receive(request(), Endpoint("udp", "192.0.2.1", 5090), 0.0)
    assert [r.code for r, _ in answers(node)] == [200]
    node.receive(request(branch="z9hG4bKt2"), SOURCE, 0.0)
    assert [r.code for r, _ in answers(node)] == [403], "loopback is no longer trusted"
    assert len(recorder.messages) == 1


def test_ipv4_mapped_ipv6_loopback_is_trusted() -> None:
    node, recorder = make_node()
    node.receive(request(), Endpoint("udp", "::ffff:127.0.0.1", 5090), 0.0)
    assert [r.code for r, _ in answers(node)] == [200]
    assert len(recorder.messages) == 1


def test_notification_channel_cannot_be_registered_as_a_peer() -> None:
    node, _ = make_node()
    with pytest.raises(ReservedPeerError):
        node.register_peer("notification_peer", Recorder())
    custom, _ = make_node(notification_channel="membership")
    with pytest.raises(ReservedPeerError):
        custom.register_peer("membership", Recorder())
    custom.register_peer("notification_peer", Recorder())  # an ordinary name there


@pytest.mark.parametrize("peer_id", ["", "has space", "a@b", "x" * 129])
def test_invalid_peer_id_cannot_be_registered(peer_id: str) -> None:
    node, _ = make_node()
    with pytest.raises(InvalidPeerIdError, match="must be 1-128 letters"):
        node.register_peer(peer_id, Recorder())


def test_options_is_answered_200() -> None:
    node, recorder = make_node()
    response = one_answer(node, request(method="OPTIONS", body=b""))
    assert (response.code, response.reason) == (200, "OK")
    assert recorder.messages == []


@pytest.mark.parametrize("method", ["INFO", "MESSAGE", "REGISTER", "NOTIFY"])
def test_other_methods_are_answered_405_with_allow(method: str) -> None:
    node, recorder = make_node()
    response = one_answer(node, request(method=method))
    assert (response.code, response.reason) == (405, "Method Not Allowed")
    assert response.headers.get("allow") == "KDMQ, OPTIONS"
    assert recorder.messages == []


def test_ack_is_never_answered() -> None:
    node, recorder = make_node()
    node.receive(request(method="ACK", body=b""), SOURCE, 0.0)
    assert node.datagrams_to_send() == []
    assert recorder.messages == []


# --------------------------------------------------------------------------- replies


def test_custom_channel_reply_is_an_empty_200_by_default() -> None:
    node, recorder = make_node()
    response = one_answer(node, request())
    assert (response.code, response.reason, response.body) == (200, "OK", b"")
    assert "content-type" not in response.headers
    assert response.headers.get("content-length") == "0"
    [message] = recorder.messages
    assert (message.peer_id, message.body, message.content_type) == (
        "htable",
        b"hello",
        "text/plain",
    )
    assert message.sender == SipUri.parse("sip:127.0.0.1:5090")
    assert message.max_forwards == 1


def test_delivered_message_carries_every_field_by_name() -> None:
    """The node builds PeerMessage from its fields in order (not by keyword, for
    speed): each field must still hold what its name says."""
    node, recorder = make_node()
    origin = "node-a 7 42"
    node.receive(request(branch="z9hG4bKall", replace={"X-DMQ-Origin": origin}), SOURCE, 12.5)
    node.receive(request(branch="z9hG4bKnext", replace={"Content-Type": None}), SOURCE, 13.0)
    first, second = recorder.messages
    assert type(first) is PeerMessage
    assert first == PeerMessage(
        id=first.id,
        peer_id="htable",
        body=b"hello",
        content_type="text/plain",
        sender=SipUri.parse("sip:127.0.0.1:5090"),
        call_id="z9hG4bKall@127.0.0.1",
        received_at=12.5,
        max_forwards=1,
        origin=origin,
    )
    assert isinstance(first.id, int) and second.id == first.id + 1
    assert (second.content_type, second.origin, second.received_at) == (None, None, 13.0)


def test_peer_reply_body_is_sent_with_its_content_type() -> None:
    node, recorder = make_node()
    recorder.reply = PeerReply(202, "Accepted DMQ", "application/json", b"{}")
    response = one_answer(node, request())
    assert (response.code, response.reason, response.body) == (202, "Accepted DMQ", b"{}")
    assert response.headers.get("content-type") == "application/json"


def test_failing_peer_handler_is_answered_500() -> None:
    node, _ = make_node()

    def broken(message: PeerMessage) -> PeerReply:
        raise RuntimeError("boom")

    node.register_peer("htable", broken)
    response = one_answer(node, request())
    assert response.code == 500


REQUEST_VECTORS = [p for p in VECTOR_FILES if p.name.startswith("request-")]


@pytest.mark.parametrize("path", REQUEST_VECTORS, ids=lambda p: p.name)
def test_reply_to_a_kamailio_request_copies_dialog_headers_and_adds_a_to_tag(path: Path) -> None:
    data = path.read_bytes()
    sent = parse_message(data)
    assert isinstance(sent, SipRequest)
    target = SipUri.parse(sent.uri)
    node, _ = make_node(SipUri.parse(f"sip:{target.host}:{target.port}"))
    via_port = int(sent.headers.get_all("via")[0].split(";")[0].rsplit(":", 1)[1])
    node.receive(data, Endpoint("udp", "127.0.0.1", via_port), 0.0)
    out = [(parse_message(data), to) for data, to in node.datagrams_to_send()]
    # A join (Max-Forwards 2) is also passed on; only the response matters here.
    [(response, to)] = [(m, to) for m, to in out if isinstance(m, SipResponse)]
    assert to == Endpoint("udp", "127.0.0.1", via_port)
    assert response.headers.get_all("via") == sent.headers.get_all("via")
    for name in ("from", "call-id", "cseq"):
        assert response.headers.get(name) == sent.headers.get(name), name
    to_header = response.headers.get("to") or ""
    assert to_header.startswith(sent.headers.get("to") or "-")
    assert NameAddr.parse(to_header).tag
    assert response.headers.get("server")
    expected = 404 if target.user == "nosuchpeer" else 200
    assert response.code == expected


def test_response_goes_to_the_source_port_when_rport_is_asked() -> None:
    node, _ = make_node()
    data = request(replace={"Via": "SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bKr;rport"})
    node.receive(data, Endpoint("udp", "127.0.0.1", 40000), 0.0)
    [(_, to)] = answers(node)
    assert to == Endpoint("udp", "127.0.0.1", 40000)


def test_response_over_tcp_goes_back_on_the_same_connection() -> None:
    node, _ = make_node()
    source = Endpoint("tcp", "127.0.0.1", 40000, connection=3)
    node.receive(
        request(replace={"Via": "SIP/2.0/TCP 127.0.0.1:5090;branch=z9hG4bKc"}), source, 0.0
    )
    [(_, to)] = answers(node)
    assert to == source


# --------------------------------------------------------------------------- malformed

ANSWERABLE = [
    pytest.param(
        request(body=b"hell", replace={"Content-Length": "9"}, content_length=False),
        400,
        id="short-body",
    ),
    pytest.param(
        request(replace={"Content-Length": "many"}, content_length=False),
        400,
        id="bad-content-length",
    ),
    pytest.param(request(replace={"CSeq": "ten KDMQ"}), 400, id="bad-cseq"),
    pytest.param(request(replace={"CSeq": "10 OPTIONS"}), 400, id="cseq-method-differs"),
    pytest.param(request(replace={"Max-Forwards": "many"}), 400, id="bad-max-forwards"),
    pytest.param(request(replace={"Max-Forwards": "\u00b2"}), 400, id="superscript-max-forwards"),
    pytest.param(request(replace={"From": "<http://x>"}), 400, id="bad-from"),
    pytest.param(request(uri="sip:htable@"), 400, id="request-uri-without-host"),
    pytest.param(request().replace(b" SIP/2.0\r\n", b" SIP/3.0\r\n", 1), 505, id="bad-version"),
]


@pytest.mark.parametrize(("data", "status"), ANSWERABLE)
def test_malformed_answerable_request_is_answered_with_a_warning(data: bytes, status: int) -> None:
    node, recorder = make_node()
    response = one_answer(node, data)
    assert response.code == status
    warning = response.headers.get("warning") or ""
    assert warning.startswith('399 dmq-gateway "') and len(warning) > 20
    assert recorder.messages == []
    assert node.stats.malformed_answered == 1
    assert node.stats.malformed_dropped == 0


UNANSWERABLE = [
    pytest.param(request(replace={"Via": None}), id="no-via"),
    pytest.param(request(replace={"Via": "garbage"}), id="unparseable-via"),
    pytest.param(request(replace={"Call-ID": None}), id="no-call-id"),
    pytest.param(request(replace={"From": None}), id="no-from"),
    pytest.param(
        request(replace={"Subject": "caf\u00e9"}).replace(b"caf\xc3\xa9", b"caf\xe9"), id="non-utf8"
    ),
    pytest.param(request(replace={"Subject": "a\rInjected: b"}), id="stray-cr"),
    pytest.param(b"\x00\x01garbage", id="garbage"),
    pytest.param(b"", id="empty"),
    pytest.param(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", id="response-without-via"),
    pytest.param(
        request(replace={"Via": None}).replace(b" SIP/2.0\r\n", b" SIP/3.0\r\n", 1),
        id="bad-version-without-via",
    ),
]


@pytest.mark.parametrize("data", UNANSWERABLE)
def test_malformed_unanswerable_message_is_dropped_and_counted(data: bytes) -> None:
    node, recorder = make_node()
    node.receive(data, SOURCE, 0.0)
    assert node.datagrams_to_send() == []
    assert recorder.messages == []
    assert node.stats.malformed_dropped == 1


@settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated([*VECTORS.values(), request()]), st.binary(max_size=300)))
def test_property_malformed_bytes_never_raise(data: bytes) -> None:
    node, _ = make_node()
    node.register_peer("nosuchpeer", Recorder())
    node.receive(data, SOURCE, 0.0)
    for out, _ in node.datagrams_to_send():
        parse_message(out)  # whatever the node sends is valid SIP


# --------------------------------------------------------------------------- sending


def test_send_to_an_unknown_node_raises() -> None:
    node, _ = make_node()
    with pytest.raises(UnknownNodeError):
        node.send("htable", b"x", None, SipUri.parse("sip:127.0.0.1:5099"), 0.0)
    with pytest.raises(UnknownNodeError):
        node.send("htable", b"x", None, NODE, 0.0)
    assert node.datagrams_to_send() == []


def test_too_large_body_raises() -> None:
    node, _ = make_node(notification_addresses=(SipUri.parse("sip:127.0.0.1:5090"),))
    node.start(0.0)
    node.datagrams_to_send()
    target = SipUri.parse("sip:127.0.0.1:5090")
    too_large = b"x" * (node.max_body_size + 1)
    with pytest.raises(MessageTooLargeError):
        node.send("htable", too_large, None, target, 0.0)
    with pytest.raises(MessageTooLargeError):
        node.broadcast("htable", too_large, None, 0.0)
    assert node.datagrams_to_send() == []
    node.send("htable", b"x" * node.max_body_size, None, target, 0.0)
    [(data, _)] = node.datagrams_to_send()
    assert len(data) <= 65_507


def test_user_send_on_the_notification_channel_is_refused() -> None:
    node, _ = make_node(notification_addresses=(SipUri.parse("sip:127.0.0.1:5090"),))
    node.start(0.0)
    with pytest.raises(ReservedPeerError):
        node.broadcast("notification_peer", b"", None, 0.0)


def test_broadcast_with_no_active_node_completes_at_once_with_no_results() -> None:
    node, _ = make_node()
    operation = node.broadcast("htable", b"x", None, 0.0)
    assert operation.targets == () and operation.done
    assert node.datagrams_to_send() == []


def test_kdmq_request_we_send_has_kamailios_shape() -> None:
    node, _ = make_node(notification_addresses=(SipUri.parse("sip:127.0.0.1:5090"),))
    node.start(0.0)
    [(data, to)] = node.datagrams_to_send()
    message = parse_message(data)
    assert isinstance(message, SipRequest)
    assert to == Endpoint("udp", "127.0.0.1", 5090)
    assert (message.method, message.uri) == ("KDMQ", "sip:notification_peer@127.0.0.1:5090")
    assert message.headers.get("to") == "<sip:notification_peer@127.0.0.1:5090>"
    sender = NameAddr.parse(message.headers.get("from") or "")
    assert str(sender.uri) == "sip:notification_peer@127.0.0.1:5091" and sender.tag
    assert message.headers.get("cseq") == "10 KDMQ"
    assert message.headers.get("max-forwards") == "2"
    assert message.headers.get("content-type") == "text/plain"
    assert (message.headers.get("via") or "").startswith(
        "SIP/2.0/UDP 127.0.0.1:5091;branch=z9hG4bK"
    )
    assert message.body == b"sip:127.0.0.1:5091;status=active\r\n"


def _sent_requests(cluster: Cluster, since: int) -> list[SipRequest]:
    return [r for wire in cluster.trace[since:] if (r := wire.request()) is not None]


def test_requests_we_send_have_unique_branches_call_ids_and_tags() -> None:
    cluster = Cluster()
    a = cluster.add(7001, peers=("htable", "dialog"))
    b = cluster.add(7002, [7001], peers=("htable", "dialog"))
    cluster.advance(1)
    since = len(cluster.trace)
    for number in range(300):
        for member in (a, b):
            peer_id = "htable" if number % 2 else "dialog"
            member.node.broadcast(peer_id, b"%d" % number, None, cluster.now)
    cluster.flush()
    sent = [r for r in _sent_requests(cluster, since) if r.method == "KDMQ"]
    assert len(sent) == 600
    vias = [Via.parse(r.headers.get("via") or "") for r in sent]
    branches = [via.branch for via in vias]
    assert all(b is not None and b.startswith("z9hG4bK") for b in branches)
    assert len(set(branches)) == 600
    assert len({r.headers.get("call-id") for r in sent}) == 600
    tags = [NameAddr.parse(r.headers.get("from") or "").tag for r in sent]
    assert len(set(tags)) == 600
    # Each was delivered to its peer, under the peer named in its Request-URI.
    assert len(a.received) == len(b.received) == 300
    assert {(m.peer_id, int(m.body)) for m in a.received} == {
        ("htable" if n % 2 else "dialog", n) for n in range(300)
    }


def test_a_node_started_again_does_not_reuse_a_branch() -> None:
    cluster = Cluster()
    cluster.add(7001)
    b = cluster.add(7002, [7001])
    cluster.advance(1)
    since = len(cluster.trace)
    b.node.broadcast("htable", b"first life", None, cluster.now)
    cluster.flush()
    b = cluster.add(7002, [7001])  # the same address, a new process
    cluster.advance(1)
    b.node.broadcast("htable", b"second life", None, cluster.now)
    cluster.flush()
    branches = [
        Via.parse(r.headers.get("via") or "").branch
        for r in _sent_requests(cluster, since)
        if r.uri.startswith("sip:htable@127.0.0.1:7001")
    ]
    assert len(branches) == 2 and branches[0] != branches[1]


def test_sends_to_many_peers_keep_the_request_heads_bounded() -> None:
    cluster = Cluster()
    cluster.add(7001, peers=tuple(f"p{n}" for n in range(CACHE_SIZE + 50)))
    b = cluster.add(7002, [7001])
    cluster.advance(1)
    since = len(cluster.trace)
    for n in range(CACHE_SIZE + 50):
        b.node.broadcast(f"p{n}", b"x", None, cluster.now)
    assert len(b.node._request_heads) <= CACHE_SIZE
    cluster.flush()
    uris = [r.uri for r in _sent_requests(cluster, since) if r.method == "KDMQ"]
    assert uris == [f"sip:p{n}@127.0.0.1:7001" for n in range(CACHE_SIZE + 50)]


def test_an_extra_header_name_accepted_once_still_has_its_value_checked() -> None:
    cluster = Cluster()
    cluster.add(7001)
    b = cluster.add(7002, [7001])
    cluster.advance(1)
    b.node.broadcast("htable", b"x", None, cluster.now, headers=(("X-Seen", "fine"),))
    with pytest.raises(InvalidHeaderError, match="single line"):
        b.node.broadcast("htable", b"x", None, cluster.now, headers=(("X-Seen", "a\r\nB: c"),))
    with pytest.raises(InvalidHeaderError, match="SIP token"):
        b.node.broadcast("htable", b"x", None, cluster.now, headers=(("X-Seen:", "v"),))
    with pytest.raises(InvalidHeaderError, match="written by the DMQ node"):
        b.node.broadcast("htable", b"x", None, cluster.now, headers=(("Call-ID", "v"),))


# --------------------------------------------------------------------------- node lists


@pytest.mark.parametrize(
    ("word", "status"),
    [
        ("active", NodeStatus.ACTIVE),
        ("ACTIVE", NodeStatus.ACTIVE),
        ("not_active", NodeStatus.NOT_ACTIVE),
        ("pending", NodeStatus.NOT_ACTIVE),
        ("timeout", NodeStatus.NOT_ACTIVE),
        ("disabled", NodeStatus.DISABLED),
    ],
)
def test_node_list_status_words_of_5_6_and_6_x(word: str, status: NodeStatus) -> None:
    parsed = parse_node_list(f"sip:127.0.0.1:5090;status={word}\r\n".encode())
    assert [(str(line.uri), line.status) for line in parsed.lines] == [
        ("sip:127.0.0.1:5090", status)
    ]
    assert parsed.errors == []


def test_node_list_line_without_status_is_active() -> None:
    parsed = parse_node_list(b"sip:127.0.0.1:5090\r\n")
    assert [line.status for line in parsed.lines] == [NodeStatus.ACTIVE]


def test_node_list_keeps_transport_and_drops_other_params_and_user() -> None:
    parsed = parse_node_list(b"sip:dmq@127.0.0.1:5090;transport=tcp;x=1;status=active")
    assert [str(line.uri) for line in parsed.lines] == ["sip:127.0.0.1:5090;transport=tcp"]


def test_node_list_skips_bad_lines_and_keeps_the_rest() -> None:
    body = (
        b"sip:127.0.0.1:5092;status=active\r\n"
        b"garbage\r\n"
        b"sip:127.0.0.1:99999;status=active\r\n"
        b"sip:127.0.0.1:5093;status=sleeping\r\n"
        b"\r\n"
        b"sip:127.0.0.1:5094;status=pending\n"
    )
    parsed = parse_node_list(body)
    assert [(line.uri.port, line.status) for line in parsed.lines] == [
        (5092, NodeStatus.ACTIVE),
        (5094, NodeStatus.NOT_ACTIVE),
    ]
    assert len(parsed.errors) == 3


def test_notification_with_a_bad_line_still_merges_the_rest() -> None:
    node, _ = make_node()
    body = (
        b"sip:127.0.0.1:5090;status=active\r\n"
        b"sip:127.0.0.1:5093;status=sleeping\r\n"
        b"garbage\r\n"
        b"sip:127.0.0.1:5094;status=pending\r\n"
    )
    response = one_answer(node, request("notification_peer", body=body))
    assert response.code == 200
    assert {n.port: n.status for n in node.nodes.others()} == {
        5090: NodeStatus.ACTIVE,
        5094: NodeStatus.NOT_ACTIVE,
    }
    assert response.headers.get("content-type") == "text/plain"
    lines = parse_node_list(response.body).lines
    assert [(line.uri.port, line.status) for line in lines] == [
        (5091, NodeStatus.ACTIVE),
        (5090, NodeStatus.ACTIVE),
    ], "we list ourselves and only the nodes we hold as active"


def test_notification_from_a_new_node_is_passed_on_one_hop() -> None:
    node, _ = make_node()
    node.receive(
        request("notification_peer", body=b"sip:127.0.0.1:5090;status=active\r\n"), SOURCE, 0.0
    )
    node.datagrams_to_send()
    join = request(
        "notification_peer",
        body=b"sip:127.0.0.1:5092;status=active\r\n",
        branch="z9hG4bKjoin",
        replace={
            "Via": "SIP/2.0/UDP 127.0.0.1:5092;branch=z9hG4bKjoin",
            "From": "<sip:notification_peer@127.0.0.1:5092>;tag=j",
            "Max-Forwards": "2",
        },
    )
    node.receive(join, Endpoint("udp", "127.0.0.1", 5092), 1.0)
    out = [(parse_message(data), to) for data, to in node.datagrams_to_send()]
    passed_on = [(m, to) for m, to in out if isinstance(m, SipRequest)]
    assert sorted(to.port for _, to in passed_on) == [5090, 5092]
    assert {m.headers.get("max-forwards") for m, _ in passed_on} == {"1"}
    # The same news with Max-Forwards 1 is taken but not passed on.
    ping = join.replace(b"Max-Forwards: 2", b"Max-Forwards: 1").replace(b"5092", b"5093")
    node.receive(ping, Endpoint("udp", "127.0.0.1", 5093), 2.0)
    replies = [parse_message(data) for data, _ in node.datagrams_to_send()]
    assert [type(m) for m in replies] == [SipResponse]
    assert node.nodes.find(SipUri.parse("sip:127.0.0.1:5093")) is not None


def test_notification_that_changes_nothing_is_not_passed_on() -> None:
    node, _ = make_node()
    body = b"sip:127.0.0.1:5090;status=active\r\n"
    node.receive(request("notification_peer", body=body), SOURCE, 0.0)
    node.datagrams_to_send()
    again = request(
        "notification_peer", body=body, branch="z9hG4bKt9", replace={"Max-Forwards": "2"}
    )
    node.receive(again, SOURCE, 1.0)
    out = [parse_message(data) for data, _ in node.datagrams_to_send()]
    assert [type(m) for m in out] == [SipResponse]


def test_a_list_naming_us_by_another_name_does_not_add_us() -> None:
    def resolver(host: str) -> str:
        return {"me.test": "127.0.0.1"}.get(host, host)

    node = DmqNode(NodeConfig(server_address=NODE), resolver=resolver)
    body = (
        b"sip:127.0.0.1:5090;status=active\r\n"
        b"sip:me.test:5091;status=active\r\n"
        b"sip:me.test:5091;status=disabled\r\n"
    )
    node.receive(request("notification_peer", body=body), SOURCE, 0.0)
    assert [n.port for n in node.nodes.others()] == [5090]
    assert len(node.nodes) == 2
    assert node.nodes.local.status is NodeStatus.ACTIVE
    events = [e for e in iter(node.next_event, None) if isinstance(e, NodeStatusChanged)]
    assert [e.node.port for e in events] == [5090]


def test_a_stopped_node_does_not_claim_to_be_active() -> None:
    node, _ = make_node()
    node.receive(
        request("notification_peer", body=b"sip:127.0.0.1:5090;status=active\r\n"), SOURCE, 0.0
    )
    node.datagrams_to_send()
    node.stop(1.0)
    [(leave, _)] = node.datagrams_to_send()
    assert parse_message(leave).body == b"sip:127.0.0.1:5091;status=disabled\r\n"
    ping = request(
        "notification_peer",
        body=b"sip:127.0.0.1:5090;status=active\r\nsip:127.0.0.1:5091;status=active\r\n",
        branch="z9hG4bKping",
    )
    response = one_answer(node, ping)
    # A 200 would carry our list, naming us active, and undo the leave at the pinger.
    assert (response.code, response.reason, response.body) == (503, "Service Unavailable", b"")


def test_stop_answers_pending_deferred_requests_503() -> None:
    node, _ = make_node()
    node.register_peer("htable", lambda message: None)
    node.receive(request(), SOURCE, 0.0)
    assert node.datagrams_to_send() == []
    node.stop(1.0)
    [(response, _)] = answers(node)
    assert response.code == 503
