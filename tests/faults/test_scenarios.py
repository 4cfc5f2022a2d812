"""Nothing is lost silently: real gateways (and Kamailio) under real faults.

Each scenario runs on a fault lab (network namespaces, nftables; see harness/netns.py)
and checks, at a subscriber of every gateway, for every origin that broadcast to it:
every message arrives exactly once and in the origin's order, or the gateway declares
it lost with a ``gap`` frame naming the origin, for at most a few of them
(``MAX_DECLARED_LOST``). Timers are fast (ping 1 s, Timer F 2 s) and counts small.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.delivery import Delivery, Subscriber, account
from harness.gateway import Gateway
from harness.labbus import PEER, LabBus, broadcast
from harness.waiting import wait_until

pytestmark = pytest.mark.usefixtures("lab_required")

#: Share of an origin's messages a gateway may declare lost (with gap frames) under
#: loss that its retransmissions and resends should have overcome.
MAX_DECLARED_LOST = 0.05

#: How long the bus may take to deliver (or declare lost) everything after the fault.
SETTLE = 40.0


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        yield client


@pytest.fixture
def bus_factory(tmp_path: Path) -> Iterator[Callable[..., LabBus]]:
    """``bus_factory(gateways, kamailios=())``: a started LabBus, closed after the test."""
    buses: list[LabBus] = []

    def make(gateways: list[str], kamailios: Sequence[str] = (), **options: Any) -> LabBus:
        bus = LabBus(tmp_path, gateways, kamailios, **options)
        buses.append(bus)
        return bus.__enter__()

    try:
        yield make
    finally:
        for bus in buses:
            bus.close()


async def subscribe_all(bus: LabBus) -> dict[str, Subscriber]:
    subscribers = {
        name: Subscriber(g.ws_url, PEER, token=bus.lab.token) for name, g in bus.gateways.items()
    }
    for subscriber in subscribers.values():
        await subscriber.start()
    return subscribers


def report(
    bus: LabBus, subscribers: Mapping[str, Subscriber], expected: Mapping[str, Collection[int]]
) -> dict[str, dict[str, Delivery]]:
    """Per receiving gateway, per origin (every origin but itself): its Delivery."""
    return {
        name: account(
            sub.frames,
            {o: n for o, n in expected.items() if o != name},
            bus.uris(),
        )
        for name, sub in subscribers.items()
    }


async def settle(
    bus: LabBus, subscribers: Mapping[str, Subscriber], expected: Mapping[str, Collection[int]]
) -> dict[str, dict[str, Delivery]]:
    """Wait until every subscriber has everything, or the rest declared lost."""
    deadline = time.monotonic() + SETTLE
    while True:
        deliveries = report(bus, subscribers, expected)
        if all(d.complete for per in deliveries.values() for d in per.values()):
            await asyncio.sleep(1.0)  # late duplicates would show up now
            return report(bus, subscribers, expected)
        if time.monotonic() > deadline:
            return deliveries
        await asyncio.sleep(0.2)


def assert_nothing_lost_silently(
    deliveries: dict[str, dict[str, Delivery]], bus: LabBus, *, declared: float
) -> None:
    problems = []
    for receiver, per in deliveries.items():
        for origin, d in per.items():
            facts = d.as_dict()
            bad = (
                d.duplicates
                or d.inversions
                or d.silently_missed
                or d.declared_lost > declared * len(d.expected)
            )
            if bad:
                problems.append(f"subscriber on {receiver}, origin {origin}: {facts}")
    if problems:
        logs = "\n".join(f"--- {g.name}\n{g.log_tail(30)}" for g in bus.gateways.values())
        pytest.fail("\n".join(problems) + "\n" + logs)


async def load(
    http: httpx.AsyncClient,
    gateway: Gateway,
    count: int,
    rate: float,
    accepted: set[int],
    first: int = 1,
    until: asyncio.Event | None = None,
) -> None:
    """Broadcast messages ``first..count`` of ``gateway`` at ``rate``/s (or until
    ``until`` is set); the numbers it accepted (202) go in ``accepted``. A refused or
    failed POST is not retried: the gateway never took that message, so nobody is owed
    it."""
    for n in range(first, count + 1):
        if until is not None and until.is_set():
            return
        try:
            response = await broadcast(http, gateway, n)
        except httpx.HTTPError:
            response = None
        if response is not None and response.status_code == 202:
            accepted.add(n)
        await asyncio.sleep(1 / rate)


# --------------------------------------------------------------------------- scenarios


async def test_udp_loss_on_every_link_with_kamailio(
    bus_factory: Callable[..., LabBus], http: httpx.AsyncClient
) -> None:
    """(a) Three gateways and a Kamailio node, 20% UDP loss on every link; two gateways
    broadcast. Every gateway's subscriber gets each origin's messages once, in order;
    Kamailio's htable holds every one."""
    bus = bus_factory(["a", "b", "c"], ["k"])
    subscribers = await subscribe_all(bus)
    bus.lab.set_loss(udp=20)
    count = 40
    sent: dict[str, set[int]] = {"a": set(), "b": set()}
    await asyncio.gather(
        load(http, bus["a"], count, 20, sent["a"]), load(http, bus["b"], count, 20, sent["b"])
    )
    assert sent == {"a": set(range(1, count + 1)), "b": set(range(1, count + 1))}
    deliveries = await settle(bus, subscribers, sent)
    for subscriber in subscribers.values():
        await subscriber.close()
    assert_nothing_lost_silently(deliveries, bus, declared=MAX_DECLARED_LOST)
    bus.lab.clear_loss()
    kamailio = bus.kamailios["k"]
    want = {f"{o}-{n}" for o, ns in sent.items() for n in ns}
    wait_until(
        lambda: want <= htable_names(kamailio.kamcmd("htable.dump", "s:ht")),
        SETTLE,
        "Kamailio's htable to hold every message",
        interval=0.5,
    )


async def test_partitioned_gateway_gets_everything_it_missed_in_order(
    bus_factory: Callable[..., LabBus], http: httpx.AsyncClient
) -> None:
    """(b) Gateway c is cut off for 15 s while a and b keep broadcasting; once healed,
    c's subscriber gets everything it missed, in order, exactly once, nothing declared
    lost."""
    bus = bus_factory(["a", "b", "c"])
    subscribers = await subscribe_all(bus)
    sent: dict[str, set[int]] = {"a": set(), "b": set()}
    await asyncio.gather(
        load(http, bus["a"], 5, 10, sent["a"]), load(http, bus["b"], 5, 10, sent["b"])
    )
    bus.lab.partition("c")
    # 15 s of broadcasts at 2/s from each of a and b, every one accepted by its gateway.
    await asyncio.gather(
        load(http, bus["a"], 35, 2, sent["a"], first=6),
        load(http, bus["b"], 35, 2, sent["b"], first=6),
    )
    bus.lab.heal("c")
    await asyncio.gather(
        load(http, bus["a"], 40, 10, sent["a"], first=36),
        load(http, bus["b"], 40, 10, sent["b"], first=36),
    )
    assert sent == {"a": set(range(1, 41)), "b": set(range(1, 41))}
    deliveries = await settle(bus, subscribers, sent)
    for subscriber in subscribers.values():
        await subscriber.close()
    assert_nothing_lost_silently(deliveries, bus, declared=0)
    for origin, d in deliveries["c"].items():
        assert d.arrived == sorted(sent[origin]), f"c's subscriber got {origin}'s {d.arrived}"


async def test_kill_9_under_load_and_restart_with_the_same_state_dir(
    bus_factory: Callable[..., LabBus], http: httpx.AsyncClient
) -> None:
    """(c) a and b broadcast; b is killed with SIGKILL in the middle and, 3 s later,
    restarted on its state directory while the load goes on. b's subscriber resumes in the same
    epoch (its history survived) and, like everyone else's, gets each origin's messages
    once and in order; what could not be delivered is declared lost, never silently."""
    bus = bus_factory(["a", "b", "c"])
    subscribers = await subscribe_all(bus)
    b = bus["b"]
    epoch_before = first_epoch(subscribers["b"])
    sent: dict[str, set[int]] = {"a": set(), "b": set()}
    done = asyncio.Event()

    async def crash() -> None:
        await asyncio.sleep(1.5)
        b.kill()
        # Down for three ping intervals, whatever the machine's speed: long enough for
        # the others to notice (two missed pings), as a real crash and restart is.
        await asyncio.sleep(3.0)
        await asyncio.to_thread(b.restart)
        await asyncio.sleep(3.0)  # the load goes on after the restart
        done.set()

    await asyncio.gather(
        load(http, bus["a"], 10_000, 20, sent["a"], until=done),
        load(http, b, 10_000, 20, sent["b"], until=done),
        crash(),
    )
    assert len(sent["b"]) >= 20, f"b accepted only {sorted(sent['b'])}"
    deliveries = await settle(bus, subscribers, sent)
    for subscriber in subscribers.values():
        await subscriber.close()
    resumed = [f for f in subscribers["b"].frames if f.get("type") == "subscribed"]
    assert len(resumed) >= 2, "b's subscriber never resubscribed after the restart"
    assert all(f["epoch"] == epoch_before for f in resumed), (
        f"b's history did not survive kill -9: epochs {[f['epoch'] for f in resumed]}"
    )
    history_gaps = [f for f in subscribers["b"].gaps() if not f.get("origin")]
    assert not history_gaps, f"b's resumed subscription lost history: {history_gaps}"
    assert_nothing_lost_silently(deliveries, bus, declared=MAX_DECLARED_LOST)


async def test_partitioned_kamailio_holds_every_set_afterwards(
    bus_factory: Callable[..., LabBus], http: httpx.AsyncClient
) -> None:
    """(d) A Kamailio node cut off for 10 s holds, once healed, every htable set a
    gateway broadcast meanwhile (``kamcmd htable.get``)."""
    bus = bus_factory(["a", "b"], ["k"])
    kamailio = bus.kamailios["k"]
    sent: set[int] = set()
    bus.lab.partition("k")
    await load(http, bus["a"], 20, 2, sent)  # 10 s
    bus.lab.heal("k")
    assert sent == set(range(1, 21))
    missing = set(sent)

    def all_held() -> bool:
        for n in sorted(missing):
            if kamailio.htable_get("ht", f"a-{n}") != str(n):
                return False
            missing.discard(n)
        return True

    try:
        wait_until(all_held, SETTLE, "Kamailio to hold every set sent while cut off", 0.5)
    except AssertionError:
        pytest.fail(
            f"Kamailio lacks {sorted(missing)} of a's sets after the partition healed\n"
            + bus["a"].log_tail(40)
        )


# --------------------------------------------------------------------------- helpers


def first_epoch(subscriber: Subscriber) -> str:
    return str(next(f for f in subscriber.frames if f.get("type") == "subscribed")["epoch"])


def htable_names(dump: str) -> set[str]:
    return set(re.findall(r"^\s*name: (\S+)\s*$", dump, flags=re.MULTILINE))
