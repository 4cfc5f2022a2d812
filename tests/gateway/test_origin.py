"""The X-DMQ-Origin stamp: what a gateway writes reads back, and anything else from the
wire is "unstamped" rather than an error."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.gateway.origin import OriginStamp, build_origin, parse_origin


def test_a_built_stamp_parses_back() -> None:
    header = build_origin("sip:127.0.0.1:5070", "1f0c9a2e", 42)
    assert header == "<sip:127.0.0.1:5070>;epoch=1f0c9a2e;seq=42"
    assert parse_origin(header) == OriginStamp("sip:127.0.0.1:5070", "1f0c9a2e", 42)


def test_a_tcp_origin_keeps_its_transport() -> None:
    header = build_origin("sip:127.0.0.1:5070;transport=tcp", "e1", 1)
    assert parse_origin(header) == OriginStamp("sip:127.0.0.1:5070;transport=tcp", "e1", 1)
    with pytest.raises(ValueError, match="not valid"):
        build_origin("sip:127.0.0.1:5070", "e1", 1, to="sip:127.0.0.1:5072;transport=tcp")


def test_a_send_names_its_node() -> None:
    header = build_origin("sip:127.0.0.1:5070", "e1", 3, to="sip:127.0.0.1:5072")
    assert header == "<sip:127.0.0.1:5070>;epoch=e1;seq=3;to=sip:127.0.0.1:5072"
    assert parse_origin(header) == OriginStamp("sip:127.0.0.1:5070", "e1", 3, "sip:127.0.0.1:5072")
    assert parse_origin(header + ";to=sip:127.0.0.1:5074") is None  # twice
    assert parse_origin("<sip:h:1>;epoch=e1;seq=3;to=http://x") is None


def test_parameters_in_any_order_and_spacing_are_read() -> None:
    stamp = parse_origin(" <sip:10.0.0.5:5060;transport=tcp> ; seq=7 ; EPOCH=ab12 ")
    assert stamp == OriginStamp("sip:10.0.0.5:5060;transport=tcp", "ab12", 7)
    stamp = parse_origin("<sip:10.0.0.5:5060>; seq=7 ; EPOCH=ab12; future=1")
    assert stamp == OriginStamp("sip:10.0.0.5:5060", "ab12", 7)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "sip:127.0.0.1:5070;epoch=a;seq=1",  # no <>
        "<sip:127.0.0.1:5070;epoch=a;seq=1",  # unclosed
        "<http://x>;epoch=a;seq=1",  # not a sip URI
        "<sip:>;epoch=a;seq=1",
        "<sip:a b>;epoch=a;seq=1",
        "<sip:127.0.0.1:5070>;seq=1",  # no epoch
        "<sip:127.0.0.1:5070>;epoch=a",  # no seq
        "<sip:127.0.0.1:5070>;epoch=a;seq=0",
        "<sip:127.0.0.1:5070>;epoch=a;seq=-1",
        "<sip:127.0.0.1:5070>;epoch=a;seq=1e3",
        "<sip:127.0.0.1:5070>;epoch=a;seq=99999999999999999999",
        "<sip:127.0.0.1:5070>;epoch=a;seq=\u0661",  # a non-ASCII digit
        "<sip:127.0.0.1:5070>;epoch=a-b;seq=1",
        "<sip:127.0.0.1:5070>;epoch=a;epoch=b;seq=1",
        "<sip:127.0.0.1:5070>;epoch=a;seq=1;seq=2",
        "<sip:127.0.0.1:5070>;epoch=" + "a" * 33 + ";seq=1",
        "<sip:127.0.0.1:5070>;epoch=a;seq=1" + " " * 600,
    ],
)
def test_a_bad_stamp_is_unstamped(value: str | None) -> None:
    assert parse_origin(value) is None


@given(st.text(max_size=80))
def test_parsing_never_raises(value: str) -> None:
    stamp = parse_origin(value)
    assert stamp is None or stamp.seq >= 1


@pytest.mark.parametrize(
    ("origin", "epoch", "seq"),
    [("127.0.0.1:5070", "a", 1), ("sip:h:1", "", 1), ("sip:h:1", "a;b", 1), ("sip:h:1", "a", 0)],
)
def test_building_a_stamp_peers_would_ignore_is_refused(origin: str, epoch: str, seq: int) -> None:
    with pytest.raises(ValueError, match=r"origin stamp .* is not valid"):
        build_origin(origin, epoch, seq)


def _reference_build(origin: str, epoch: str, seq: int, to: str) -> str | None:
    """The stamp as the definition has it: the header, when it reads back as itself."""
    stamp = OriginStamp(origin, epoch, seq, to)
    return stamp.header() if parse_origin(stamp.header()) == stamp else None


_URI_TEXT = st.text(alphabet="sip:127.0.0.1;=<>, \tatrnspoct", min_size=0, max_size=40)
_URIS = st.one_of(
    _URI_TEXT,
    _URI_TEXT.map(lambda t: "sip:" + t),
    st.integers(1, 260).map(lambda n: "sip:" + "h" * n),
)


@given(
    origin=_URIS,
    epoch=st.one_of(st.text(max_size=40), st.from_regex(r"[0-9a-z]{1,33}", fullmatch=True)),
    seq=st.one_of(st.integers(-3, 2**64), st.sampled_from([1, 2**63 - 1, 2**63, 10**18])),
    to=st.one_of(st.just(""), _URIS),
)
def test_building_is_exactly_the_read_back_rule(origin: str, epoch: str, seq: int, to: str) -> None:
    """build_origin decides validity once per origin, epoch and node and then only
    checks the seq: for any values, it gives the header exactly when that header reads
    back as itself, seq and length cap included, and refuses it otherwise."""
    expected = _reference_build(origin, epoch, seq, to)
    for _ in range(2):  # the second call is answered from what the first decided
        if expected is None:
            with pytest.raises(ValueError, match="is not valid"):
                build_origin(origin, epoch, seq, to)
        else:
            assert build_origin(origin, epoch, seq, to) == expected


def test_the_length_cap_counts_the_seq_digits() -> None:
    """A stamp that fits MAX_STAMP with a short seq and not with a long one is built for
    the first and refused for the second, with the same origin and epoch."""
    origin = "sip:" + "h" * 252  # 256 characters, the longest origin
    to = "sip:" + "n" * 223
    short = build_origin(origin, "e", 1, to)
    assert len(short) <= 512 and parse_origin(short) == OriginStamp(origin, "e", 1, to)
    room = 512 - len(short) + 1  # digits the seq may have
    assert room == 10
    assert len(build_origin(origin, "e", 10 ** (room - 1), to)) == 512  # at the cap
    with pytest.raises(ValueError, match="is not valid"):
        build_origin(origin, "e", 10**room, to)


def test_a_seq_that_is_not_an_int_is_refused() -> None:
    with pytest.raises(ValueError, match="is not valid"):
        build_origin("sip:127.0.0.1:5070", "e1", True)
