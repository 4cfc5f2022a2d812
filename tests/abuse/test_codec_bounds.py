"""The SIP codec's own bounds: the header-name cache holds a bounded number of bytes
however many and however large the names it meets, and the TCP framer refuses a
header section or a message over its cap as the bytes arrive, cutting a trickled
stream exactly as a whole one."""

from __future__ import annotations

import pytest

from app.dmq import sip
from app.dmq.sip import SipParseError, StreamFramer, parse_message
from tests.abuse.support import kdmq


def test_the_header_name_cache_holds_only_short_names() -> None:
    for index in range(100):
        name = f"X-{index}-" + "n" * 100_000
        message = kdmq(5060).replace(b"Max-Forwards", name.encode())
        parse_message(message, max_size=1_000_000)
    held = sum(len(name) for name in sip._NAME_CACHE)
    assert held <= sip._NAME_CACHE_LIMIT * sip._NAME_CACHE_MAX_LENGTH
    assert not any(len(name) > sip._NAME_CACHE_MAX_LENGTH for name in sip._NAME_CACHE)


def test_a_trickled_stream_is_cut_as_a_whole_one() -> None:
    stream = b"\r\n".join(kdmq(5060, body=b"b" * size) for size in (0, 1, 700, 5000)) + b"\r\n"
    whole = StreamFramer().feed(stream)
    framer = StreamFramer()
    trickled: list[bytes] = []
    for offset in range(0, len(stream), 7):
        trickled += framer.feed(stream[offset : offset + 7])
    assert trickled == whole
    assert len(whole) == 4
    assert framer.buffered == 0


def test_a_header_section_over_its_cap_is_refused_before_its_end() -> None:
    framer = StreamFramer(max_size=1_000_000, max_head=4096)
    framer.feed(b"KDMQ sip:x@127.0.0.1 SIP/2.0\r\n")
    with pytest.raises(SipParseError) as raised:
        for _ in range(100):
            framer.feed(b"X-Filler: " + b"f" * 100 + b"\r\n")
    assert raised.value.status == 513
    assert "4096" in raised.value.reason


def test_a_message_announced_over_its_cap_is_refused_on_its_headers() -> None:
    framer = StreamFramer(max_size=10_000)
    head = kdmq(5060).split(b"Content-Length: ")[0] + b"Content-Length: 20000\r\n\r\n"
    with pytest.raises(SipParseError) as raised:
        framer.feed(head)  # not one byte of the body sent
    assert "exceeds 10000" in raised.value.reason
