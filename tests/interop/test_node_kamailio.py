"""Our node on a bus of real Kamailio 5.6 nodes, over UDP and over TCP.

Kamailio runs with its shortest timers (``ping_interval`` 5 s, its minimum, and tm's
``fr_timer`` 2 s); our node runs in its own process (:mod:`tests.support.procs`) with
a 1 s ping interval and FAST_TIMERS. Every wait is on a condition, never a bare sleep.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from harness.kamailio import KamailioNode, KamailioNodeFactory, Transport
from harness.ports import free_port
from harness.waiting import wait_until
from tests.support.procs import NodeProcess

pytestmark = [
    pytest.mark.interop,
    pytest.mark.usefixtures("kamailio_required"),
    pytest.mark.timeout(60),
]

TRANSPORTS = pytest.mark.parametrize("transport", ["udp", "tcp"])

LOOPBACK = "127.0.0.1"
#: Kamailio's shortest ping interval, and its transaction timeout (tm fr_timer).
K_PING_INTERVAL = 5
K_FR_TIMER_MS = 2000
#: Our node's ping interval.
OUR_PING_INTERVAL = 1.0
#: Long enough for a join and its one-hop propagation, short of a ping cycle mattering.
JOIN_TIMEOUT = 10.0

OurNodeFactory = Callable[..., NodeProcess]


@pytest.fixture
def our_node(tmp_path: Path) -> Iterator[OurNodeFactory]:
    """A factory of started node processes (peer ``htable``); all stopped at teardown.

    ``our_node(transport, notify=[uri, ...])``; each node logs to ``tmp_path/ours-N.log``.
    """
    nodes: list[NodeProcess] = []

    def make(transport: Transport, notify: Sequence[str] = ()) -> NodeProcess:
        node = NodeProcess(
            free_port(),  # our node listens on UDP and TCP whatever its transport
            transport=transport,
            notify=list(notify),
            peers=("htable",),
            ping_interval=OUR_PING_INTERVAL,
            log_path=tmp_path / f"ours-{len(nodes)}.log",
        )
        nodes.append(node)
        node.start()
        return node

    try:
        yield make
    finally:
        for node in nodes:
            node.stop(timeout=5)
            node.kill()


# --------------------------------------------------------------------------- helpers


def expected_proto(transport: Transport) -> str:
    """``proto`` as ``dmq.list_nodes`` shows it: a URI without transport shows ``*``."""
    return "tcp" if transport == "tcp" else "*"


def kamailio_entry(k: KamailioNode, node: NodeProcess) -> dict[str, Any] | None:
    """Kamailio's entry for our node, or None when it does not list it.

    Fails if Kamailio holds our node twice (it compares URIs as strings: a From URI
    that differs from the line we list ourselves with would make a second entry).
    """
    entries = [
        dict(entry)
        for entry in k.list_nodes()
        if entry["host"] == LOOPBACK and entry["port"] == node.port and not entry["local"]
    ]
    assert len(entries) <= 1, f"{k.server_address} holds our node twice: {entries}"
    return entries[0] if entries else None


def kamailio_lists_active(k: KamailioNode, node: NodeProcess) -> bool:
    entry = kamailio_entry(k, node)
    return entry is not None and entry["status"] == "active"


def our_view(node: NodeProcess) -> dict[tuple[str, int, str], str]:
    """Our node's list, other nodes only: {(host, port, transport): status}."""
    return {
        (n["host"], n["port"], n["transport"]): n["status"]
        for n in node.command("nodes")
        if not n["local"]
    }


def we_list_active(node: NodeProcess, *ks: KamailioNode) -> bool:
    view = our_view(node)
    return all(view.get((LOOPBACK, k.port, k.transport)) == "active" for k in ks)


def kamailio_bus(
    kamailio_node: KamailioNodeFactory, transport: Transport, size: int
) -> list[KamailioNode]:
    """``size`` Kamailio nodes, the first the seed of the others, all listing each other."""
    seed = kamailio_node(transport=transport, fr_timer_ms=K_FR_TIMER_MS)
    ks = [seed]
    for _ in range(size - 1):
        ks.append(
            kamailio_node(
                transport=transport,
                notification_addresses=[seed.server_address],
                fr_timer_ms=K_FR_TIMER_MS,
            )
        )

    def formed() -> bool:
        return all(len(k.active_peers()) == size - 1 for k in ks)

    wait_until(formed, JOIN_TIMEOUT, f"a bus of {size} Kamailio nodes over {transport}")
    return ks


def holds_for(cond: Callable[[], bool], duration: float, what: str) -> None:
    """Check ``cond`` every 0.1 s for ``duration`` seconds; fail as soon as it is false."""
    deadline = time.monotonic() + duration
    while True:
        assert cond(), f"no longer true: {what}"
        if time.monotonic() >= deadline:
            return
        time.sleep(0.1)


def htable_messages(node: NodeProcess, key: str) -> list[dict[str, Any]]:
    """What reached our ``htable`` peer about ``key`` (sync requests have no cname)."""
    found = []
    for message in list(node.messages):
        if message.get("peer") != "htable":
            continue
        try:
            data = json.loads(message["body"])
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("cname") == key:
            found.append(message)
    return found


def both_lists(ours: NodeProcess, ks: Sequence[KamailioNode]) -> str:
    """The node lists on every side, for assertion messages."""
    return f"ours: {our_view(ours)}; " + "; ".join(
        f"{k.server_address}: {k.list_nodes()}" for k in ks
    )


# ----------------------------------------------------------------------------- tests


@TRANSPORTS
def test_our_node_joins_a_kamailio_bus(
    kamailio_node: KamailioNodeFactory, our_node: OurNodeFactory, transport: Transport
) -> None:
    """Ours joins through K1 and is passed on to K2: all three list each other active."""
    k1, k2 = kamailio_bus(kamailio_node, transport, 2)
    ours = our_node(transport, notify=[k1.server_address])

    def everyone_active() -> bool:
        return (
            kamailio_lists_active(k1, ours)
            and kamailio_lists_active(k2, ours)
            and we_list_active(ours, k1, k2)
        )

    wait_until(everyone_active, JOIN_TIMEOUT, "ours, K1 and K2 to list each other active")
    # Through a whole Kamailio ping interval: each Kamailio node pings us (and takes our
    # 200 and its list), we ping both about five times; nobody drops or doubles anyone.
    holds_for(everyone_active, K_PING_INTERVAL + 1, "ours, K1 and K2 list each other active")
    for k in (k1, k2):
        entry = kamailio_entry(k, ours)
        assert entry is not None
        assert entry["proto"] == expected_proto(transport), entry
        assert entry["resolved_ip"] == LOOPBACK, entry
        assert len(k.list_nodes()) == 3, both_lists(ours, (k1, k2))
    assert our_view(ours) == {
        (LOOPBACK, k1.port, transport): "active",
        (LOOPBACK, k2.port, transport): "active",
    }


@TRANSPORTS
def test_kamailio_joins_a_bus_seeded_by_our_node(
    kamailio_node: KamailioNodeFactory, our_node: OurNodeFactory, transport: Transport
) -> None:
    """K's notification address is ours: the two list each other active."""
    ours = our_node(transport)
    k = kamailio_node(
        transport=transport,
        notification_addresses=[ours.uri],
        fr_timer_ms=K_FR_TIMER_MS,
    )

    def both_active() -> bool:
        return kamailio_lists_active(k, ours) and we_list_active(ours, k)

    wait_until(both_active, JOIN_TIMEOUT, "K and ours to list each other active")
    entry = kamailio_entry(k, ours)
    assert entry is not None
    assert entry["proto"] == expected_proto(transport), entry
    assert our_view(ours) == {(LOOPBACK, k.port, transport): "active"}
    # K ran its htable init hook on joining: a sync request reached our htable peer.
    wait_until(
        lambda: any(json.loads(m["body"]) == {"action": 1} for m in list(ours.messages)),
        5,
        "K's htable sync request",
    )


@TRANSPORTS
def test_kamailio_htable_set_reaches_our_peer_exactly_once(
    kamailio_node: KamailioNodeFactory, our_node: OurNodeFactory, transport: Transport
) -> None:
    """htable.sets on K: our htable peer gets Kamailio's exact JSON, once, unretransmitted."""
    k = kamailio_node(transport=transport, fr_timer_ms=K_FR_TIMER_MS)
    ours = our_node(transport, notify=[k.server_address])
    wait_until(
        lambda: kamailio_lists_active(k, ours) and we_list_active(ours, k),
        JOIN_TIMEOUT,
        "K and ours to list each other active",
    )
    before = ours.command("stats")
    set_at = time.monotonic()

    key, value = f"greeting-{transport}", "hello from kamailio"
    k.htable_sets("ht", key, value)
    wait_until(lambda: bool(htable_messages(ours, key)), 5, "the htable set to reach our peer")

    (message,) = htable_messages(ours, key)
    assert json.loads(message["body"]) == {
        "action": 2,
        "htname": "ht",
        "cname": key,
        "type": 2,
        "strval": value,
        "mode": 1,
    }
    # Byte for byte what Kamailio 5.6 sends: compact JSON, fields in this order.
    assert message["body"] == (
        f'{{"action":2,"htname":"ht","cname":"{key}","type":2,"strval":"{value}","mode":1}}'
    )
    assert message["content_type"] == "application/json"
    assert message["sender"] == f"sip:{LOOPBACK}:{k.port}" + (
        ";transport=tcp" if transport == "tcp" else ""
    )

    # Settle past Kamailio's first two UDP retransmission times (+0.5 s and +1.5 s with
    # T1 = 0.5 s): had our 200 been late or lost, the request would have come again.
    holds_for(
        lambda: len(htable_messages(ours, key)) == 1,
        2.0 - (time.monotonic() - set_at),
        "exactly one delivery of the set",
    )
    after = ours.command("stats")
    assert after["retransmissions_absorbed"] - before["retransmissions_absorbed"] == 0
    assert after["responses_resent"] - before["responses_resent"] == 0
    assert after["received"].get("htable:200", 0) >= 1
    # Kamailio got our 200 and the value is stored there.
    assert k.htable_get("ht", key) == value


@TRANSPORTS
def test_our_htable_broadcast_is_applied_by_every_kamailio_node(
    kamailio_node: KamailioNodeFactory, our_node: OurNodeFactory, transport: Transport
) -> None:
    """Our broadcast of an htable set: 200 from both Kamailio nodes, value on both."""
    k1, k2 = kamailio_bus(kamailio_node, transport, 2)
    ours = our_node(transport, notify=[k1.server_address])
    wait_until(
        lambda: (
            we_list_active(ours, k1, k2)
            and kamailio_lists_active(k1, ours)
            and kamailio_lists_active(k2, ours)
        ),
        JOIN_TIMEOUT,
        "ours, K1 and K2 to list each other active",
    )

    key, value = f"KEY-{transport}", "VALUE"
    body = json.dumps(
        {"action": 2, "htname": "ht", "cname": key, "type": 2, "strval": value, "mode": 1},
        separators=(",", ":"),
    )
    reply = ours.command("broadcast", peer="htable", body=body, content_type="application/json")

    expected = {k1.server_address, k2.server_address}
    assert set(reply["targets"]) == expected
    results = {r["node"]: (r["code"], r["timed_out"]) for r in reply["results"]}
    assert results == {uri: (200, False) for uri in expected}
    for k in (k1, k2):
        assert k.htable_get("ht", key) == value, k.log_tail()


@TRANSPORTS
def test_graceful_stop_is_seen_by_kamailio_at_once(
    kamailio_node: KamailioNodeFactory, our_node: OurNodeFactory, transport: Transport
) -> None:
    """After our graceful stop, neither Kamailio node lists us active any more, sooner
    than a missed ping could explain."""
    k1, k2 = kamailio_bus(kamailio_node, transport, 2)
    ours = our_node(transport, notify=[k1.server_address])
    wait_until(
        lambda: (
            we_list_active(ours, k1, k2)
            and kamailio_lists_active(k1, ours)
            and kamailio_lists_active(k2, ours)
        ),
        JOIN_TIMEOUT,
        "ours, K1 and K2 to list each other active",
    )

    stopped_at = time.monotonic()
    ours.stop()
    assert not ours.alive

    # Until it stops, our node answers every ping at once. A ping that Kamailio sends
    # after that goes unanswered, and Kamailio acts on it only when tm's fr_timer (2 s)
    # fires: any change sooner than that comes from our leave message.
    leave_bound = K_FR_TIMER_MS / 1000 * 0.75
    wait_until(
        lambda: not kamailio_lists_active(k1, ours) and not kamailio_lists_active(k2, ours),
        leave_bound - (time.monotonic() - stopped_at),
        "K1 and K2 to stop listing us active after our leave",
    )
    for k in (k1, k2):
        entry = kamailio_entry(k, ours)
        assert entry is None or entry["status"] == "disabled", entry


@TRANSPORTS
def test_kill_9_is_detected_by_kamailio_pings(
    kamailio_node: KamailioNodeFactory, our_node: OurNodeFactory, transport: Transport
) -> None:
    """After kill -9 of our node, K marks it disabled after its next ping times out."""
    k = kamailio_node(transport=transport, fr_timer_ms=K_FR_TIMER_MS)
    ours = our_node(transport, notify=[k.server_address])
    wait_until(
        lambda: kamailio_lists_active(k, ours) and we_list_active(ours, k),
        JOIN_TIMEOUT,
        "K and ours to list each other active",
    )

    ours.kill()
    assert not ours.alive
    seen: list[str | None] = []

    def disabled() -> bool:
        entry = kamailio_entry(k, ours)
        status = entry["status"] if entry is not None else None
        if not seen or seen[-1] != status:
            seen.append(status)
        return status == "disabled"

    wait_until(
        disabled,
        K_PING_INTERVAL + K_FR_TIMER_MS / 1000 + 3,
        "K to mark our killed node disabled",
    )
    assert seen[0] == "active", seen
