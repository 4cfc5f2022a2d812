"""RFC 3261 section 17 non-INVITE transactions on a fake clock.

The :class:`TransactionLayer` is driven directly with a :class:`TimerQueue` and a list as
its transmit (aioquic style: explicit ``now`` values, nothing real); the server side is
also checked through :class:`DmqNode`, where it decides how often a peer handler runs.
"""

from __future__ import annotations

import pytest

from app.dmq.config import NodeConfig
from app.dmq.errors import ReplyNotPendingError
from app.dmq.events import Delivery, SendCompleted
from app.dmq.node import DmqNode
from app.dmq.peers import PeerMessage, PeerReply
from app.dmq.sip import Headers, SipRequest, SipResponse, SipUri, Via, parse_message
from app.dmq.timers import TimerQueue
from app.dmq.transaction import (
    ClientState,
    Endpoint,
    FinalResult,
    Recipe,
    ServerState,
    TimerSettings,
    TransactionLayer,
)

UDP_PEER = Endpoint("udp", "127.0.0.1", 5091)
TCP_PEER = Endpoint("tcp", "127.0.0.1", 5091)
BRANCH = "z9hG4bKclient1"


class Harness:
    """A transaction layer on a fake clock; ``wire`` records ``(now, bytes, endpoint)``."""

    def __init__(self, settings: TimerSettings | None = None) -> None:
        self.now = 0.0
        self.timers = TimerQueue()
        self.wire: list[tuple[float, bytes, Endpoint]] = []
        self.results: list[tuple[float, FinalResult]] = []
        self.layer = TransactionLayer(self.timers, settings or TimerSettings(), self._transmit)

    def _transmit(self, data: bytes, destination: Endpoint) -> None:
        self.wire.append((self.now, data, destination))

    def on_result(self, result: FinalResult, now: float) -> None:
        # The instant comes with the result: the layer keeps no clock to read.
        self.results.append((now, result))

    def advance_to(self, end: float) -> None:
        """Fire every timer due up to ``end`` at its own instant, in order."""
        while (deadline := self.timers.next_deadline()) is not None and deadline <= end:
            self.now = deadline
            self.timers.run_due(deadline)
        self.now = end

    def send(self, destination: Endpoint = UDP_PEER, branch: str = BRANCH) -> bytes:
        data = request_bytes(branch, "UDP" if destination.transport == "udp" else "TCP")
        self.layer.send_request(branch, data, destination, self.now, self.on_result)
        return data

    def answer(self, code: int, branch: str = BRANCH, method: str = "KDMQ") -> bool:
        response = response_to(branch, code, method)
        return self.layer.receive_response(response, Via.parse(via(branch)), self.now)

    def instants(self) -> list[float]:
        return [at for at, _, _ in self.wire]


def via(branch: str, transport: str = "UDP") -> str:
    return f"SIP/2.0/{transport} 127.0.0.1:5090;branch={branch}"


def request_bytes(branch: str, transport: str = "UDP") -> bytes:
    return (
        f"KDMQ sip:htable@127.0.0.1:5091 SIP/2.0\r\n"
        f"Via: {via(branch, transport)}\r\n"
        "From: <sip:htable@127.0.0.1:5090>;tag=f1\r\n"
        "To: <sip:htable@127.0.0.1:5091>\r\n"
        f"Call-ID: {branch}@127.0.0.1\r\n"
        "CSeq: 10 KDMQ\r\n"
        "Max-Forwards: 1\r\n"
        "Content-Length: 5\r\n\r\nhello"
    ).encode()


def response_to(branch: str, code: int, method: str = "KDMQ") -> SipResponse:
    reasons = {100: "Trying", 200: "OK", 404: "User Not Found", 500: "Server Internal Error"}
    headers = Headers([("via", via(branch)), ("cseq", f"10 {method}")])
    return SipResponse(code, reasons.get(code, "Whatever"), headers)


# --------------------------------------------------------------------------- timers


def test_a_timer_callback_is_given_the_now_that_fires_it() -> None:
    timers = TimerQueue()
    calls: list[tuple[float, str]] = []
    timers.call_at(1.0, lambda now, tag: calls.append((now, tag)), "first")
    timers.call_at(2.0, lambda now, tag: calls.append((now, tag)), "second")
    assert timers.run_due(0.999) == 0
    # A driver that wakes late hands its real time, not the deadline, to the callback.
    assert timers.run_due(2.5) == 2
    assert calls == [(2.5, "first"), (2.5, "second")]
    assert timers.next_deadline() is None


def test_a_late_timer_e_counts_the_next_interval_from_when_it_ran() -> None:
    h = Harness(TimerSettings(t1=0.5, t2=4.0))
    h.send()
    h.now = 0.7  # the loop woke 0.2 s after Timer E's deadline
    h.timers.run_due(0.7)
    assert h.timers.next_deadline() == 1.7  # 0.7 + 2*T1


# --------------------------------------------------------------------------- client


def test_udp_request_is_retransmitted_at_t1_doubling_up_to_t2() -> None:
    h = Harness(TimerSettings(t1=0.5, t2=4.0))
    data = h.send()
    h.advance_to(31.9)
    # Intervals 0.5, 1, 2, 4, 4, 4, ... (RFC 3261 section 17.1.2.2).
    assert h.instants() == [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert all(sent == data and to == UDP_PEER for _, sent, to in h.wire)
    assert h.layer.stats.retransmissions_sent == 10
    assert h.results == []


def test_retransmission_schedule_follows_other_t1_and_t2() -> None:
    h = Harness(TimerSettings(t1=0.25, t2=1.0))
    h.send()
    h.advance_to(4.0)
    assert h.instants() == pytest.approx([0.0, 0.25, 0.75, 1.75, 2.75, 3.75])


def test_udp_request_without_answer_ends_with_local_408_at_64_t1() -> None:
    h = Harness(TimerSettings(t1=0.5, t2=4.0))
    h.send()
    h.advance_to(31.999)
    assert h.results == []
    h.advance_to(100.0)
    assert len(h.results) == 1
    at, result = h.results[0]
    assert at == 32.0
    assert (result.code, result.reason) == (408, "Request Timeout")
    assert result.timed_out and result.local and not result.transport_error
    assert result.response is None
    assert h.instants()[-1] == 31.5, "nothing is sent after Timer F"
    assert h.layer.clients == {}
    assert h.layer.stats.timeouts == 1


def test_timer_f_override_ends_the_transaction_at_the_given_time() -> None:
    h = Harness(TimerSettings(t1=0.5, t2=4.0, timer_f=2.0))
    h.send()
    h.advance_to(100.0)
    assert h.instants() == [0.0, 0.5, 1.5]
    assert [(at, r.code, r.timed_out) for at, r in h.results] == [(2.0, 408, True)]


def test_timer_f_equal_to_a_retransmission_instant_sends_nothing_more() -> None:
    h = Harness(TimerSettings(t1=0.5, t2=4.0, timer_f=3.5))
    h.send()
    h.advance_to(100.0)
    assert h.instants() == [0.0, 0.5, 1.5]
    assert [at for at, _ in h.results] == [3.5]


def test_reliable_transport_sends_once_and_still_times_out() -> None:
    h = Harness()
    h.send(TCP_PEER)
    h.advance_to(100.0)
    assert h.instants() == [0.0]
    assert h.layer.stats.retransmissions_sent == 0
    assert [(at, r.code, r.timed_out) for at, r in h.results] == [(32.0, 408, True)]


def test_final_response_stops_retransmissions_and_is_reported_once() -> None:
    h = Harness()
    h.send()
    h.advance_to(1.0)
    assert h.answer(200) is True
    h.advance_to(100.0)
    assert h.instants() == [0.0, 0.5]
    assert len(h.results) == 1
    at, result = h.results[0]
    assert (at, result.code, result.reason, result.local) == (1.0, 200, "OK", False)
    assert result.response is not None and result.response.code == 200


def test_provisional_response_moves_retransmissions_to_t2_intervals() -> None:
    h = Harness(TimerSettings(t1=0.5, t2=4.0))
    h.send()
    h.advance_to(0.2)
    assert h.answer(100) is True
    assert h.layer.clients[BRANCH].state is ClientState.PROCEEDING
    h.advance_to(12.6)
    # The pending Timer E still fires at 0.5, then every T2 (RFC 3261 17.1.2.2).
    assert h.instants() == [0.0, 0.5, 4.5, 8.5, 12.5]
    assert h.results == []
    assert h.layer.stats.provisional_received == 1


def test_final_response_after_provisional_ends_the_transaction() -> None:
    h = Harness()
    h.send()
    h.advance_to(0.2)
    h.answer(100)
    h.advance_to(5.0)
    h.answer(404)
    h.advance_to(100.0)
    assert [(at, r.code) for at, r in h.results] == [(5.0, 404)]
    assert h.instants() == [0.0, 0.5, 4.5]


def test_timer_k_absorbs_retransmitted_final_responses_then_forgets() -> None:
    h = Harness(TimerSettings(t1=0.5, t2=4.0, t4=5.0))
    h.send()
    h.advance_to(1.0)
    h.answer(200)
    assert BRANCH in h.layer.absorbing and BRANCH not in h.layer.clients
    h.advance_to(3.0)
    assert h.answer(200) is True, "absorbed by the completed transaction"
    assert len(h.results) == 1
    assert h.layer.stats.stray_responses == 0
    h.advance_to(6.0)  # Timer K = T4 after the final response
    assert h.layer.clients == {} and h.layer.absorbing == {}
    assert h.answer(200) is False
    assert h.layer.stats.stray_responses == 1
    assert len(h.results) == 1


def test_final_response_over_tcp_terminates_at_once() -> None:
    h = Harness()
    h.send(TCP_PEER)
    h.answer(200)
    assert h.layer.clients == {}
    assert h.answer(200) is False
    assert h.layer.stats.stray_responses == 1


def test_response_with_unknown_branch_is_counted_as_stray() -> None:
    h = Harness()
    h.send()
    assert h.answer(200, branch="z9hG4bKnobody") is False
    assert h.layer.stats.stray_responses == 1
    assert h.results == []
    assert h.layer.clients[BRANCH].state is ClientState.TRYING


def test_response_for_another_method_is_counted_as_stray() -> None:
    h = Harness()
    h.send()
    assert h.answer(200, method="OPTIONS") is False
    assert h.layer.stats.stray_responses == 1
    assert h.results == []


def test_transport_error_ends_pending_client_transactions_at_once() -> None:
    h = Harness()
    h.send(TCP_PEER, branch="z9hG4bKa")
    h.send(TCP_PEER, branch="z9hG4bKb")
    h.send(Endpoint("tcp", "127.0.0.1", 5099), branch="z9hG4bKother")
    h.advance_to(1.0)
    assert h.layer.transport_error(TCP_PEER, h.now) == 2
    assert [(at, r.code, r.transport_error, r.timed_out) for at, r in h.results] == [
        (1.0, 408, True, False),
        (1.0, 408, True, False),
    ]
    assert list(h.layer.clients) == ["z9hG4bKother"]
    assert h.layer.stats.transport_errors == 2
    h.advance_to(100.0)
    assert len(h.results) == 3, "Timer F of the failed ones does not fire again"


def test_transport_error_also_stops_udp_retransmissions() -> None:
    h = Harness()
    h.send()
    h.advance_to(0.7)
    h.layer.transport_error(UDP_PEER, h.now)
    h.advance_to(100.0)
    assert h.instants() == [0.0, 0.5]
    assert [(r.code, r.transport_error) for _, r in h.results] == [(408, True)]


# --------------------------------------------------------------------------- server


def incoming(branch: str = "z9hG4bKserver1") -> tuple[SipRequest, Via]:
    message = parse_message(request_bytes(branch))
    assert isinstance(message, SipRequest)
    return message, Via.parse(message.headers.get("via") or "")


SOURCE = Endpoint("udp", "127.0.0.1", 5090)


def test_server_absorbs_a_retransmission_while_unanswered() -> None:
    h = Harness()
    request, top = incoming()
    st = h.layer.receive_request(request, top, SOURCE)
    assert st is not None and st.state is ServerState.TRYING
    assert h.layer.receive_request(request, top, SOURCE) is None
    assert h.wire == []
    assert h.layer.stats.retransmissions_absorbed == 1


def test_server_answers_a_retransmission_with_the_cached_response() -> None:
    h = Harness()
    request, top = incoming()
    st = h.layer.receive_request(request, top, SOURCE)
    assert st is not None
    assert h.layer.respond(st, b"SIP/2.0 200 OK cached", SOURCE, h.now) is True
    assert h.layer.respond(st, b"SIP/2.0 500 again", SOURCE, h.now) is False
    h.advance_to(10.0)
    assert h.layer.receive_request(request, top, Endpoint("udp", "127.0.0.1", 6000)) is None
    assert [(data, to) for _, data, to in h.wire] == [
        (b"SIP/2.0 200 OK cached", SOURCE),
        (b"SIP/2.0 200 OK cached", SOURCE),
    ]
    assert h.layer.stats.responses_resent == 1


def test_with_a_rebuild_timer_j_keeps_the_recipe_and_answers_from_it() -> None:
    """A layer given a rebuild keeps an answer's recipe, not its bytes, and answers a
    retransmission with what the rebuild makes of the retransmitted request; a response
    given without a recipe is kept as bytes, as before."""
    h = Harness()
    rebuilt: list[tuple[SipRequest, tuple[object, ...]]] = []

    def rebuild(request: SipRequest, recipe: Recipe) -> bytes:
        rebuilt.append((request, recipe))
        return b"SIP/2.0 %d rebuilt" % recipe[0]

    h.layer = TransactionLayer(h.timers, TimerSettings(), h._transmit, rebuild)
    recipe = (202, "Accepted", None, b"", ())
    request, top = incoming("z9hG4bKrecipe")
    st = h.layer.receive_request(request, top, SOURCE)
    assert st is not None
    assert h.layer.respond(st, b"SIP/2.0 202 Accepted", SOURCE, h.now, recipe) is True
    assert h.layer.completed[st.key][0] is recipe
    h.advance_to(3.0)
    assert h.layer.receive_request(request, top, SOURCE) is None
    assert rebuilt == [(request, recipe)]
    assert [data for _, data, _ in h.wire] == [b"SIP/2.0 202 Accepted", b"SIP/2.0 202 rebuilt"]
    # Without a recipe: the bytes, resent as they were.
    other, other_top = incoming("z9hG4bKbytes")
    st2 = h.layer.receive_request(other, other_top, SOURCE)
    assert st2 is not None
    h.layer.respond(st2, b"SIP/2.0 200 kept", SOURCE, h.now)
    assert h.layer.receive_request(other, other_top, SOURCE) is None
    assert h.wire[-1][1] == b"SIP/2.0 200 kept" and len(rebuilt) == 1


def test_after_timer_j_the_same_request_is_a_new_transaction() -> None:
    h = Harness(TimerSettings(t1=0.5))
    request, top = incoming()
    st = h.layer.receive_request(request, top, SOURCE)
    assert st is not None
    h.advance_to(2.0)
    h.layer.respond(st, b"SIP/2.0 200 OK", SOURCE, h.now)
    h.advance_to(2.0 + 31.9)
    assert h.layer.receive_request(request, top, SOURCE) is None
    h.advance_to(2.0 + 32.0)  # Timer J = 64*T1 after the response
    again = h.layer.receive_request(request, top, SOURCE)
    assert again is not None and again is not st
    assert [data for _, data, _ in h.wire] == [b"SIP/2.0 200 OK", b"SIP/2.0 200 OK"]


def test_server_transaction_over_tcp_is_not_kept_after_the_answer() -> None:
    h = Harness()
    request, top = incoming()
    source = Endpoint("tcp", "127.0.0.1", 5090, connection=7)
    st = h.layer.receive_request(request, top, source)
    assert st is not None
    h.layer.respond(st, b"SIP/2.0 200 OK", source, h.now)
    assert h.timers.next_deadline() is None, "Timer J is zero on a reliable transport"
    again = h.layer.receive_request(request, top, source)
    assert again is not None and again is not st
    assert len(h.wire) == 1


def test_different_branches_are_different_server_transactions() -> None:
    h = Harness()
    first, top1 = incoming("z9hG4bKone")
    second, top2 = incoming("z9hG4bKtwo")
    assert h.layer.receive_request(first, top1, SOURCE) is not None
    assert h.layer.receive_request(second, top2, SOURCE) is not None


def test_rfc2543_request_without_magic_cookie_matches_on_dialog_headers() -> None:
    h = Harness()
    request, top = incoming("oldstyle1")
    assert h.layer.receive_request(request, top, SOURCE) is not None
    assert h.layer.receive_request(request, top, SOURCE) is None
    other = parse_message(request_bytes("oldstyle1").replace(b"Call-ID: old", b"Call-ID: new"))
    assert isinstance(other, SipRequest)
    assert h.layer.receive_request(other, top, SOURCE) is not None


# --------------------------------------------------------------------------- via DmqNode

NODE_URI = SipUri.parse("sip:127.0.0.1:5091")
PEER_NODE = SipUri.parse("sip:127.0.0.1:5090")


def node_with(
    handler: object, timers: TimerSettings | None = None, reply_timeout: float | None = None
) -> DmqNode:
    config = NodeConfig(
        server_address=NODE_URI,
        notification_addresses=(PEER_NODE,),
        timers=timers or TimerSettings(),
    )
    node = DmqNode(config)
    node.register_peer("htable", handler, reply_timeout=reply_timeout)  # type: ignore[arg-type]
    return node


def run_until(node: DmqNode, end: float) -> list[tuple[float, bytes, Endpoint]]:
    """Fire the node's timers up to ``end``; return what it sent, with instants."""
    sent: list[tuple[float, bytes, Endpoint]] = []
    while (deadline := node.get_timer()) is not None and deadline <= end:
        node.handle_timer(deadline)
        sent.extend((deadline, data, to) for data, to in node.datagrams_to_send())
    return sent


def responses(node: DmqNode) -> list[tuple[SipResponse, Endpoint]]:
    out = []
    for data, to in node.datagrams_to_send():
        message = parse_message(data)
        assert isinstance(message, SipResponse)
        out.append((message, to))
    return out


class Deferred:
    """A peer handler that answers later through :meth:`DmqNode.reply`."""

    def __init__(self) -> None:
        self.messages: list[PeerMessage] = []

    def __call__(self, message: PeerMessage) -> PeerReply | None:
        self.messages.append(message)
        return None


REQUEST = request_bytes("z9hG4bKnode1")


def test_node_delivers_a_retransmitted_request_to_its_peer_exactly_once() -> None:
    handler = Deferred()
    node = node_with(handler)
    node.receive(REQUEST, SOURCE, 0.0)
    node.receive(REQUEST, SOURCE, 0.5)  # the sender's Timer E
    assert node.datagrams_to_send() == []
    assert len(handler.messages) == 1
    node.reply(handler.messages[0].id, PeerReply(202, "Accepted DMQ"), 1.0)
    [(first, _)] = node.datagrams_to_send()
    node.receive(REQUEST, SOURCE, 1.5)
    node.receive(REQUEST, SOURCE, 3.5)
    again = [data for data, _ in node.datagrams_to_send()]
    assert again == [first, first], "retransmissions get the cached response byte for byte"
    assert len(handler.messages) == 1
    assert node.transactions.stats.retransmissions_absorbed == 1
    assert node.transactions.stats.responses_resent == 2


def _answered_twice(node: DmqNode, data: bytes, now: float) -> tuple[bytes, bytes]:
    """The node's answer to ``data``, and its answer to a retransmission of it."""
    node.receive(data, SOURCE, now)
    [(first, _)] = node.datagrams_to_send()
    node.receive(data, SOURCE, now + 0.5)
    [(again, _)] = node.datagrams_to_send()
    return first, again


def test_node_answers_every_retransmission_byte_for_byte_from_the_recipe() -> None:
    """Timer J keeps what was answered, not the bytes, and rebuilds the response for a
    retransmission: the same bytes for a plain answer, one with a body and a
    Content-Type, a Warning of a 400, a 404, a request with two Vias and one whose To
    has a tag; every plain answer of one code and reason shares one recipe object."""
    replies = {
        "z9hG4bKplain": PeerReply(),
        "z9hG4bKbody": PeerReply(202, "Accepted DMQ", "application/json", b'{"ok":1}'),
    }
    node = node_with(lambda message: replies.get(message.call_id.split("@")[0], PeerReply()))
    bodies = {
        "z9hG4bKplain": request_bytes("z9hG4bKplain"),
        "z9hG4bKbody": request_bytes("z9hG4bKbody"),
        "z9hG4bKwarn": request_bytes("z9hG4bKwarn").replace(b"Max-Forwards: 1", b"Max-Forwards: x"),
        "z9hG4bKnope": request_bytes("z9hG4bKnope").replace(b"sip:htable@", b"sip:nobody@", 1),
        "z9hG4bKvias": request_bytes("z9hG4bKvias").replace(
            b"\r\nFrom:", b"\r\nVia: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKup\r\nFrom:", 1
        ),
        "z9hG4bKtag": request_bytes("z9hG4bKtag").replace(
            b"To: <sip:htable@127.0.0.1:5091>", b"To: <sip:htable@127.0.0.1:5091>;tag=t9"
        ),
    }
    codes = {}
    for n, (branch, data) in enumerate(bodies.items()):
        first, again = _answered_twice(node, data, float(n))
        assert again == first, branch
        response = parse_message(first)
        assert isinstance(response, SipResponse)
        codes[branch] = response.code
    assert codes == {
        "z9hG4bKplain": 200,
        "z9hG4bKbody": 202,
        "z9hG4bKwarn": 400,
        "z9hG4bKnope": 404,
        "z9hG4bKvias": 200,
        "z9hG4bKtag": 200,
    }
    assert b"Warning: 399" in _answered_twice(node, bodies["z9hG4bKwarn"], 9.0)[1]
    kept = [entry[0] for entry in node.transactions.completed.values()]
    assert not any(isinstance(response, bytes) for response in kept)
    plain = [r for r in kept if r == (200, "OK", None, b"", ())]
    assert len(plain) == 3 and all(r is plain[0] for r in plain)
    assert node.transactions.stats.responses_resent == 6 + 2  # the 400 asked twice more


def test_node_keeps_under_400_bytes_per_answered_request_for_timer_j() -> None:
    """What Timer J holds per answered KDMQ request, measured: the key, the recipe
    (shared), the destination and the deadline, no copy of the response (it was some
    700 bytes a request: 450 MB at 20 000 requests a second)."""
    import gc
    import tracemalloc

    node = node_with(lambda message: PeerReply())
    count = 5000
    requests = [request_bytes(f"z9hG4bKmem{n:06d}") for n in range(count + 200)]
    for data in requests[:200]:  # caches and tables warmed
        node.receive(data, SOURCE, 0.0)
    node.datagrams_to_send()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for data in requests[200:]:
            node.receive(data, SOURCE, 0.0)
            node.datagrams_to_send()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert len(node.transactions.completed) == count + 200
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown / count < 400, grown / count


def test_node_deferred_reply_carries_code_reason_and_body() -> None:
    handler = Deferred()
    node = node_with(handler)
    node.receive(REQUEST, SOURCE, 0.0)
    message_id = handler.messages[0].id
    reply = PeerReply(202, "Accepted DMQ", "application/json", b'{"ok":1}')
    node.reply(message_id, reply, 0.3)
    [(response, to)] = responses(node)
    assert to == SOURCE
    assert (response.code, response.reason, response.body) == (202, "Accepted DMQ", b'{"ok":1}')
    assert response.headers.get("content-type") == "application/json"
    with pytest.raises(ReplyNotPendingError, match="already answered 202 Accepted DMQ"):
        node.reply(message_id, PeerReply(), 0.4)
    assert node.datagrams_to_send() == []


def test_node_after_timer_j_a_retransmission_is_delivered_again() -> None:
    handler = Deferred()
    node = node_with(handler, TimerSettings(t1=0.5))
    node.receive(REQUEST, SOURCE, 0.0)
    node.reply(handler.messages[0].id, PeerReply(), 0.0)
    node.datagrams_to_send()
    run_until(node, 31.9)
    node.receive(REQUEST, SOURCE, 31.9)
    assert len(handler.messages) == 1
    run_until(node, 32.0)
    node.receive(REQUEST, SOURCE, 32.0)
    assert len(handler.messages) == 2


def test_node_answers_408_when_a_deferred_reply_never_comes() -> None:
    handler = Deferred()
    node = node_with(handler)  # reply timeout defaults to Timer F = 32 s
    node.receive(REQUEST, SOURCE, 0.0)
    assert run_until(node, 31.99) == []
    sent = run_until(node, 32.0)
    assert len(sent) == 1
    at, data, to = sent[0]
    response = parse_message(data)
    assert isinstance(response, SipResponse)
    assert (at, response.code, response.reason, to) == (32.0, 408, "Request Timeout", SOURCE)
    assert node.stats.reply_timeouts == 1
    with pytest.raises(ReplyNotPendingError, match="reply_timeout of 32 s"):
        node.reply(handler.messages[0].id, PeerReply(), 33.0)
    assert node.datagrams_to_send() == []


def test_node_peer_reply_timeout_overrides_timer_f() -> None:
    handler = Deferred()
    node = node_with(handler, reply_timeout=5.0)
    node.receive(REQUEST, SOURCE, 0.0)
    assert run_until(node, 4.9) == []
    sent = run_until(node, 5.0)
    assert [(at, parse_message(data).code) for at, data, _ in sent] == [(5.0, 408)]  # type: ignore[union-attr]


def test_node_send_over_udp_retransmits_then_reports_a_local_408() -> None:
    node = node_with(Deferred())
    node.start(0.0)
    node.datagrams_to_send()  # the join
    operation = node.send("htable", b"x", "text/plain", PEER_NODE, 0.0)
    [(request, to)] = node.datagrams_to_send()
    assert to == Endpoint("udp", "127.0.0.1", 5090)
    sent = [(at, data) for at, data, _ in run_until(node, 32.0) if data == request]
    assert [at for at, _ in sent] == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    done = [e for e in iter(node.next_event, None) if isinstance(e, SendCompleted)]
    assert [e.operation for e in done] == [operation]
    [result] = operation.results
    assert (result.code, result.timed_out, result.transport_error) == (408, True, False)
    assert result.outcome is Delivery.QUEUED  # kept for the node, resent when it answers
    assert node.stats.sent[("htable", 408)] == 1


def test_node_transport_error_fails_a_send_at_once() -> None:
    config = NodeConfig(server_address=SipUri.parse("sip:127.0.0.1:5091;transport=tcp"))
    node = DmqNode(config)
    target = SipUri.parse("sip:127.0.0.1:5090;transport=tcp")
    node.add_node(target, 0.0)
    node.datagrams_to_send()
    operation = node.send("htable", b"x", None, target, 0.0)
    node.transport_error(Endpoint("tcp", "127.0.0.1", 5090), 0.1)
    assert [(r.code, r.transport_error, r.timed_out, r.outcome) for r in operation.results] == [
        (408, True, False, Delivery.QUEUED)
    ]
    assert operation.done
