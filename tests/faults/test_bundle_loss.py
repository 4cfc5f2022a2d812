"""Bundles under real UDP loss (a fault lab: network namespaces, nftables drops).

Gateway a broadcasts batches to gateway b while 10% of the UDP packets between them
are dropped, both ways. A bundle is one datagram of several IP fragments, so losing
any fragment loses the whole bundle: it is retransmitted (Timer E), resent from the
outbox after a timeout, and a copy that arrives twice is deduplicated per seq by b's
reorderer. b's subscriber must get every message exactly once and in a's order, none
declared lost, and a must have sent bundles (not one request per message).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.delivery import Subscriber, account, htable_body
from harness.labbus import PEER, LabBus

pytestmark = pytest.mark.usefixtures("lab_required")

SETTLE = 60.0


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[LabBus]:
    with LabBus(tmp_path, ["a", "b"]) as lab_bus:
        yield lab_bus


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        yield client


async def metric(http: httpx.AsyncClient, bus: LabBus, name: str, sample: str) -> float:
    gateway = bus[name]
    text = (await http.get(f"{gateway.url}/metrics", headers=gateway.headers)).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample
    )


async def test_bundled_batches_arrive_complete_and_in_order_under_udp_loss(
    bus: LabBus, http: httpx.AsyncClient
) -> None:
    subscriber = await Subscriber(bus["b"].ws_url, PEER, token=bus.lab.token).start()
    bus.lab.set_loss(udp=10)
    count, per_batch = 1200, 300
    a = bus["a"]
    for first in range(1, count + 1, per_batch):
        batch = [{"body": htable_body("a", n).decode()} for n in range(first, first + per_batch)]
        answer = await http.post(
            f"{a.url}/v1/peers/{PEER}/broadcast/batch",
            json=batch,
            headers={**a.headers, "content-type": "application/json"},
        )
        assert answer.status_code == 202, answer.text
    deadline = time.monotonic() + SETTLE
    while True:
        delivery = account(subscriber.frames, {"a": count}, bus.uris())["a"]
        if delivery.complete or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    bus.lab.clear_loss()
    await asyncio.sleep(1.0)  # a late copy would show up now
    delivery = account(subscriber.frames, {"a": count}, bus.uris())["a"]
    await subscriber.close()
    facts = delivery.as_dict()
    assert delivery.delivered == count, facts
    assert (delivery.duplicates, delivery.inversions, delivery.declared_lost) == (0, 0, 0), facts
    bundles = await metric(http, bus, "a", "dmq_bundles_sent_entries_count")
    entries = await metric(http, bus, "a", "dmq_bundles_sent_entries_sum")
    assert 0 < bundles < count / 10 and entries == count, (bundles, entries)
    # The loss was real: some requests had to be sent again.
    assert await metric(http, bus, "a", "dmq_retransmissions_sent_total") > 0
