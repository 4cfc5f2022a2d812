"""The cap on user messages in flight to one node (NodeConfig.max_in_flight_per_node),
on a fake clock with in-memory wires: a burst never puts more requests on the way to a
node than the cap, and what waits its turn goes out in order, with its real result."""

from __future__ import annotations

import pytest

from app.dmq.config import NodeConfig
from app.dmq.errors import ConfigError
from app.dmq.events import Delivery
from app.dmq.nodes import NodeStatus
from app.dmq.transaction import TimerSettings
from tests.dmq.helpers import Cluster, uri

TIMERS = TimerSettings(t1=0.5, t2=4.0, t4=5.0, timer_f=2.0)
A, B, C = 7101, 7102, 7103


def htable_wires(cluster: Cluster, since: int, port: int) -> list[bytes]:
    out = []
    for wire in cluster.trace[since:]:
        request = wire.request()
        if (
            request is not None
            and request.uri.startswith("sip:htable@")
            and wire.destination.port == port
        ):
            out.append(request.body)
    return out


def test_a_burst_is_held_to_the_cap_and_sent_in_order_as_answers_come() -> None:
    cluster = Cluster()
    a = cluster.add(A, timers=TIMERS, max_in_flight_per_node=4)
    b = cluster.add(B, [A], timers=TIMERS)
    cluster.add(C, [A], timers=TIMERS)
    cluster.flush()
    assert a.statuses() == {B: NodeStatus.ACTIVE, C: NodeStatus.ACTIVE}
    since = len(cluster.trace)
    operations = [
        a.node.broadcast("htable", f"m{i}".encode(), None, cluster.now) for i in range(10)
    ]
    cluster.collect()
    # Nothing delivered yet: only the cap's worth is on the way to each node.
    assert htable_wires(cluster, since, B) == [f"m{i}".encode() for i in range(4)]
    assert htable_wires(cluster, since, C) == [f"m{i}".encode() for i in range(4)]
    assert not any(op.done for op in operations)
    cluster.flush()
    # Each answer let the next one go: all ten reached both nodes once, in order.
    assert htable_wires(cluster, since, B) == [f"m{i}".encode() for i in range(10)]
    assert [m.body for m in b.received] == [f"m{i}".encode() for i in range(10)]
    assert all(op.done for op in operations)
    assert {(r.code, r.outcome) for op in operations for r in op.results} == {
        (200, Delivery.DELIVERED)
    }
    assert a.node._lanes == {}  # nothing left waiting or counted


def test_sends_and_broadcasts_to_one_node_share_its_turns() -> None:
    cluster = Cluster()
    a = cluster.add(A, timers=TIMERS, max_in_flight_per_node=2)
    b = cluster.add(B, [A], timers=TIMERS)
    since = len(cluster.trace)
    a.node.broadcast("htable", b"b0", None, cluster.now)
    a.node.send("htable", b"s1", None, uri(B), cluster.now)
    a.node.broadcast("htable", b"b2", None, cluster.now)
    a.node.send("htable", b"s3", None, uri(B), cluster.now)
    cluster.collect()
    assert htable_wires(cluster, since, B) == [b"b0", b"s1"]
    cluster.flush()
    assert [m.body for m in b.received] == [b"b0", b"s1", b"b2", b"s3"]


def test_messages_waiting_their_turn_when_the_node_stops_are_dropped_with_a_result() -> None:
    cluster = Cluster()
    a = cluster.add(A, timers=TIMERS, max_in_flight_per_node=1)
    cluster.add(B, [A], timers=TIMERS)
    operations = [a.node.broadcast("htable", b"x", None, cluster.now) for _ in range(3)]
    a.node.stop(cluster.now)
    waiting = operations[1:]
    assert all(op.done for op in waiting)
    assert [r.reason for op in waiting for r in op.results] == ["dropped: node stopped"] * 2
    assert {r.outcome for op in waiting for r in op.results} == {Delivery.DROPPED}


@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_a_cap_below_one_is_refused_naming_the_setting(value: object) -> None:
    with pytest.raises(ConfigError, match=r"max_in_flight_per_node.*at least 1"):
        NodeConfig(server_address=uri(A), max_in_flight_per_node=value)  # type: ignore[arg-type]
