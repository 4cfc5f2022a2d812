"""Three dmq-gateway nodes as separate processes on 127.0.0.1, over UDP and over TCP.

Each node is ``python -m tests.support.node_process`` (the real ``DmqServer`` on real
sockets) driven over JSON lines by :class:`~tests.support.procs.NodeProcess`. B and C
join through A. Every test runs once per transport; over TCP every server address (and
so every notification address) carries ``;transport=tcp``.

Timers are the harness's FAST_TIMERS (T1 50 ms, T2 200 ms, Timer F 1 s) with pings
every second, unless a test says otherwise. Nothing sleeps blindly: every wait is a
``wait_until`` on something the nodes report.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.ports import free_port
from harness.waiting import wait_until
from tests.support.procs import NodeProcess

PING_INTERVAL = 1.0
#: Timer F of FAST_TIMERS.
TIMER_F = 1.0
#: Room for the event loops, the pipes and a busy 2-core machine on top of the
#: protocol's own bound.
SCHEDULING_MARGIN = 1.5
#: A graceful leave must show within this; a ping could not make a node disabled this
#: fast over UDP (that takes Timer F, 1 s, after a ping that goes unanswered).
LEAVE_BOUND = 0.5
PEER = "htable"
CONTENT_TYPE = "text/plain"


@dataclass
class Cluster:
    """Starts nodes for one test and remembers every process, for the teardown."""

    transport: str
    log_dir: Path
    started: list[NodeProcess] = field(default_factory=list)

    def node(
        self,
        name: str,
        *,
        port: int | None = None,
        notify: Iterable[str] = (),
        ping_interval: float = PING_INTERVAL,
        extra: list[str] | None = None,
        seed: int | None = None,
    ) -> NodeProcess:
        proc = NodeProcess(
            port if port is not None else free_port(),
            transport=self.transport,
            notify=list(notify),
            peers=(PEER,),
            ping_interval=ping_interval,
            extra=extra,
            log_path=self.log_dir / f"{name}.log",
            seed=seed,
        )
        self.started.append(proc)
        return proc

    def three(self, **options: Any) -> tuple[NodeProcess, NodeProcess, NodeProcess]:
        """A, then B and C joining through A; returns once all see all active."""
        a = self.node("a", **options).start()
        b = self.node("b", notify=[a.uri], **options).spawn()
        c = self.node("c", notify=[a.uri], **options).spawn()
        b.wait_ready()
        c.wait_ready()
        wait_all_active([a, b, c])
        return a, b, c

    def close(self) -> None:
        for proc in self.started:
            with contextlib.suppress(Exception):
                proc.kill()


@pytest.fixture(params=["udp", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def cluster(transport: str, tmp_path: Path) -> Iterator[Cluster]:
    """Kills every process the test started, whatever happened; on a failure pytest
    shows the end of each node's log (printed here, captured at teardown)."""
    nodes = Cluster(transport, tmp_path)
    try:
        yield nodes
    finally:
        nodes.close()
        for log in sorted(tmp_path.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()
            print(f"----- {log.name} (last 30 of {len(lines)} lines)")
            print("\n".join(lines[-30:]))


# ------------------------------------------------------------------ helpers


def wait_all_active(nodes: list[NodeProcess], timeout: float = 10.0) -> None:
    """Every node lists exactly the others, all active."""

    def converged() -> bool:
        return all(n.nodes() == {m.uri: "active" for m in nodes if m is not n} for n in nodes)

    wait_until(converged, timeout, "every node to list the others as active")


def bodies(node: NodeProcess) -> list[str]:
    return [m["body"] for m in list(node.messages)]


def has_body(node: NodeProcess, body: str) -> bool:
    return body in bodies(node)


def status_changes(node: NodeProcess, about: str, since: float) -> list[dict[str, Any]]:
    return [s for s in list(node.statuses) if s["node"] == about and s["at"] >= since]


def first_change(
    node: NodeProcess, about: str, since: float, new: str | None
) -> dict[str, Any] | None:
    for change in status_changes(node, about, since):
        if change["new"] == new:
            return change
    return None


def settle(sender: NodeProcess, receivers: list[NodeProcess], marker: str) -> None:
    """Broadcast a marker and wait until it reaches every receiver: whatever was sent
    before it has had time to arrive (or to arrive twice)."""
    result = sender.command("broadcast", peer=PEER, body=marker, content_type=CONTENT_TYPE)
    assert sorted(r["code"] for r in result["results"]) == [200] * len(receivers)
    wait_until(lambda: all(has_body(n, marker) for n in receivers), 10, f"marker {marker!r}")


def notifications_answered(node: NodeProcess) -> int:
    return int(node.command("stats")["received"].get("notification_peer:200", 0))


# ------------------------------------------------------------------ tests


def test_all_see_all_active(cluster: Cluster) -> None:
    # No ping in the test's lifetime: the lists must converge through the joins, A's
    # answers and A's one-hop propagation alone (protocol notes, section 4).
    a, b, c = cluster.three(ping_interval=30.0)
    for node in (a, b, c):
        listed = node.command("nodes")
        local = [n for n in listed if n["local"]]
        assert [n["uri"] for n in local] == [node.uri], "a node holds itself exactly once"
        others = {n["uri"]: n["status"] for n in listed if not n["local"]}
        assert others == {m.uri: "active" for m in (a, b, c) if m is not node}
        assert all(n["transport"] == cluster.transport for n in listed)
    # B and C never talk to each other before the first ping: they learn of each other
    # from A (its answer to a join, or its propagated list).
    for node, other in ((b, c), (c, b)):
        learned = [s for s in node.statuses if s["node"] == other.uri]
        assert learned and learned[0]["reason"] == f"listed by 127.0.0.1:{a.port}/{a.transport}"


def test_broadcast_reaches_each_node_once_and_send_only_its_node(cluster: Cluster) -> None:
    a, b, c = cluster.three()

    result = a.command("broadcast", peer=PEER, body="hello-all", content_type=CONTENT_TYPE)
    assert sorted(result["targets"]) == sorted([b.uri, c.uri])
    assert sorted((r["node"], r["code"]) for r in result["results"]) == sorted(
        [(b.uri, 200), (c.uri, 200)]
    )
    assert not any(r["timed_out"] for r in result["results"])
    settle(a, [b, c], "marker-1")
    for node in (b, c):
        got = [m for m in node.messages if m["body"] == "hello-all"]
        assert len(got) == 1, f"{node.uri} got the broadcast {len(got)} times"
        assert got[0]["peer"] == PEER
        assert got[0]["sender"] == a.uri
        assert got[0]["content_type"] == CONTENT_TYPE
    assert a.messages == [], "the sender must not deliver its own broadcast"

    result = a.command("send", peer=PEER, body="only-b", content_type=CONTENT_TYPE, node=b.uri)
    assert result["targets"] == [b.uri]
    assert [(r["node"], r["code"]) for r in result["results"]] == [(b.uri, 200)]
    settle(a, [b, c], "marker-2")
    assert bodies(b).count("only-b") == 1
    assert "only-b" not in bodies(c)
    assert a.messages == []
    assert Counter(bodies(b)) == {"hello-all": 1, "marker-1": 1, "only-b": 1, "marker-2": 1}
    assert Counter(bodies(c)) == {"hello-all": 1, "marker-1": 1, "marker-2": 1}


SENDS = 1000
#: Timer F = 64*T1 = Timer J (3.2 s), as RFC 3261 has it, and T2 100 ms. With 20 %
#: loss at each of the four sockets a request and its answer get through in one try
#: with probability 0.8**4 = 0.41; FAST_TIMERS (Timer F 1 s, 7 tries) leave about 2.5 %
#: of the sends without an answer (a local 408), which is what Timer F is for, not
#: what this test is about. A Timer F longer than Timer J would let a late
#: retransmission reach a server that has forgotten the transaction: a duplicate.
LOSS_TIMERS = ["--t2", "0.1", "--timer-f", "3.2"]


def test_thousand_sends_each_delivered_once(cluster: Cluster) -> None:
    """UDP: 20 % of the datagrams dropped at every node, in and out; retransmissions
    recover every loss and the receiver's server transactions absorb every duplicate.
    TCP: the drop seam is UDP datagrams only, so this checks that a reliable transport
    delivers everything once with no retransmission at all."""
    lossy = cluster.transport == "udp"
    extra = [*LOSS_TIMERS, *(["--drop-rate", "0.2"] if lossy else [])]
    a, b, c = cluster.three(ping_interval=5.0, extra=extra, seed=7)
    before_a = a.command("stats")
    before_b = b.command("stats")

    result = a.command(
        "send_many",
        peer=PEER,
        node=b.uri,
        count=SENDS,
        prefix="m-",
        concurrency=50,
        content_type=CONTENT_TYPE,
        timeout=90,
    )
    print(f"{cluster.transport}: {SENDS} sends in {result['elapsed']:.2f} s")
    assert Counter(result["codes"]) == {200: SENDS}
    settle(a, [b, c], "marker")

    got = Counter(body for body in bodies(b) if body.startswith("m-"))
    assert set(got) == {f"m-{i}" for i in range(SENDS)}
    duplicates = {body: n for body, n in got.items() if n > 1}
    assert not duplicates, f"delivered more than once: {sorted(duplicates)[:10]}"
    assert not [body for body in bodies(c) if body.startswith("m-")]

    stats_a = a.command("stats")
    stats_b = b.command("stats")
    retransmitted = stats_a["retransmissions_sent"] - before_a["retransmissions_sent"]
    absorbed = (stats_b["responses_resent"] - before_b["responses_resent"]) + (
        stats_b["retransmissions_absorbed"] - before_b["retransmissions_absorbed"]
    )
    print(
        f"{cluster.transport}: A retransmitted {retransmitted}, B answered or absorbed "
        f"{absorbed} retransmissions; dropped A {stats_a['dropped_datagrams']}, "
        f"B {stats_b['dropped_datagrams']}"
    )
    assert stats_b["received"].get(f"{PEER}:200", 0) == SENDS + 1  # + the marker
    if lossy:
        assert stats_a["dropped_datagrams"] > 0 and stats_b["dropped_datagrams"] > 0
        assert retransmitted > 0
        # Hundreds are expected (about 0.6 per send); pings add a handful at most, so
        # this many proves retransmitted sends reached B and were not delivered again.
        assert absorbed >= 100
    else:
        assert stats_a["dropped_datagrams"] == 0
        assert retransmitted == 0, "nothing is retransmitted over TCP"
        assert absorbed == 0


def test_killed_node_is_disabled_then_removed_then_rejoins(cluster: Cluster) -> None:
    a, b, c = cluster.three()
    bound = PING_INTERVAL + TIMER_F + SCHEDULING_MARGIN

    killed_at = time.monotonic()
    c.kill()

    def disabled_everywhere() -> bool:
        return all(first_change(n, c.uri, killed_at, "disabled") for n in (a, b))

    wait_until(disabled_everywhere, bound + 2, f"A and B to mark {c.uri} disabled")
    disabled = {n.uri: first_change(n, c.uri, killed_at, "disabled") for n in (a, b)}
    for node in (a, b):
        change = disabled[node.uri]
        assert change is not None
        elapsed = change["at"] - killed_at
        print(f"{cluster.transport}: {node.uri} marked C disabled {elapsed:.3f} s after kill")
        assert change["old"] == "active"
        assert change["reason"] == "did not answer"
        assert elapsed <= bound, f"disabled after {elapsed:.2f} s, bound {bound} s"

    def removed_everywhere() -> bool:
        return all(first_change(n, c.uri, killed_at, None) for n in (a, b))

    wait_until(removed_everywhere, 2 * bound + 2, f"A and B to remove {c.uri}")
    for node in (a, b):
        change = first_change(node, c.uri, killed_at, None)
        first = disabled[node.uri]
        assert change is not None and first is not None
        after = change["at"] - first["at"]
        print(f"{cluster.transport}: {node.uri} removed C {after:.3f} s after disabling it")
        assert change["old"] == "disabled"
        assert change["reason"] == "missed a second ping"
        assert 0 <= after <= bound
        # Disabled, then removed, and nothing in between.
        assert [s["new"] for s in status_changes(node, c.uri, killed_at)] == [
            "disabled",
            None,
        ]
        assert c.uri not in node.nodes()

    # A new process on the same port, joining through the same notification address.
    restarted_at = time.monotonic()
    c2 = cluster.node("c-restarted", port=c.port, notify=[a.uri]).start()
    assert c2.uri == c.uri
    wait_all_active([a, b, c2], timeout=4 * PING_INTERVAL + 5)
    print(
        f"{cluster.transport}: C active again everywhere "
        f"{time.monotonic() - restarted_at:.3f} s after restart"
    )
    for node in (a, b):
        assert first_change(node, c.uri, restarted_at, "active") is not None
    assert c2.inits == [PEER]


def test_graceful_stop_disables_at_once(cluster: Cluster) -> None:
    a, b, c = cluster.three()

    stopped_at = time.monotonic()
    b.stop()
    assert b.proc is not None and b.proc.returncode == 0
    assert b.stopped.is_set()

    def disabled_everywhere() -> bool:
        return all(first_change(n, b.uri, stopped_at, "disabled") for n in (a, c))

    wait_until(disabled_everywhere, 5, f"A and C to mark {b.uri} disabled")
    for node in (a, c):
        change = status_changes(node, b.uri, stopped_at)[0]
        elapsed = change["at"] - stopped_at
        print(f"{cluster.transport}: {node.uri} marked B disabled {elapsed:.3f} s after stop")
        # The first change is the leave notice itself, not a missed ping.
        assert (change["old"], change["new"]) == ("active", "disabled")
        assert change["reason"] == "left the bus"
        assert elapsed < LEAVE_BOUND, f"disabled {elapsed:.2f} s after the stop"
    # The others carry on between themselves.
    assert a.nodes()[c.uri] == "active"
    assert c.nodes()[a.uri] == "active"


def test_init_hook_runs_once_after_joining(cluster: Cluster) -> None:
    a = cluster.node("a").start()
    assert a.inits == [], "a seed runs its init hooks on the first notification only"
    b = cluster.node("b", notify=[a.uri]).start()
    wait_until(lambda: b.inits and a.inits, 5, "A's and B's init hooks")
    assert b.inits == [PEER]
    assert a.inits == [PEER]

    # C joins: A passes its changed list on to B, which must not run the hook again;
    # nor must the pings that follow.
    c = cluster.node("c", notify=[a.uri]).start()
    wait_all_active([a, b, c])
    answered = notifications_answered(b)
    wait_until(
        lambda: notifications_answered(b) >= answered + 4,
        6 * PING_INTERVAL,
        "B to answer four more pings",
    )
    assert b.inits == [PEER]
    assert a.inits == [PEER]
    assert c.inits == [PEER]
