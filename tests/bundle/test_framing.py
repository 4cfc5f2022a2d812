"""The bundle body framing (app.gateway.bundle): what one gateway writes another must
read back exactly, and anything else is refused with a sentence naming what is wrong
(the receiver's 400 reason), never an exception of another kind."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.gateway import bundle
from app.gateway.bundle import BundleError, Entry

content_types = st.one_of(
    st.none(),
    st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0x2FFF, blacklist_categories=("Cs",)),
        min_size=1,
        max_size=60,
    ).filter(str.isprintable),
)
messages = st.lists(st.tuples(st.binary(max_size=300), content_types), min_size=1, max_size=40)


@given(messages)
def test_encode_then_decode_is_the_identity(run: list[tuple[bytes, str | None]]) -> None:
    body = bundle.encode(run)
    assert bundle.decode(body, len(run)) == [Entry(ct, b) for b, ct in run]
    # The sizes the sender plans with are the sizes on the wire.
    assert len(body) == 1 + sum(bundle.entry_size(ct, b) for b, ct in run)


@given(messages, st.data())
def test_any_cut_or_wrong_count_is_refused_with_a_reason(
    run: list[tuple[bytes, str | None]], data: st.DataObject
) -> None:
    body = bundle.encode(run)
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(BundleError) as caught:
        bundle.decode(body[:cut], len(run))
    assert "bundle" in str(caught.value)
    with pytest.raises(BundleError, match="stamp counts"):
        bundle.decode(body, len(run) + 1)
    if len(run) > 1:
        with pytest.raises(BundleError, match="more than"):
            bundle.decode(body, len(run) - 1)


def test_binary_bodies_and_no_content_type_survive() -> None:
    run = [(bytes(range(256)), None), (b"", "text/plain"), (b"\r\n\r\nKDMQ x", "a/b")]
    assert bundle.decode(bundle.encode(run), 3) == [
        Entry(None, bytes(range(256))),
        Entry("text/plain", b""),
        Entry("a/b", b"\r\n\r\nKDMQ x"),
    ]


@pytest.mark.parametrize(
    ("body", "count", "reason"),
    [
        (b"", 1, "bundle body is empty"),
        (b"\x02\x00\x00\x00\x00\x00", 1, "bundle version 2 is not understood (only 1)"),
        (b"\x01\x05ab", 1, "bundle entry 0 is cut short (its header)"),
        (
            b"\x01\x00\x00\x00\x00\x09abc",
            1,
            "bundle entry 0 is cut short: 9 bytes announced, 3 left",
        ),
        (b"\x01\x02\xff\xfe\x00\x00\x00\x00", 1, "bundle entry 0: content type is not UTF-8"),
        (b"\x01\x01\n\x00\x00\x00\x00", 1, "bundle entry 0: content type has control characters"),
        (b"\x01\x00\x00\x00\x00\x00", 2, "bundle holds 1 entries, its stamp counts 2"),
        (b"\x01", 0, "bundle count 0 is not 1 to 10000"),
        (b"\x01", 10_001, "bundle count 10001 is not 1 to 10000"),
    ],
)
def test_malformed_bodies_say_what_is_wrong(body: bytes, count: int, reason: str) -> None:
    with pytest.raises(BundleError) as caught:
        bundle.decode(body, count)
    assert str(caught.value) == reason


def test_an_entry_over_the_single_message_limit_is_refused() -> None:
    body = bundle.encode([(b"x" * 100, None), (b"y" * 101, None)])
    assert len(bundle.decode(body, 2, max_body=101)) == 2
    with pytest.raises(BundleError) as caught:
        bundle.decode(body, 2, max_body=100)
    assert str(caught.value) == (
        "bundle entry 1: a body of 101 bytes is over this node's limit of 100"
    )


def test_a_content_type_too_long_for_an_entry_is_refused_on_encode() -> None:
    assert not bundle.fits("a" * 256) and bundle.fits("a" * 255) and bundle.fits(None)
    with pytest.raises(BundleError, match="256 bytes does not fit"):
        bundle.encode([(b"", "a" * 256)])


@pytest.mark.parametrize(
    ("value", "count"),
    [
        ("<sip:10.0.0.5:5060>;epoch=ab;seq=4;count=7", 7),
        ("<sip:10.0.0.5:5060>;epoch=ab;seq=4; count = 12 ;to=sip:1.2.3.4:5060", 12),
        ("<sip:10.0.0.5:5060;count=3>;epoch=ab;seq=4", None),  # inside <> is the URI's
        ("<sip:10.0.0.5:5060>;epoch=ab;seq=4", None),
        ("<sip:10.0.0.5:5060>;epoch=ab;seq=4;count=x", None),
        (None, None),
    ],
)
def test_the_count_of_a_stamp(value: str | None, count: int | None) -> None:
    assert bundle.stamp_count(value) == count


@pytest.mark.parametrize(
    ("sizes", "max_messages", "max_bytes", "runs"),
    [
        ([10] * 5, 2, 1000, [(0, 2), (2, 4), (4, 5)]),
        ([10] * 5, 100, 31, [(0, 3), (3, 5)]),  # 1 + 3 * 10 fits, a fourth does not
        ([10, 5000, 10, 10], 100, 1000, [(0, 1), (1, 2), (2, 4)]),  # too large: alone
        ([10, -1, 10], 100, 1000, [(0, 1), (1, 2), (2, 3)]),  # cannot be an entry
        ([], 100, 1000, []),
    ],
)
def test_chunks_keep_order_and_bounds(
    sizes: list[int], max_messages: int, max_bytes: int, runs: list[tuple[int, int]]
) -> None:
    assert bundle.chunks(sizes, max_messages, max_bytes) == runs


def test_stats_count_bundles_and_entries_per_bucket() -> None:
    stats = bundle.BundleStats()
    for entries in (2, 3, 100, 5000):
        stats.sent(entries)
    assert stats.sent_sizes[: len(bundle.SIZE_BUCKETS) + 1] == [1, 1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert stats.sent_sizes[-2:] == [4, 5105]
    assert stats.received_sizes[-2:] == [0, 0]
