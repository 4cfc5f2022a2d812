"""The fault lab itself: its loss rule drops about the share asked for, only between
hosts; a partition cuts a host off both ways and heals; nothing outlives the lab."""

from __future__ import annotations

import subprocess

from harness.netns import Lab
from tests.faults.conftest import LabFactory
from tests.faults.probes import Listener, udp_received

DATAGRAMS = 2000


def test_udp_loss_drops_about_the_share_asked_for(make_lab: LabFactory) -> None:
    lab = make_lab(["a", "b"])
    a, b = lab["a"], lab["b"]
    assert udp_received(a, b, DATAGRAMS) == DATAGRAMS  # no fault: nothing lost
    lab.set_loss(udp=20)
    received = udp_received(a, b, DATAGRAMS)
    # 20% of 2 000: 400 lost, standard deviation about 18; 5 points either side is
    # more than 5 standard deviations.
    lost = (DATAGRAMS - received) / DATAGRAMS * 100
    assert 15 <= lost <= 25, f"{lost:.1f}% of UDP datagrams lost at a 20% loss rule"
    lab.set_loss(udp=50)
    lost = (DATAGRAMS - udp_received(b, a, DATAGRAMS)) / DATAGRAMS * 100
    assert 44 <= lost <= 56, f"{lost:.1f}% of UDP datagrams lost at a 50% loss rule"
    # The test process (root namespace, the bridge's address) is never affected.
    assert udp_received(None, b, DATAGRAMS) == DATAGRAMS
    lab.clear_loss()
    assert udp_received(a, b, DATAGRAMS) == DATAGRAMS


def test_partition_cuts_a_host_off_both_ways_and_heals(make_lab: LabFactory) -> None:
    lab = make_lab(["a", "b", "c"])
    a, b, c = lab["a"], lab["b"], lab["c"]
    on_b, on_a = Listener(b), Listener(a)
    try:
        assert on_b.reachable_from(a) and on_a.reachable_from(b)
        lab.partition(b)
        assert not on_b.reachable_from(a), "a still reaches b through a partition"
        assert not on_a.reachable_from(b), "b still reaches a through a partition"
        assert udp_received(c, b, 200) == 0
        assert on_b.reachable_from(None), "the test process lost its way to b"
        assert on_a.reachable_from(c), "a partition of b cut a off from c"
        lab.heal(b)
        assert on_b.reachable_from(a) and on_a.reachable_from(b)
        assert udp_received(c, b, 200) == 200
    finally:
        on_b.close()
        on_a.close()


def test_a_closed_lab_leaves_no_namespace_or_link() -> None:
    from tests.faults.conftest import require_lab

    require_lab()
    lab = Lab(["x", "y"])
    try:
        with lab:
            names = [h.netns for h in lab.hosts.values()]
            raise RuntimeError("a test that fails inside the lab")
    except RuntimeError:
        pass
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert not any(name in namespaces for name in names)
    assert lab.bridge not in links and f"dmqv{lab.tag}" not in links
