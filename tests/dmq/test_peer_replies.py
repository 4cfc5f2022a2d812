"""Deferred peer replies on a fake clock: one timeout, owned by the node.

A handler that returns ``None`` answers later through :meth:`DmqNode.reply`. The node
alone decides how long it may take (the peer's ``reply_timeout``, at most Timer F),
answers 408 when it does not come, counts it once, and refuses a late reply with a
sentence saying what happened to the message.
"""

from __future__ import annotations

import math

import pytest

import app.dmq.node as node_module
from app.dmq.config import NodeConfig
from app.dmq.errors import (
    InvalidPeerIdError,
    InvalidReplyTimeoutError,
    ReplyNotPendingError,
    ReservedPeerError,
    UnknownPeerError,
)
from app.dmq.events import PeerReplyTimedOut
from app.dmq.node import DmqNode
from app.dmq.peers import PeerMessage, PeerReply
from app.dmq.sip import SipResponse, SipUri, parse_message
from app.dmq.transaction import Endpoint, TimerSettings

NODE_URI = SipUri.parse("sip:127.0.0.1:5091")
SOURCE = Endpoint("udp", "127.0.0.1", 5090)


class Deferred:
    """A peer handler that always answers later."""

    def __init__(self) -> None:
        self.messages: list[PeerMessage] = []

    def __call__(self, message: PeerMessage) -> PeerReply | None:
        self.messages.append(message)
        return None


def make_node(timer_f: float | None = None) -> DmqNode:
    return DmqNode(
        NodeConfig(server_address=NODE_URI, timers=TimerSettings(t1=0.5, timer_f=timer_f))
    )


def kdmq(peer_id: str, branch: str) -> bytes:
    return (
        f"KDMQ sip:{peer_id}@127.0.0.1:5091 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK{branch}\r\n"
        f"From: <sip:{peer_id}@127.0.0.1:5090>;tag=f1\r\n"
        f"To: <sip:{peer_id}@127.0.0.1:5091>\r\n"
        f"Call-ID: {branch}@127.0.0.1\r\n"
        "CSeq: 10 KDMQ\r\n"
        "Max-Forwards: 1\r\n"
        "Content-Length: 5\r\n\r\nhello"
    ).encode()


def advance(node: DmqNode, end: float) -> None:
    """Fire every timer due up to ``end``, each at its own deadline."""
    while (deadline := node.get_timer()) is not None and deadline <= end:
        node.handle_timer(deadline)


def answers(node: DmqNode) -> list[tuple[int, str]]:
    out = []
    for data, _ in node.datagrams_to_send():
        response = parse_message(data)
        assert isinstance(response, SipResponse)
        out.append((response.code, response.reason))
    return out


def timed_out_events(node: DmqNode) -> list[PeerReplyTimedOut]:
    return [e for e in iter(node.next_event, None) if isinstance(e, PeerReplyTimedOut)]


def test_a_deferred_message_is_answered_408_at_exactly_the_peers_reply_timeout() -> None:
    node = make_node()
    handler = Deferred()
    node.register_peer("rpc", handler, reply_timeout=1.5)
    node.receive(kdmq("rpc", "a"), SOURCE, 10.0)
    assert node.get_timer() == 11.5
    advance(node, 11.4999)
    assert answers(node) == []
    advance(node, 11.5)
    assert answers(node) == [(408, "Request Timeout")]
    assert timed_out_events(node) == [PeerReplyTimedOut(handler.messages[0].id, "rpc")]
    assert node.stats.reply_timeouts == 1
    assert node.stats.received[("rpc", 408)] == 1


def test_without_a_reply_timeout_the_wait_is_timer_f() -> None:
    node = make_node(timer_f=1.0)
    handler = Deferred()
    node.register_peer("rpc", handler)
    node.receive(kdmq("rpc", "a"), SOURCE, 0.0)
    advance(node, 1.0)
    assert answers(node) == [(408, "Request Timeout")]
    # The reply that comes at 1.5 s is refused, not silently accepted and dropped.
    with pytest.raises(ReplyNotPendingError) as caught:
        node.reply(handler.messages[0].id, PeerReply(), 1.5)
    assert str(caught.value) == (
        f"message {handler.messages[0].id} was already answered 408 Request Timeout: "
        "no reply within the peer's reply_timeout of 1 s"
    )
    assert answers(node) == []


def test_a_late_reply_says_the_message_timed_out() -> None:
    node = make_node()
    handler = Deferred()
    node.register_peer("rpc", handler, reply_timeout=0.25)
    node.receive(kdmq("rpc", "a"), SOURCE, 0.0)
    advance(node, 1.0)
    answers(node)
    message_id = handler.messages[0].id
    with pytest.raises(ReplyNotPendingError) as caught:
        node.reply(message_id, PeerReply(), 1.0)
    assert str(caught.value) == (
        f"message {message_id} was already answered 408 Request Timeout: "
        "no reply within the peer's reply_timeout of 0.25 s"
    )
    assert caught.value.status_hint == 409


def test_a_reply_in_time_is_sent_and_a_second_one_is_refused() -> None:
    node = make_node()
    handler = Deferred()
    node.register_peer("rpc", handler, reply_timeout=2.0)
    node.receive(kdmq("rpc", "a"), SOURCE, 0.0)
    message_id = handler.messages[0].id
    node.reply(message_id, PeerReply(486, "Busy Here"), 1.999)
    assert answers(node) == [(486, "Busy Here")]
    advance(node, 5.0)
    assert answers(node) == []  # the 408 timer was cancelled
    assert timed_out_events(node) == []
    with pytest.raises(ReplyNotPendingError) as caught:
        node.reply(message_id, PeerReply(), 3.0)
    assert str(caught.value) == (
        f"message {message_id} was already answered 486 Busy Here by a reply"
    )


def test_a_reply_for_an_unknown_message_says_so() -> None:
    node = make_node()
    with pytest.raises(ReplyNotPendingError) as caught:
        node.reply(17, PeerReply(), 0.0)
    assert str(caught.value) == "no message 17 is waiting for a reply"


def test_unregistering_a_peer_answers_its_waiting_messages_404() -> None:
    node = make_node()
    rpc, other = Deferred(), Deferred()
    node.register_peer("rpc", rpc)
    node.register_peer("other", other)
    node.receive(kdmq("rpc", "a"), SOURCE, 0.0)
    node.receive(kdmq("rpc", "b"), SOURCE, 0.0)
    node.receive(kdmq("other", "c"), SOURCE, 0.0)
    node.unregister_peer("rpc", 0.5)
    assert answers(node) == [(404, "User Not Found"), (404, "User Not Found")]
    assert "rpc" not in node.peers
    with pytest.raises(ReplyNotPendingError) as caught:
        node.reply(rpc.messages[1].id, PeerReply(), 0.6)
    assert str(caught.value) == (
        f"message {rpc.messages[1].id} was already answered 404 User Not Found "
        "when peer rpc was unregistered"
    )
    # The other peer's message still waits, and is not counted as a timeout.
    node.reply(other.messages[0].id, PeerReply(), 0.7)
    assert answers(node) == [(200, "OK")]
    assert node.stats.reply_timeouts == 0
    with pytest.raises(UnknownPeerError, match="no peer is registered as 'rpc'"):
        node.unregister_peer("rpc", 0.8)


def test_stop_answers_waiting_messages_503_and_says_so_later() -> None:
    node = make_node()
    handler = Deferred()
    node.register_peer("rpc", handler)
    node.receive(kdmq("rpc", "a"), SOURCE, 0.0)
    node.stop(1.0)
    assert answers(node) == [(503, "Service Unavailable")]
    with pytest.raises(ReplyNotPendingError) as caught:
        node.reply(handler.messages[0].id, PeerReply(), 1.1)
    assert str(caught.value).endswith("answered 503 Service Unavailable when the node stopped")
    assert node.stats.reply_timeouts == 0


def test_one_counter_counts_each_timeout_once() -> None:
    node = make_node()
    handler = Deferred()
    node.register_peer("rpc", handler, reply_timeout=1.0)
    for branch in "abc":
        node.receive(kdmq("rpc", branch), SOURCE, 0.0)
    node.reply(handler.messages[1].id, PeerReply(), 0.5)
    advance(node, 10.0)
    assert node.stats.reply_timeouts == 2
    for message in handler.messages:
        with pytest.raises(ReplyNotPendingError):
            node.reply(message.id, PeerReply(), 11.0)
    assert node.stats.reply_timeouts == 2
    assert len(timed_out_events(node)) == 2


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan])
def test_a_reply_timeout_must_be_positive(value: float) -> None:
    node = make_node()
    with pytest.raises(InvalidReplyTimeoutError) as caught:
        node.register_peer("rpc", Deferred(), reply_timeout=value)
    assert str(caught.value) == (f"reply_timeout {value!r} must be a positive number of seconds")
    assert caught.value.status_hint == 422
    assert "rpc" not in node.peers


@pytest.mark.parametrize("value", [5.0, math.inf])
def test_a_reply_timeout_longer_than_timer_f_is_refused(value: float) -> None:
    node = make_node(timer_f=1.0)
    with pytest.raises(InvalidReplyTimeoutError) as caught:
        node.register_peer("rpc", Deferred(), reply_timeout=value)
    assert str(caught.value) == (
        f"reply_timeout {value:g} s is longer than Timer F (1 s): the sending node gives "
        "up at its Timer F, so a longer wait cannot be honoured"
    )
    node.register_peer("rpc", Deferred(), reply_timeout=1.0)  # exactly Timer F is fine
    with pytest.raises(InvalidReplyTimeoutError, match="longer than Timer F"):
        node.update_peer("rpc", reply_timeout=1.5)
    assert node.peers["rpc"].reply_timeout == 1.0


def test_update_peer_changes_the_wait_of_later_messages_only() -> None:
    node = make_node()
    handler = Deferred()
    node.register_peer("rpc", handler, description="old", reply_timeout=3.0)
    node.receive(kdmq("rpc", "a"), SOURCE, 0.0)
    peer = node.update_peer("rpc", reply_timeout=1.0)
    assert (peer.description, peer.reply_timeout) == ("old", 1.0)
    node.update_peer("rpc", description="new")
    assert (peer.description, peer.reply_timeout) == ("new", 1.0)
    node.receive(kdmq("rpc", "b"), SOURCE, 0.0)
    advance(node, 1.0)
    assert [e.message_id for e in timed_out_events(node)] == [handler.messages[1].id]
    advance(node, 3.0)
    assert [e.message_id for e in timed_out_events(node)] == [handler.messages[0].id]
    with pytest.raises(UnknownPeerError, match="no peer is registered as 'nope'"):
        node.update_peer("nope", description="x")


def test_peer_ids_are_checked_with_their_own_errors() -> None:
    node = make_node()
    with pytest.raises(InvalidPeerIdError) as caught:
        node.register_peer("a b", Deferred())
    assert caught.value.status_hint == 422
    with pytest.raises(InvalidPeerIdError):
        node.broadcast("a@b", b"", None, 0.0)
    with pytest.raises(ReservedPeerError):
        node.register_peer("notification_peer", Deferred())


def test_the_record_of_finished_messages_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_module, "FINISHED_RECORD_LIMIT", 3)
    node = make_node()
    handler = Deferred()
    node.register_peer("rpc", handler)
    for branch in "abcd":
        node.receive(kdmq("rpc", branch), SOURCE, 0.0)
    for message in handler.messages:
        node.reply(message.id, PeerReply(), 0.1)
    first, *rest = handler.messages
    with pytest.raises(ReplyNotPendingError, match=f"^no message {first.id} is waiting"):
        node.reply(first.id, PeerReply(), 0.2)
    for message in rest:
        with pytest.raises(ReplyNotPendingError, match="already answered 200 OK"):
            node.reply(message.id, PeerReply(), 0.2)


def test_messages_answered_out_of_order_time_out_at_their_own_deadlines() -> None:
    """One deadline queue per reply timeout, one timer per queue: answering the
    message at the head of its queue, or one behind it, leaves every other deadline
    exactly where it was."""
    node = make_node()
    handler = Deferred()
    node.register_peer("rpc", handler, reply_timeout=2.0)
    node.register_peer("fast", handler, reply_timeout=0.5)
    node.receive(kdmq("rpc", "a"), SOURCE, 10.0)  # due 12.0
    node.receive(kdmq("rpc", "b"), SOURCE, 10.2)  # due 12.2, answered
    node.receive(kdmq("fast", "c"), SOURCE, 10.3)  # due 10.8
    node.receive(kdmq("rpc", "d"), SOURCE, 10.4)  # due 12.4
    a, b, c, d = (m.id for m in handler.messages)
    node.reply(b, PeerReply(), 10.5)
    assert answers(node) == [(200, "OK")]
    assert node.get_timer() == 10.8
    advance(node, 10.8)
    assert answers(node) == [(408, "Request Timeout")]
    advance(node, 11.9999)
    assert answers(node) == []
    advance(node, 12.0)
    assert answers(node) == [(408, "Request Timeout")]
    advance(node, 12.3999)
    assert answers(node) == []
    advance(node, 12.4)
    assert answers(node) == [(408, "Request Timeout")]
    assert [e.message_id for e in timed_out_events(node)] == [c, a, d]
    assert node.get_timer() is None or node.get_timer() > 12.4


def test_a_batch_answered_in_order_leaves_nothing_queued_behind() -> None:
    """A group commit answers its batch in arrival order: each id leaves its deadline
    queue as it is answered, so the queue holds only what still waits."""
    node = make_node()
    handler = Deferred()
    node.register_peer("rpc", handler, reply_timeout=5.0)
    for n in range(1000):
        node.receive(kdmq("rpc", f"m{n}"), SOURCE, 1.0 + n / 1000)
    ids = [m.id for m in handler.messages]
    assert node.reply_many(ids[:990], PeerReply(), 2.0) == 990
    queues = node._deadlines
    assert [len(q) for q in queues.values()] == [10]
    # Already answered, and unknown, ids are skipped.
    assert node.reply_many([ids[0], ids[995], 10**9], PeerReply(), 2.0) == 1
    assert len(answers(node)) == 991
    advance(node, 10.0)
    assert len(answers(node)) == 9  # the rest timed out, each once
    assert node.stats.reply_timeouts == 9
    assert node._deadlines == {}
    with pytest.raises(ReplyNotPendingError, match="was already answered 200 OK by a reply"):
        node.reply(ids[1], PeerReply(), 10.0)
