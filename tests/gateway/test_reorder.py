"""The reorderer on a fake clock: order, duplicates, gaps after the bounds, epochs."""

from __future__ import annotations

import random

import pytest

from app.gateway.reorder import (
    FILL_BUCKETS,
    Delivery,
    Gap,
    Reorderer,
    Retired,
    StreamKey,
    Verdict,
)

A = StreamKey("htable", "sip:127.0.0.1:5070", "e1")


def delivered(actions: list[object]) -> list[int]:
    return [a.seq for a in actions if isinstance(a, Delivery)]


def test_in_order_messages_are_delivered_at_once() -> None:
    r: Reorderer[str] = Reorderer(2.0, 10)
    for seq in (1, 2, 3):
        verdict, actions = r.offer(A, seq, f"m{seq}", now=0.0)
        assert verdict is Verdict.DELIVERED
        assert actions == [Delivery(A, seq, f"m{seq}", was_held=False)]
    assert r.next_seq(A) == 4
    assert r.next_deadline() is None


def test_an_early_message_waits_for_the_one_before_it() -> None:
    r: Reorderer[str] = Reorderer(2.0, 10)
    r.offer(A, 1, "m1", now=0.0)
    assert r.offer(A, 3, "m3", now=0.1) == (Verdict.HELD, [])
    assert r.offer(A, 4, "m4", now=0.2) == (Verdict.HELD, [])
    assert r.next_deadline() == pytest.approx(2.1)
    verdict, actions = r.offer(A, 2, "m2", now=0.3)
    assert verdict is Verdict.DELIVERED
    assert actions == [
        Delivery(A, 2, "m2", was_held=False),
        Delivery(A, 3, "m3", was_held=True),
        Delivery(A, 4, "m4", was_held=True),
    ]
    assert r.next_deadline() is None


def test_duplicates_of_delivered_or_held_messages_are_not_delivered() -> None:
    r: Reorderer[str] = Reorderer(2.0, 10)
    r.offer(A, 1, "m1", now=0.0)
    r.offer(A, 3, "m3", now=0.0)
    assert r.offer(A, 1, "again", now=100.0) == (Verdict.DUPLICATE, [])
    assert r.offer(A, 3, "again", now=0.5) == (Verdict.DUPLICATE, [])
    assert r.duplicates == 2


def test_a_missing_message_becomes_a_gap_when_the_time_bound_passes() -> None:
    r: Reorderer[str] = Reorderer(2.0, 10)
    r.offer(A, 1, "m1", now=0.0)
    r.offer(A, 4, "m4", now=1.0)
    r.offer(A, 5, "m5", now=1.5)
    assert r.expire(2.9) == []
    actions = r.expire(3.0)
    assert actions[0] == Gap(A, 2, 3, "not received within --reorder-wait (2 s)")
    assert delivered(actions) == [4, 5]
    assert r.next_seq(A) == 6
    # What was given up, arriving at last, is a duplicate: it was reported lost.
    assert r.offer(A, 2, "late", now=4.0)[0] is Verdict.DUPLICATE


def test_the_count_bound_gives_up_at_once() -> None:
    r: Reorderer[int] = Reorderer(60.0, 3)
    r.offer(A, 1, 1, now=0.0)
    for seq in (3, 4, 5):
        assert r.offer(A, seq, seq, now=0.0)[0] is Verdict.HELD
    verdict, actions = r.offer(A, 6, 6, now=0.0)
    assert verdict is Verdict.HELD
    assert isinstance(actions[0], Gap) and (actions[0].first, actions[0].last) == (2, 2)
    assert delivered(actions) == [3, 4, 5, 6]


def test_a_new_stream_starts_at_seq_1_or_at_the_lowest_seen_within_the_bound() -> None:
    r: Reorderer[int] = Reorderer(2.0, 10)
    assert r.offer(A, 7, 7, now=0.0)[0] is Verdict.HELD
    assert r.offer(A, 6, 6, now=0.5)[0] is Verdict.HELD
    actions = r.expire(2.0)
    # This node cannot know which earlier seqs were ever meant for it: no gap.
    assert not any(isinstance(a, Gap) for a in actions)
    assert delivered(actions) == [6, 7]


def test_a_stream_of_unknown_start_waits_the_join_wait_not_the_reorder_wait() -> None:
    # A peer registered here after its origin had sent: minutes of reorder wait must
    # not hold its first message back; the join wait does, then no gap is declared.
    r: Reorderer[int] = Reorderer(128.0, 10, join_wait=2.0)
    assert r.offer(A, 5, 5, now=10.0)[0] is Verdict.HELD
    assert r.next_deadline() == 12.0
    assert r.expire(11.9) == []
    actions = r.expire(12.0)
    assert delivered(actions) == [5]
    assert not any(isinstance(a, Gap) for a in actions)
    # From then on the stream's start is known: a hole waits the whole reorder wait.
    assert r.offer(A, 7, 7, now=20.0)[0] is Verdict.HELD
    assert r.next_deadline() == 148.0
    actions = r.expire(148.0)
    assert [(g.first, g.last) for g in actions if isinstance(g, Gap)] == [(6, 6)]


def test_a_new_origin_epoch_releases_the_old_stream_and_restarts_at_1() -> None:
    r: Reorderer[str] = Reorderer(2.0, 10)
    r.offer(A, 1, "a1", now=0.0)
    r.offer(A, 3, "a3", now=0.0)
    b = A._replace(epoch="e2")
    verdict, actions = r.offer(b, 1, "b1", now=0.1)
    assert verdict is Verdict.DELIVERED
    assert actions == [
        Gap(A, 2, 2, "the origin started a new epoch"),
        Delivery(A, 3, "a3", was_held=True),
        Retired(A),
        Delivery(b, 1, "b1", was_held=False),
    ]
    assert r.next_seq(A) is None and r.next_seq(b) == 2


def test_streams_are_independent_per_peer_and_origin() -> None:
    r: Reorderer[str] = Reorderer(2.0, 10)
    other = A._replace(origin="sip:127.0.0.1:5072")
    r.offer(A, 1, "a", now=0.0)
    assert r.offer(other, 1, "b", now=0.0)[0] is Verdict.DELIVERED
    assert r.offer(A._replace(peer_id="usrloc"), 1, "c", now=0.0)[0] is Verdict.DELIVERED


def test_restored_state_continues_where_it_stopped() -> None:
    r: Reorderer[str] = Reorderer(2.0, 10)
    r.restore(A, 5)
    r.restore_held(A, 7, "m7", arrived=10.0)
    assert r.offer(A, 4, "dup", now=10.5)[0] is Verdict.DUPLICATE
    verdict, actions = r.offer(A, 6, "m6", now=10.5)
    assert verdict is Verdict.HELD
    assert r.next_deadline() == pytest.approx(12.0)
    actions = r.expire(12.0)
    assert [type(a) for a in actions] == [Gap, Delivery, Delivery]
    assert delivered(actions) == [6, 7]


def test_shuffled_duplicated_input_comes_out_once_in_order() -> None:
    rng = random.Random(7)
    seqs = list(range(1, 301)) * 2
    rng.shuffle(seqs)
    r: Reorderer[int] = Reorderer(1000.0, 1000)
    out: list[int] = []
    for seq in seqs:
        out += delivered(r.offer(A, seq, seq, now=0.0)[1])
    assert out == list(range(1, 301))


def test_unordered_deduplication_bounds_its_memory() -> None:
    r: Reorderer[str] = Reorderer(2.0, 3)
    assert [r.offer_unordered(A, s) for s in (2, 1, 2, 1, 3)] == [True, True, False, False, True]
    for seq in (10, 11, 12, 13):
        assert r.offer_unordered(A, seq)
    assert not r.offer_unordered(A, 11)


@pytest.mark.parametrize(("wait", "held"), [(-1.0, 1), (1.0, 0)])
def test_bad_bounds_are_refused(wait: float, held: int) -> None:
    with pytest.raises(ValueError, match="must be at least"):
        Reorderer(wait, held)


def test_hole_fill_times_and_late_copies_are_measured() -> None:
    """A hole's fill time runs from the first message held behind it to the missing
    one's arrival; a copy that arrives after its gap was declared counts as late."""
    r: Reorderer[str] = Reorderer(2.0, 10)
    r.offer(A, 1, "m1", now=0.0)
    r.offer(A, 3, "m3", now=1.0)  # the hole at 2 opens
    r.offer(A, 4, "m4", now=1.1)
    r.offer(A, 2, "m2", now=1.3)  # filled after 0.3 s
    r.offer(A, 6, "m6", now=2.0)  # a hole at 5
    assert r.expire(now=4.0) == [
        Gap(A, 5, 5, "not received within --reorder-wait (2 s)"),
        Delivery(A, 6, "m6", was_held=True),
    ]
    assert r.offer(A, 5, "m5", now=9.0)[0] is Verdict.DUPLICATE  # too late
    assert r.offer(A, 4, "m4", now=9.1)[0] is Verdict.DUPLICATE  # delivered: not late
    r.offer(A, 8, "m8", now=10.0)
    r.offer(A, 9, "m9", now=11.0)
    r.offer(A, 7, "m7", now=13.5)  # filled after 3.5 s (from m8's arrival)
    assert sum(r.fills) == 2
    assert r.fills[FILL_BUCKETS.index(0.5)] == 1  # 0.3 s
    assert r.fills[FILL_BUCKETS.index(4.0)] == 1  # 3.5 s
    assert r.fill_sum == pytest.approx(3.8)
    assert r.late == 1
    assert r.held_peak == 2  # m3 and m4
