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
