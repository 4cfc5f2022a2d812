"""Whole buses of cores on in-memory wires and one fake clock (tests.dmq.helpers).

Every node pings every 10 s and Timer F is 32 s (T1 = 0.5 s), so a node that stops
answering is seen at the first ping after it died plus 32 s.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from app.dmq.events import Delivery
from app.dmq.nodes import NodeStatus
from app.dmq.sip import SipUri
from tests.dmq.helpers import Cluster, Member, Wire, uri

PING = 10.0
TIMER_F = 32.0
ACTIVE = NodeStatus.ACTIVE
DISABLED = NodeStatus.DISABLED


def all_active(cluster: Cluster, members: list[Member] | None = None) -> bool:
    members = members or [m for m in cluster.members.values() if m.up]
    ports = {m.port for m in members}
    return all(m.statuses() == dict.fromkeys(ports - {m.port}, ACTIVE) for m in members)


def build(cluster: Cluster, size: int, topology: str, transport: str = "udp") -> list[Member]:
    members = [cluster.add(5001, transport=transport)]
    for index in range(1, size):
        port = 5001 + index
        seed = 5001 if topology == "star" else port - 1
        members.append(cluster.add(port, [seed], transport=transport))
    return members


# --------------------------------------------------------------------------- joining


@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize("topology", ["star", "chain"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_nodes_join_and_all_see_all_active(size: int, topology: str, transport: str) -> None:
    cluster = Cluster()
    members = build(cluster, size, topology, transport)
    assert all_active(cluster), {m.port: m.statuses() for m in members}
    cluster.advance(3 * PING)
    assert all_active(cluster), "pings keep everyone active"


def test_nodes_started_together_find_each_other() -> None:
    cluster = Cluster()
    a = cluster.add(5001, start=False)
    b = cluster.add(5002, [5001], start=False)
    c = cluster.add(5003, [5002], start=False)
    for member in (a, b, c):
        member.node.start(cluster.now)
    cluster.flush()
    cluster.advance(PING)
    assert all_active(cluster)


def test_a_join_is_passed_on_exactly_one_hop() -> None:
    cluster = Cluster()
    cluster.add(5001)
    cluster.add(5002, [5001])
    mark = len(cluster.trace)
    cluster.add(5003, [5001])
    assert cluster.notifications(mark) == [
        (5003, 5001, 2),  # the join
        (5001, 5002, 1),  # passed on once, to every active node...
        (5001, 5003, 1),  # ...the joiner included, and no further
    ]
    assert all_active(cluster)


# --------------------------------------------------------------------------- failure


def test_dead_node_is_disabled_after_one_missed_ping_and_removed_after_two() -> None:
    cluster = Cluster()
    a, b, c = build(cluster, 3, "star")
    cluster.advance(3.0)
    c.up = False  # killed at 1003; pings go out at 1010, 1020, ...
    cluster.advance_to(1010.0 + TIMER_F - 0.01)
    assert a.statuses()[5003] is ACTIVE
    cluster.advance_to(1010.0 + TIMER_F)  # the 1010 ping times out
    assert a.statuses()[5003] is DISABLED and b.statuses()[5003] is DISABLED
    assert a.statuses()[5002] is ACTIVE
    cluster.advance_to(1020.0 + TIMER_F - 0.01)
    assert a.statuses()[5003] is DISABLED
    cluster.advance_to(1020.0 + TIMER_F)  # the 1020 ping times out too
    assert a.statuses() == {5002: ACTIVE} and b.statuses() == {5001: ACTIVE}
    reasons = [(e.old, e.new, e.reason) for e in cluster.status_events(a) if e.node.port == 5003]
    assert reasons[-2:] == [
        (ACTIVE, DISABLED, "did not answer"),
        (DISABLED, None, "missed a second ping"),
    ]


def test_disabled_node_is_a_target_whose_messages_wait_in_its_outbox() -> None:
    """A broadcast is meant for every node held, disabled ones included: a disabled
    node's copy goes to its outbox (a send to it too), and the result says so."""
    cluster = Cluster()
    a, _, c = build(cluster, 3, "star")
    c.up = False
    cluster.advance_to(1010.0 + TIMER_F)
    assert a.statuses()[5003] is DISABLED
    operation = a.node.broadcast("htable", b"b", None, cluster.now)
    assert sorted(t.effective_port for t in operation.targets) == [5002, 5003]
    [queued] = [r for r in operation.results if r.node.effective_port == 5003]
    assert queued.outcome is Delivery.QUEUED and queued.code == 0
    operation = a.node.send("htable", b"s", None, uri(5003), cluster.now)
    assert [t.effective_port for t in operation.targets] == [5003]
    assert [r.outcome for r in operation.results] == [Delivery.QUEUED] and operation.done
    [box] = a.node.outboxes()
    assert (box.node.effective_port, box.messages) == (5003, 2)


def test_restarted_node_is_active_everywhere_again() -> None:
    cluster = Cluster()
    a, b, _ = build(cluster, 3, "star")
    cluster.members[5003].up = False
    cluster.advance_to(1020.0 + TIMER_F + 1)
    assert 5003 not in a.statuses() and 5003 not in b.statuses()
    fresh = cluster.add(5003, [5001])  # a new process, a fresh core, the same port
    assert fresh.statuses() == {5001: ACTIVE, 5002: ACTIVE}
    assert a.statuses()[5003] is ACTIVE
    cluster.advance(PING)  # its first ping speaks for itself to b
    assert all_active(cluster)
    cluster.advance(5 * PING)
    assert all_active(cluster)


def test_node_restarted_before_removal_is_active_everywhere_again() -> None:
    cluster = Cluster()
    build(cluster, 3, "star")
    cluster.members[5003].up = False
    cluster.advance_to(1010.0 + TIMER_F + 1)
    assert cluster.members[5001].statuses()[5003] is DISABLED
    cluster.add(5003, [5002])
    cluster.advance(PING)
    assert all_active(cluster)


def test_graceful_leave_disables_the_node_everywhere_at_once() -> None:
    cluster = Cluster()
    a, b, c, d = build(cluster, 4, "star")
    cluster.advance(2.0)
    mark = len(cluster.trace)
    operation = c.node.stop(cluster.now)
    cluster.flush()
    assert cluster.notifications(mark) == [(5003, 5001, 1), (5003, 5002, 1), (5003, 5004, 1)]
    for member in (a, b, d):
        assert member.statuses()[5003] is DISABLED
        others = {m.port for m in (a, b, d)} - {member.port}
        assert all(member.statuses()[p] is ACTIVE for p in others)
    assert sorted(r.code for r in operation.results) == [200, 200, 200]
    # The process lingers until the driver has the answers; a ping meanwhile must not
    # bring it back.
    cluster.advance_to(1010.5)
    assert a.statuses()[5003] is DISABLED
    c.up = False
    # The next ping (1020) is missed: a disabled node that misses a ping is removed.
    cluster.advance_to(1020.0 + TIMER_F)
    for member in (a, b, d):
        assert 5003 not in member.statuses()
    assert all_active(cluster, [a, b, d])


def test_stopped_node_sends_nothing_more() -> None:
    cluster = Cluster()
    _, _, c = build(cluster, 3, "star")
    c.node.stop(cluster.now)
    cluster.flush()
    mark = len(cluster.trace)
    cluster.advance(5 * PING)
    from_c = [w for w in cluster.trace[mark:] if w.source.port == 5003]
    assert from_c, "it still answers the pings that reach it"
    assert [w.request() for w in from_c] == [None] * len(from_c), "but sends no request"


# --------------------------------------------------------------------------- identity


def test_node_whose_notification_address_is_itself_never_holds_itself() -> None:
    cluster = Cluster()
    lonely = cluster.add(5001, [5001])
    assert lonely.statuses() == {}
    assert cluster.trace == [], "it does not notify itself"
    cluster.advance(3 * PING)
    assert lonely.statuses() == {}
    assert cluster.trace == []
    b = cluster.add(5002, [5001, 5002])
    assert b.statuses() == {5001: ACTIVE}
    assert lonely.statuses() == {5002: ACTIVE}
    cluster.advance(3 * PING)
    assert len(lonely.node.nodes) == 2 and len(b.node.nodes) == 2


def test_node_named_by_another_name_for_itself_never_holds_itself() -> None:
    def resolver(host: str) -> str:
        return {"self.test": "127.0.0.1", "node-b.test": "127.0.0.1"}.get(host, host)

    cluster = Cluster()
    a = cluster.add(5001, [SipUri.parse("sip:self.test:5001")], resolver=resolver)
    assert a.statuses() == {}
    # b announces itself by name; a's list, which includes b, comes back to b.
    b = cluster.add(5002, [5001], host="node-b.test", resolver=resolver)
    cluster.advance(3 * PING)
    assert a.statuses() == {5002: ACTIVE} and b.statuses() == {5001: ACTIVE}
    assert len(a.node.nodes) == 2 and len(b.node.nodes) == 2


def test_a_name_and_its_address_are_one_node() -> None:
    def resolver(host: str) -> str:
        return {"node-a.test": "127.0.0.1"}.get(host, host)

    cluster = Cluster()
    a = cluster.add(5001, host="node-a.test", resolver=resolver)
    # b knows a by address, a announces itself by name; c knows a by name.
    b = cluster.add(5002, [5001], resolver=resolver)
    c = cluster.add(5003, [SipUri.parse("sip:node-a.test:5001")], resolver=resolver)
    cluster.advance(3 * PING)
    assert all_active(cluster)
    # One entry each, under the name it was first learned by.
    for member, known_as in ((b, "sip:127.0.0.1:5001"), (c, "sip:node-a.test:5001")):
        assert len(member.node.nodes) == 3
        assert [str(n.uri) for n in member.node.nodes.others() if n.port == 5001] == [known_as]
    assert len(a.node.nodes) == 3


# --------------------------------------------------------------------------- ghosts


def cut(a: int, b: int) -> Callable[[Wire], bool]:
    def drop(wire: Wire) -> bool:
        return {wire.source.port, wire.destination.port} == {a, b}

    return drop


def test_removed_node_is_not_revived_by_a_third_partys_stale_list() -> None:
    cluster = Cluster()
    a, b, c = build(cluster, 3, "star")
    cluster.drop = cut(5001, 5003)
    cluster.advance_to(1020.0 + TIMER_F)
    assert 5003 not in a.statuses()
    assert b.statuses()[5003] is ACTIVE, "b still talks to c"
    # b pings a every 10 s with a list that names c active; a does not take it back.
    mark = len(a.events)
    cluster.advance(2 * PING)
    assert 5003 not in a.statuses()
    assert [e for e in cluster.status_events(a)[mark:] if e.node.port == 5003] == []
    # c speaks for itself (an operator adds a back on c): a takes c back at once.
    cluster.drop = lambda wire: False
    c.node.add_node(uri(5001), cluster.now)
    cluster.flush()
    assert a.statuses()[5003] is ACTIVE
    assert c.statuses()[5001] is ACTIVE


def test_disabled_node_is_not_reactivated_by_a_third_party() -> None:
    cluster = Cluster()
    a, _, _ = build(cluster, 3, "star")
    cluster.drop = cut(5001, 5003)
    cluster.advance_to(1010.0 + TIMER_F)
    assert a.statuses()[5003] is DISABLED
    cluster.advance_to(1020.0 + TIMER_F - 0.01)  # b's 1020 ping listed c as active
    assert a.statuses()[5003] is DISABLED


def test_restarted_node_comes_back_by_its_own_message_despite_the_tombstone() -> None:
    cluster = Cluster()
    a, b, _ = build(cluster, 3, "star")
    cluster.members[5003].up = False
    cluster.advance_to(1020.0 + TIMER_F + 1)  # removed by a and b
    cluster.add(5003, [5002])
    assert b.statuses()[5003] is ACTIVE
    cluster.advance(PING)
    assert a.statuses()[5003] is ACTIVE


# --------------------------------------------------------------------------- init hooks


def test_init_hooks_run_once_when_a_node_first_reaches_an_active_node() -> None:
    cluster = Cluster()
    a = cluster.add(5001)
    cluster.advance(2 * PING)
    assert a.init_calls == {}, "alone, the seed has no one to sync from"
    b = cluster.add(5002, [5001])
    assert a.init_calls == {"htable": 1} and b.init_calls == {"htable": 1}
    c = cluster.add(5003, [5002])
    cluster.advance(5 * PING)
    assert [m.init_calls for m in (a, b, c)] == [{"htable": 1}] * 3


def test_init_hook_waits_until_the_notification_node_answers() -> None:
    cluster = Cluster()
    joiner = cluster.add(5002, [5001])  # nobody on 5001 yet
    cluster.advance(TIMER_F + 1)
    assert joiner.init_calls == {}
    seed = cluster.add(5001)
    cluster.advance(2 * PING)  # the lonely joiner re-joins at its next ping
    assert joiner.statuses() == {5001: ACTIVE}
    assert joiner.init_calls == {"htable": 1} and seed.init_calls == {"htable": 1}


def test_peer_registered_after_the_bus_is_up_runs_its_init_at_once() -> None:
    cluster = Cluster()
    a, _ = build(cluster, 2, "star")
    calls: list[str] = []
    a.node.register_peer("usrloc", lambda message: None, init=lambda: calls.append("usrloc"))
    assert calls == ["usrloc"]
    cluster.advance(3 * PING)
    assert calls == ["usrloc"]


# --------------------------------------------------------------------------- sending


def test_broadcast_reaches_every_active_node_exactly_once_with_one_result_each() -> None:
    cluster = Cluster()
    members = build(cluster, 5, "star")
    sender = members[2]
    operation = sender.node.broadcast("htable", b"to all", "text/plain", cluster.now)
    cluster.flush()
    assert sorted(t.effective_port for t in operation.targets) == [5001, 5002, 5004, 5005]
    for member in members:
        got = [m for m in member.received if m.body == b"to all"]
        assert len(got) == (0 if member is sender else 1)
        if got:
            assert got[0].sender == uri(5003) and got[0].content_type == "text/plain"
    assert sorted((r.node.port, r.code) for r in operation.results) == [
        (5001, 200),
        (5002, 200),
        (5004, 200),
        (5005, 200),
    ]
    completed = [e.operation for e in cluster.completed(sender)]
    assert completed.count(operation) == 1
    cluster.advance(TIMER_F + 10)
    assert len(operation.results) == 4, "no late duplicate results"
    assert all(len([m for m in x.received if m.body == b"to all"]) <= 1 for x in members)


def test_broadcast_skips_the_excluded_node() -> None:
    cluster = Cluster()
    a, *_ = build(cluster, 4, "star")
    operation = a.node.broadcast("htable", b"x", None, cluster.now, exclude=uri(5003))
    assert sorted(t.effective_port for t in operation.targets) == [5002, 5004]


def test_send_reaches_only_its_node() -> None:
    cluster = Cluster()
    members = build(cluster, 4, "star")
    operation = members[0].node.send("htable", b"just you", None, uri(5003), cluster.now)
    cluster.flush()
    assert [m.port for m in members if any(x.body == b"just you" for x in m.received)] == [5003]
    assert [(r.node.port, r.code) for r in operation.results] == [(5003, 200)]


def test_lossy_wires_deliver_every_send_exactly_once() -> None:
    cluster = Cluster(seed=7)
    a, b, _ = build(cluster, 3, "star")
    loss = random.Random(20)
    cluster.drop = lambda wire: loss.random() < 0.2
    operations = []
    for index in range(1000):
        body = f"message {index}".encode()
        operations.append(a.node.send("htable", body, None, uri(5002), cluster.now))
        if index % 50 == 49:
            cluster.flush()
            cluster.advance(0.1)
    cluster.flush()
    cluster.advance(TIMER_F + 10)
    bodies = [m.body for m in b.received]
    assert len(bodies) == 1000 and len(set(bodies)) == 1000, "each delivered exactly once"
    assert all(len(op.results) == 1 for op in operations), "every operation has a result"
    codes = sorted({op.results[0].code for op in operations})
    assert codes == [200]
    stats = b.node.transactions.stats
    assert stats.retransmissions_absorbed + stats.responses_resent > 100, (
        "the wires really lost messages and the server transactions absorbed the repeats"
    )
    assert len(cluster.completed(a)) >= 1000
