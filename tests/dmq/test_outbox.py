"""Store-and-forward at the sender: per-node outboxes on a fake clock.

Two nodes, A (7001) and B (7002), ping every 10 s with Timer F 2 s: B down from 1000.5
misses A's ping at 1010 and is disabled at 1012, and removed when it misses the ping at
1020 (at 1022) unless it is back before.
"""

from __future__ import annotations

import pytest

from app.dmq.errors import UnknownNodeError
from app.dmq.events import Delivery, OutboxDropped, SendCompleted
from app.dmq.nodes import NodeStatus
from app.dmq.peers import ORIGIN_HEADER
from app.dmq.sip import SipRequest, SipUri
from app.dmq.transaction import TimerSettings
from tests.dmq.helpers import Cluster, Member, Wire

TIMERS = TimerSettings(t1=0.5, t2=4.0, t4=5.0, timer_f=2.0)
A, B = 7001, 7002


def pair(**settings: object) -> tuple[Cluster, Member, Member]:
    cluster = Cluster()
    a = cluster.add(A, timers=TIMERS, **settings)
    b = cluster.add(B, [A], timers=TIMERS, **settings)
    assert a.statuses() == {B: NodeStatus.ACTIVE}
    return cluster, a, b


def b_disabled(**settings: object) -> tuple[Cluster, Member, Member]:
    """A pair in which A holds B as disabled (B is down)."""
    cluster, a, b = pair(**settings)
    cluster.advance(0.5)
    b.up = False
    cluster.advance_to(1012.5)
    assert a.statuses() == {B: NodeStatus.DISABLED}
    return cluster, a, b


def dropped(member: Member) -> list[OutboxDropped]:
    member.events.extend(iter(member.node.next_event, None))
    return [e for e in member.events if isinstance(e, OutboxDropped)]


def htable_requests(cluster: Cluster, since: int) -> list[SipRequest]:
    out = []
    for wire in cluster.trace[since:]:
        request = wire.request()
        if request is not None and request.uri.startswith("sip:htable@"):
            out.append(request)
    return out


def test_a_node_disabled_during_20_broadcasts_gets_all_20_in_order_when_it_answers() -> None:
    cluster, a, b = b_disabled()
    operations = []
    for i in range(20):
        operations.append(a.node.broadcast("htable", f"m{i}".encode(), None, cluster.now))
        cluster.advance(0.2)
    assert all(op.done for op in operations)
    assert {r.outcome for op in operations for r in op.results} == {Delivery.QUEUED}
    [box] = a.node.outboxes()
    assert (box.node.effective_port, box.messages, box.in_flight) == (B, 20, 0)
    assert b.received == []
    b.up = True
    since = len(cluster.trace)
    cluster.advance_to(1021)  # A's ping at 1020 is answered: B is active again
    assert a.statuses() == {B: NodeStatus.ACTIVE}
    assert [m.body for m in b.received] == [f"m{i}".encode() for i in range(20)]
    assert len(htable_requests(cluster, since)) == 20  # no loss, so no retransmission
    assert a.node.outboxes() == []
    stats = a.node.stats
    assert (stats.outbox_queued, stats.outbox_resent, stats.outbox_delivered) == (20, 20, 20)
    assert not stats.outbox_dropped
    # The operations completed once, when queued; the later delivery adds nothing.
    completed = [e.operation for e in a.events if isinstance(e, SendCompleted)]
    assert all(completed.count(op) == 1 for op in operations)
    assert all(len(op.results) == 1 for op in operations)


def test_resends_keep_a_window_in_flight() -> None:
    cluster, a, b = b_disabled(outbox_window=4)
    for i in range(10):
        a.node.broadcast("htable", f"m{i}".encode(), None, cluster.now)
    b.up = True
    held: list[Wire] = []
    cluster.drop = lambda wire: (
        wire.destination.port == B and _is_htable(wire) and held.append(wire) is None
    )
    cluster.advance_to(1020.1)
    [box] = a.node.outboxes()
    assert box.in_flight == 4
    assert [r.body for w in held if (r := w.request()) is not None] == [
        f"m{i}".encode() for i in range(4)
    ]
    cluster.drop = lambda wire: False
    cluster.advance_to(1021)
    assert [m.body for m in b.received] == [f"m{i}".encode() for i in range(10)]


def _is_htable(wire: Wire) -> bool:
    request = wire.request()
    return request is not None and request.uri.startswith("sip:htable@")


def test_a_timed_out_message_is_resent_once_the_node_answers_again() -> None:
    cluster, a, b = pair()
    # B's htable requests are lost for a while; its pings still get through.
    cluster.drop = lambda wire: wire.destination.port == B and _is_htable(wire)
    first = a.node.broadcast("htable", b"one", None, cluster.now)
    cluster.advance(2.1)
    [result] = first.results
    assert (result.code, result.timed_out, result.outcome) == (408, True, Delivery.QUEUED)
    # B is still active, but its outbox is in use: the next message waits behind.
    second = a.node.broadcast("htable", b"two", None, cluster.now)
    assert [r.outcome for r in second.results] == [Delivery.QUEUED]
    assert a.statuses() == {B: NodeStatus.ACTIVE}
    cluster.drop = lambda wire: False
    cluster.advance_to(1011)  # B answers A's ping at 1010
    assert [m.body for m in b.received] == [b"one", b"two"]
    assert a.node.stats.outbox_delivered == 2 and a.node.outboxes() == []


def test_extra_headers_are_kept_for_the_resend() -> None:
    cluster, a, b = b_disabled()
    origin = "<sip:127.0.0.1:7001>;epoch=1;seq=9"
    a.node.broadcast("htable", b"kept", None, cluster.now, headers=[(ORIGIN_HEADER, origin)])
    b.up = True
    since = len(cluster.trace)
    cluster.advance_to(1021)
    [message] = b.received
    assert (message.body, message.origin) == (b"kept", origin)
    [request] = htable_requests(cluster, since)
    assert request.headers.get("x-dmq-origin") == origin


def test_the_count_bound_drops_the_newest_messages_and_counts_them() -> None:
    cluster, a, b = b_disabled(outbox_max_messages=3)
    operations = [a.node.broadcast("htable", b"x", None, cluster.now) for _ in range(5)]
    assert [op.results[0].outcome for op in operations] == [Delivery.QUEUED] * 3 + [
        Delivery.DROPPED
    ] * 2
    assert "count" in operations[3].results[0].reason
    assert a.node.stats.outbox_dropped == {"count": 2}
    assert [(e.node.effective_port, e.peer_id, e.count, e.reason) for e in dropped(a)] == [
        (B, "htable", 1, "count")
    ] * 2
    b.up = True
    cluster.advance_to(1021)
    assert len(b.received) == 3


def test_the_byte_bound_drops_and_counts() -> None:
    cluster, a, _ = b_disabled(outbox_max_bytes=250)
    outcomes = [
        a.node.broadcast("htable", b"x" * 100, None, cluster.now).results[0].outcome
        for _ in range(3)
    ]
    assert outcomes == [Delivery.QUEUED, Delivery.QUEUED, Delivery.DROPPED]
    assert a.node.stats.outbox_dropped == {"bytes": 1}
    [box] = a.node.outboxes()
    assert (box.messages, box.bytes) == (2, 200)


def test_the_age_bound_drops_old_messages_on_the_timer() -> None:
    cluster, a, b = b_disabled(outbox_max_age=5.0)
    a.node.broadcast("htable", b"old", None, cluster.now)  # at 1012.5
    cluster.advance(3)
    a.node.broadcast("htable", b"new", None, cluster.now)  # at 1015.5
    cluster.advance_to(1017.4)
    assert a.node.outboxes()[0].messages == 2
    cluster.advance_to(1017.6)
    [box] = a.node.outboxes()
    assert (box.messages, box.oldest) == (1, 1015.5)
    assert a.node.stats.outbox_dropped == {"age": 1}
    assert [(e.count, e.reason) for e in dropped(a)] == [(1, "age")]
    b.up = True
    cluster.advance_to(1021)
    assert [m.body for m in b.received] == [b"new"]


def test_a_removed_nodes_outbox_is_parked_and_dropped_when_the_park_expires() -> None:
    cluster, a, _b = b_disabled(outbox_max_age=40.0)
    for _ in range(3):
        a.node.broadcast("htable", b"x", None, cluster.now)  # at 1012.5
    cluster.advance_to(1022.5)  # B misses the ping at 1020 too: removed at 1022, parked
    assert B not in a.statuses()
    assert b":7002" not in a.node.nodes.body(), "Kamailio's rule: our list stops naming B"
    [box] = a.node.outboxes()
    assert (box.node.effective_port, box.messages, box.parked) == (B, 3, True)
    assert a.node.stats.outbox_parked == 1 and not a.node.stats.outbox_dropped
    # A broadcast made while B is removed still waits for it.
    late = a.node.broadcast("other", b"y", None, cluster.now)
    assert [t.effective_port for t in late.targets] == [B]
    assert [r.outcome for r in late.results] == [Delivery.QUEUED]
    cluster.advance_to(1052.6)  # the three from 1012.5 reach the age bound
    assert a.node.stats.outbox_dropped == {"age": 3}
    cluster.advance_to(1062.1)  # 40 s after the removal: the park expires
    assert a.node.outboxes() == []
    assert a.node.stats.outbox_dropped == {"age": 3, "expired": 1}
    assert sorted((e.peer_id, e.count, e.reason) for e in dropped(a)) == [
        ("htable", 3, "age"),
        ("other", 1, "expired"),
    ]
    # B is gone for good now: a broadcast no longer waits for it.
    assert a.node.broadcast("htable", b"z", None, cluster.now).targets == ()


def test_a_node_cut_off_for_five_pings_gets_every_message_in_order_once_healed() -> None:
    cluster, a, b = pair()
    cut = True
    cluster.drop = lambda wire: cut and B in (wire.source.port, wire.destination.port)
    operations = []
    for i in range(50):  # one a second, from 1000 to 1049, while B is cut off
        operations.append(a.node.broadcast("htable", f"m{i}".encode(), None, cluster.now))
        cluster.advance(1.0)
    assert B not in a.statuses()
    # B, alone, holds A again as a notification address it tries to join through.
    assert b.statuses() == {A: NodeStatus.NOT_ACTIVE}
    assert all(op.done for op in operations)
    assert {r.outcome for op in operations for r in op.results} == {Delivery.QUEUED}
    assert b.received == []
    cut = False
    cluster.advance(11.0)  # the next pings get through
    assert a.statuses() == {B: NodeStatus.ACTIVE} and b.statuses() == {A: NodeStatus.ACTIVE}
    assert [m.body for m in b.received] == [f"m{i}".encode() for i in range(50)]
    assert a.node.outboxes() == [] and not a.node.stats.outbox_dropped
    stats = a.node.stats
    assert (stats.outbox_parked, stats.outbox_unparked, stats.outbox_delivered) == (1, 1, 50)


def test_a_killed_node_restarted_on_the_same_address_gets_what_it_missed() -> None:
    cluster, a, b = pair()
    cluster.advance(0.5)
    b.up = False  # kill -9 at 1000.5
    for i in range(30):
        a.node.broadcast("htable", f"m{i}".encode(), None, cluster.now)
        cluster.advance(1.0)
    assert B not in a.statuses()  # removed at 1022
    fresh = cluster.add(B, [A], timers=TIMERS)  # a new process on the same address
    # Its join is the node speaking for itself: A takes it back and resends at once.
    assert a.statuses() == {B: NodeStatus.ACTIVE}
    assert [m.body for m in fresh.received] == [f"m{i}".encode() for i in range(30)]
    assert a.node.outboxes() == [] and not a.node.stats.outbox_dropped


def test_a_parked_node_that_answers_a_ping_is_taken_back() -> None:
    """A and B lose each other while both keep C: neither is alone, so neither joins
    again; A pings the parked B, and B's answer alone brings it back."""
    cluster = Cluster()
    a = cluster.add(A, timers=TIMERS)
    b = cluster.add(B, [A], timers=TIMERS)
    c = cluster.add(7003, [A], timers=TIMERS)
    cluster.advance(1.0)
    assert a.statuses() == {B: NodeStatus.ACTIVE, 7003: NodeStatus.ACTIVE}
    cluster.drop = lambda wire: {wire.source.port, wire.destination.port} == {A, B}
    cluster.advance_to(1022.5)
    assert B not in a.statuses() and b.statuses() == {7003: NodeStatus.ACTIVE}
    operation = a.node.broadcast("htable", b"while-cut", None, cluster.now)
    [for_b] = [r for r in operation.results if r.node.effective_port == B]
    assert for_b.outcome is Delivery.QUEUED
    cluster.flush()
    assert c.received[-1].body == b"while-cut"
    # Healed, except that B's own requests to A are still lost: only B's answers to
    # A's pings reach A.
    cluster.drop = lambda wire: (
        (wire.source.port, wire.destination.port) == (B, A) and wire.request() is not None
    )
    mark = len(cluster.status_events(a))
    cluster.advance_to(1030.5)  # A's ping at 1030
    assert a.statuses()[B] is NodeStatus.ACTIVE
    back = [e for e in cluster.status_events(a)[mark:] if e.node.port == B]
    assert [(e.old, e.new, e.reason) for e in back] == [
        (None, NodeStatus.ACTIVE, "answered again after its removal")
    ]
    assert [m.body for m in b.received] == [b"while-cut"]


def test_a_send_to_a_parked_node_waits_in_its_outbox_and_is_expired_with_it() -> None:
    """A send to one node removed after missed pings is queued like a broadcast, not
    refused as an unknown node, while the node's outbox is parked; after the park
    expires the node is unknown again."""
    cluster, a, _b = b_disabled(outbox_max_age=40.0)
    cluster.advance_to(1022.5)  # removed at 1022, parked
    assert B not in a.statuses()
    uri = SipUri.parse(f"sip:127.0.0.1:{B}")
    operation = a.node.send("htable", b"one", None, uri, cluster.now)
    assert [r.outcome for r in operation.results] == [Delivery.QUEUED]
    assert [box.messages for box in a.node.outboxes()] == [1]
    cluster.advance_to(1062.1)  # the park expires: the message is dropped, counted
    assert a.node.stats.outbox_dropped == {"expired": 1}
    with pytest.raises(UnknownNodeError):
        a.node.send("htable", b"two", None, uri, cluster.now)


def test_a_node_that_left_gracefully_and_restarts_gets_what_was_sent_meanwhile() -> None:
    """A graceful leave makes B disabled at once; once gone, B misses a ping and is
    removed, and its outbox is parked like any other: a restart gets it."""
    cluster, a, b = pair()
    b.node.stop(cluster.now)
    cluster.flush()
    b.up = False
    assert a.statuses() == {B: NodeStatus.DISABLED}
    a.node.broadcast("htable", b"after-leave", None, cluster.now)
    cluster.advance_to(1012.5)  # the ping at 1010 is missed: removed
    assert B not in a.statuses()
    fresh = cluster.add(B, [A], timers=TIMERS)
    assert [m.body for m in fresh.received] == [b"after-leave"]


def test_an_operator_removal_of_a_parked_node_drops_its_outbox() -> None:
    cluster, a, b = b_disabled()
    a.node.broadcast("htable", b"x", None, cluster.now)
    cluster.advance_to(1022.5)
    a.node.broadcast("htable", b"y", None, cluster.now)
    assert [box.parked for box in a.node.outboxes()] == [True]
    a.node.remove_node(b.node.nodes.local.uri, cluster.now)
    assert a.node.outboxes() == [] and a.node.stats.outbox_dropped == {"removed": 2}
    assert [(e.count, e.reason) for e in dropped(a)] == [(2, "removed")]
    assert a.node.broadcast("htable", b"z", None, cluster.now).targets == ()
    fresh = cluster.add(B, [A], timers=TIMERS)
    assert fresh.received == []


def test_a_parked_outbox_keeps_the_count_bound() -> None:
    cluster, a, _ = b_disabled(outbox_max_messages=2)
    cluster.advance_to(1022.5)
    outcomes = [
        a.node.broadcast("htable", b"x", None, cluster.now).results[0].outcome for _ in range(3)
    ]
    assert outcomes == [Delivery.QUEUED, Delivery.QUEUED, Delivery.DROPPED]
    assert a.node.stats.outbox_dropped == {"count": 1}


def test_no_more_nodes_are_parked_than_max_nodes() -> None:
    """With max_nodes 1, a second parked node lets the first go (counted)."""
    cluster, a, _b = b_disabled(max_nodes=1)
    a.node.broadcast("htable", b"for-b", None, cluster.now)
    cluster.advance_to(1022.5)  # B removed and parked
    c = cluster.add(7003, [A], timers=TIMERS, max_nodes=1)
    assert a.statuses() == {7003: NodeStatus.ACTIVE}
    c.up = False
    a.node.broadcast("htable", b"for-both", None, cluster.now)
    cluster.advance(30.0)  # C misses two pings: parked, and B's park is let go
    assert a.statuses() == {}
    assert [(box.node.effective_port, box.parked) for box in a.node.outboxes()] == [(7003, True)]
    assert a.node.stats.outbox_dropped == {"park_limit": 2}


def test_an_operator_removal_drops_the_outbox() -> None:
    cluster, a, b = b_disabled()
    a.node.broadcast("htable", b"x", None, cluster.now)
    a.node.remove_node(b.node.nodes.local.uri, cluster.now)
    assert a.node.outboxes() == [] and a.node.stats.outbox_dropped == {"removed": 1}


def test_stopping_drops_and_counts_what_waits() -> None:
    cluster, a, _ = b_disabled()
    a.node.broadcast("htable", b"x", None, cluster.now)
    a.node.stop(cluster.now)
    assert a.node.outboxes() == [] and a.node.stats.outbox_dropped == {"stopped": 1}


def test_membership_messages_never_wait_in_an_outbox() -> None:
    cluster, a, _b = b_disabled()
    cluster.advance_to(1022.5)  # missed pings, a removal
    assert a.node.stats.outbox_queued == 0
    operation = a.node.stop(cluster.now)
    assert a.node.outboxes() == [] and a.node.stats.outbox_queued == 0
    assert operation.peer_id == "notification_peer"


def test_store_and_forward_can_be_turned_off() -> None:
    cluster, a, _ = b_disabled(outbox_max_messages=0)
    operation = a.node.broadcast("htable", b"x", None, cluster.now)
    assert [r.outcome for r in operation.results] == [Delivery.DROPPED]
    assert a.node.stats.outbox_dropped == {"count": 1}


def test_a_not_active_node_is_tried_at_once_and_gets_the_message_when_it_answers() -> None:
    cluster = Cluster()
    a = cluster.add(A, timers=TIMERS)
    b = cluster.add(B, timers=TIMERS, start=False)
    b.up = False  # not running yet
    node = a.node.add_node(b.node.nodes.local.uri, cluster.now)
    cluster.flush()
    assert node.status is NodeStatus.NOT_ACTIVE
    operation = a.node.send("htable", b"hi", None, node.uri, cluster.now)
    assert operation.results == []  # tried now: not known to be down
    cluster.advance(2.1)
    [result] = operation.results
    assert (result.code, result.timed_out, result.outcome) == (408, True, Delivery.QUEUED)
    b.up = True
    b.node.start(cluster.now)
    cluster.advance(10)  # A's ping at 1010 reaches it
    assert [m.body for m in b.received] == [b"hi"]
    assert a.node.stats.outbox_delivered == 1
