"""A TCP link between two gateways cut by nftables, then healed: what the fault test
asserts and ``bench/abuse.py`` records at full size (60 s).

Two gateways ``a`` and ``b`` on a fault lab (harness/netns.py), their SIP over TCP,
fast timers (ping 1 s, Timer F 2 s). Both broadcast to peer ``htable`` at a steady rate
before the cut, during it and after the heal, each with a subscriber on the other. A
sampler reads both gateways' ``/v1/health`` every 0.2 s all along.

Before the driver tore down an outbound connection whose request went unanswered, the
dead connection was reused after the heal: 44 s of flapping and false timeouts, and
after a 15 s cut 210 messages lost. What is measured: how long after the heal each
gateway sees the other active again and stays so (a *flap* is a fall back to no active
node once it came back), the transaction timeouts after the heal plus one Timer F
(none is owed: every request sent by then meets a live link), and what each subscriber
got of the other's messages (all, in order, once: the outboxes resend what the cut
held back).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from harness.delivery import Delivery, Subscriber, account
from harness.labbus import PEER, LabBus, broadcast

#: Timer F of the lab's gateways (harness.labbus.LAB_TIMERS), and their ping interval.
TIMER_F = 2.0
PING = 1.0
#: Health samples per second.
SAMPLE_INTERVAL = 0.2

COUNTERS = {
    "timeouts": "dmq_transaction_timeouts_total",
    "outbound_resets": "dmq_tcp_outbound_reset_total",
    "transport_errors": "dmq_transport_errors_total",
    "outbox_resent": "dmq_outbox_resent_total",
}


@dataclass
class Side:
    """What one gateway saw, and what its subscriber got of the other's messages."""

    name: str
    #: (monotonic time, active nodes) every SAMPLE_INTERVAL.
    health: list[tuple[float, int]] = field(default_factory=list)
    #: When the link was cut, and when the cut was healed (monotonic time).
    cut_at: float = float("inf")
    healed_at: float = float("inf")
    counters_at_heal: dict[str, float] = field(default_factory=dict)
    counters_after_grace: dict[str, float] = field(default_factory=dict)
    counters_at_end: dict[str, float] = field(default_factory=dict)
    delivery: Delivery | None = None
    #: Seconds from the heal until the subscriber had all of the other's messages.
    delivered_after_heal_s: float | None = None
    #: Seconds from the heal until it had every message the other sent before the heal
    #: (what the cut held back in the other's outbox).
    backlog_after_heal_s: float | None = None

    @property
    def down_during_cut(self) -> bool:
        """Whether the other gateway was seen inactive while the link was cut."""
        return any(not active for t, active in self.health if self.cut_at <= t < self.healed_at)

    @property
    def back_after_heal_s(self) -> float | None:
        """Seconds from the heal until the other gateway was first seen active."""
        back = next((t for t, active in self.health if t >= self.healed_at and active), None)
        return None if back is None else round(back - self.healed_at, 2)

    @property
    def flaps_after_heal(self) -> int:
        """Falls from active back to none, once the other came back after the heal."""
        back = self.back_after_heal_s
        if back is None:
            return 0
        after = [active for t, active in self.health if t >= self.healed_at + back]
        return sum(1 for prev, now in itertools.pairwise(after) if prev and not now)

    def as_dict(self) -> dict[str, Any]:
        late = {
            name: self.counters_at_end.get(name, 0) - self.counters_after_grace.get(name, 0)
            for name in COUNTERS
        }
        during = {
            name: self.counters_after_grace.get(name, 0) - self.counters_at_heal.get(name, 0)
            for name in COUNTERS
        }
        return {
            "down_during_cut": self.down_during_cut,
            "back_after_heal_s": self.back_after_heal_s,
            "backlog_delivered_after_heal_s": self.backlog_after_heal_s,
            "flaps_after_heal": self.flaps_after_heal,
            "delivered_all_after_heal_s": self.delivered_after_heal_s,
            "counters_at_heal": self.counters_at_heal,
            "counters_heal_to_grace": during,
            "counters_after_grace": late,
            "delivery": self.delivery.as_dict() if self.delivery else None,
        }


@dataclass
class PartitionRun:
    cut_s: float
    rate: float
    sides: dict[str, Side]
    sent: dict[str, list[int]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "cut_s": self.cut_s,
            "broadcasts_per_s_each": self.rate,
            "timer_f_s": TIMER_F,
            "ping_interval_s": PING,
            "sent": {origin: len(numbers) for origin, numbers in self.sent.items()},
            "gateways": {name: side.as_dict() for name, side in self.sides.items()},
        }


async def _counters(client: httpx.AsyncClient, bus: LabBus, name: str) -> dict[str, float]:
    gateway = bus[name]
    response = await client.get(f"{gateway.url}/metrics", headers=gateway.headers)
    response.raise_for_status()
    values = dict.fromkeys(COUNTERS, 0.0)
    wanted = {sample: key for key, sample in COUNTERS.items()}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name in wanted:
                values[wanted[sample.name]] = float(sample.value)
    return values


async def _sample(client: httpx.AsyncClient, bus: LabBus, sides: dict[str, Side]) -> None:
    """Every gateway's count of active nodes, every SAMPLE_INTERVAL, until cancelled."""
    while True:
        for name, side in sides.items():
            gateway = bus[name]
            try:
                response = await client.get(f"{gateway.url}/v1/health", headers=gateway.headers)
                active = int(response.json()["active_nodes"])
            except (httpx.HTTPError, ValueError, KeyError):
                active = 0
            side.health.append((time.monotonic(), active))
        await asyncio.sleep(SAMPLE_INTERVAL)


async def _load(
    client: httpx.AsyncClient,
    bus: LabBus,
    origin: str,
    sent: list[int],
    rate: float,
    until: float,
) -> None:
    """Broadcast numbered messages of ``origin`` at ``rate``/s until ``until``; the
    numbers the gateway accepted (202) are appended to ``sent``."""
    n = len(sent)
    while time.monotonic() < until:
        n += 1
        try:
            response = await broadcast(client, bus[origin], n)
        except httpx.HTTPError:
            response = None
        if response is not None and response.status_code == 202:
            sent.append(n)
        await asyncio.sleep(1 / rate)


async def run_partition(
    workdir: Path, cut_s: float, *, rate: float = 5.0, after_s: float = 10.0, settle_s: float = 60.0
) -> PartitionRun:
    """Cut b off from a for ``cut_s`` seconds while both broadcast at ``rate``/s, heal,
    go on for ``after_s`` seconds, and wait up to ``settle_s`` for every message."""
    names = ("a", "b")
    with LabBus(workdir, list(names), transport="tcp") as bus:
        sides = {name: Side(name) for name in names}
        sent: dict[str, list[int]] = {name: [] for name in names}
        subscribers = {
            name: await Subscriber(bus[name].ws_url, PEER, token=bus.lab.token).start()
            for name in names
        }
        async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
            sampler = asyncio.create_task(_sample(client, bus, sides))
            backlog: asyncio.Task[None] | None = None
            try:

                async def load_for(seconds: float) -> None:
                    until = time.monotonic() + seconds
                    await asyncio.gather(
                        *(_load(client, bus, n, sent[n], rate, until) for n in names)
                    )

                await load_for(2.0)
                bus.lab.partition("b")
                for side in sides.values():
                    side.cut_at = time.monotonic()
                await load_for(cut_s)
                for name in names:
                    sides[name].counters_at_heal = await _counters(client, bus, name)
                bus.lab.heal("b")
                healed = time.monotonic()
                for side in sides.values():
                    side.healed_at = healed
                backlog = asyncio.create_task(
                    _watch_backlog(bus, subscribers, sides, {n: list(v) for n, v in sent.items()})
                )
                grace = asyncio.create_task(asyncio.sleep(TIMER_F + 1.0))
                load = asyncio.create_task(load_for(after_s))
                await grace
                for name in names:
                    sides[name].counters_after_grace = await _counters(client, bus, name)
                await load
                await _settle(bus, subscribers, sides, sent, healed, settle_s)
                for name in names:
                    sides[name].counters_at_end = await _counters(client, bus, name)
            finally:
                sampler.cancel()
                if backlog is not None:
                    backlog.cancel()
                for subscriber in subscribers.values():
                    await subscriber.close()
        return PartitionRun(cut_s=cut_s, rate=rate, sides=sides, sent=sent)


async def _watch_backlog(
    bus: LabBus,
    subscribers: dict[str, Subscriber],
    sides: dict[str, Side],
    before_heal: dict[str, list[int]],
) -> None:
    """Record when each subscriber has every message the other sent before the heal."""
    uris = bus.uris()
    while any(side.backlog_after_heal_s is None for side in sides.values()):
        for name, subscriber in subscribers.items():
            side = sides[name]
            other = next(n for n in sides if n != name)
            if side.backlog_after_heal_s is None:
                got = account(subscriber.frames, {other: before_heal[other]}, uris)[other]
                if got.complete:
                    side.backlog_after_heal_s = round(time.monotonic() - side.healed_at, 2)
        await asyncio.sleep(0.1)


async def _settle(
    bus: LabBus,
    subscribers: dict[str, Subscriber],
    sides: dict[str, Side],
    sent: dict[str, list[int]],
    healed: float,
    settle_s: float,
) -> None:
    """Wait until each subscriber has everything the other gateway sent (or the rest
    declared lost), up to ``settle_s``; record each one's delivery."""
    deadline = time.monotonic() + settle_s
    uris = bus.uris()
    while True:
        for name, subscriber in subscribers.items():
            other = next(n for n in sides if n != name)
            delivery = account(subscriber.frames, {other: sent[other]}, uris)[other]
            side = sides[name]
            side.delivery = delivery
            if delivery.complete and side.delivered_after_heal_s is None:
                side.delivered_after_heal_s = round(time.monotonic() - healed, 2)
        if all(s.delivered_after_heal_s is not None for s in sides.values()):
            await asyncio.sleep(1.0)  # late duplicates would show up now
            for name, subscriber in subscribers.items():
                other = next(n for n in sides if n != name)
                sides[name].delivery = account(subscriber.frames, {other: sent[other]}, uris)[other]
            return
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(0.2)
