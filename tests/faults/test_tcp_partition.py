"""A TCP link between two gateways cut for 8 s by nftables, then healed: the dead
outbound connections are torn down, new ones made, nothing flaps or times out after
the heal plus one Timer F, and each outbox resends what the cut held back, in order.

The scenario is tests/abuse/partition.py (``bench/abuse.py`` runs it with a 60 s cut).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.abuse.partition import PING, TIMER_F, run_partition

pytestmark = pytest.mark.usefixtures("lab_required")

CUT = 8.0


async def test_a_healed_tcp_partition_reconnects_without_flapping_or_loss(tmp_path: Path) -> None:
    run = await run_partition(tmp_path, CUT, rate=5.0, after_s=8.0, settle_s=40.0)
    facts = run.as_dict()
    for name, side in run.sides.items():
        # The cut was seen: the other went inactive...
        assert side.down_during_cut, (name, facts)
        # ...and the connection the cut killed was torn down after Timer F, not reused.
        assert side.counters_at_heal["outbound_resets"] >= 1, (name, facts)
        # Back within a ping or two of the heal (a new connection, then a ping)...
        back = side.back_after_heal_s
        assert back is not None and back <= TIMER_F + 3 * PING, (name, facts)
        # ...and from then on active at every sample.
        assert side.flaps_after_heal == 0, (name, facts)
        # Requests sent once the heal is one Timer F old all meet a live link.
        late = side.as_dict()["counters_after_grace"]
        assert late["timeouts"] == 0 and late["outbound_resets"] == 0, (name, facts)
        delivery = side.delivery
        assert delivery is not None, (name, facts)
        # Everything the other sent, during the cut too: in order, once, none given up.
        assert delivery.arrived == sorted(delivery.expected), (name, facts)
        assert delivery.declared_lost == 0, (name, facts)
    assert all(len(numbers) >= 5 * CUT for numbers in run.sent.values()), facts
