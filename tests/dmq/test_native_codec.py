"""The codec's native fast paths (app/dmq/_sipscan.c) against its Python code.

The Python code in :mod:`app.dmq.sip` is the reference. For every input, a native
function either declines (returns None, and the Python code runs) or returns exactly
what the Python code returns; and it declines whatever the Python code refuses, so
errors (their status and the partly parsed request a reply needs) always come from
the Python code. Each test runs both on the same input: the Kamailio vectors, the
sipp benchmark's requests, table cases aimed at each early exit of the C code, and
Hypothesis (generated, mutated and arbitrary messages, Via and CSeq values).

These run where the extension is built (``make compiled``); on the pure-Python core
they are skipped, and ``tests/compiled`` fails a compiled build that lacks it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.dmq import _sipscan, sip
from app.dmq.sip import SipMessage, SipParseError, SipRequest, Via, parse_cseq, parse_message
from bench.node_cpu import request as sipp_request
from tests.dmq.helpers import VECTORS, mutated
from tests.dmq.test_sip_codec import BASE, MUTATION_SOURCES, messages, replace, wire

pytestmark = pytest.mark.skipif(
    not _sipscan.AVAILABLE, reason="the native codec is not built (make compiled)"
)

T = TypeVar("T")


@contextmanager
def python_only() -> Iterator[None]:
    """Run the codec without its native fast paths."""
    saved = sip._native
    sip._native = False
    try:
        yield
    finally:
        sip._native = saved


def reference(function: Callable[[], T]) -> tuple[str, Any]:
    """What the Python code gives: ("ok", result) or ("error", what the error says)."""
    with python_only():
        try:
            return "ok", function()
        except SipParseError as exc:
            request = exc.request
            read = None if request is None else (request.method, request.uri, list(request.headers))
            return "error", (exc.status, exc.reason, read)
        except ValueError as exc:
            return "error", str(exc)


def fields(message: SipMessage) -> tuple[Any, ...]:
    headers = message.headers
    start = (
        ("request", message.method, message.uri)
        if isinstance(message, SipRequest)
        else ("response", message.code, message.reason)
    )
    return (*start, list(headers), dict(headers.first), list(headers.vias), message.body)


def check_message(data: bytes) -> bool:
    """Native and Python agree on ``data``; True when the native path took it."""
    kind, expected = reference(lambda: parse_message(data))
    stripped = data.lstrip(b"\r\n") if data[:1] in (b"\r", b"\n") else data
    native = _sipscan.scan(stripped) if len(data) <= sip.MAX_UDP_MESSAGE else None
    if native is None:
        return False
    assert kind == "ok", f"native read what Python refuses ({expected!r}): {data!r}"
    method, uri, code, reason, items, first, vias, body = native
    if method is None:
        start: tuple[Any, ...] = ("response", code, reason)
    else:
        start = ("request", method, uri)
    assert (*start, items, first, vias, body) == fields(expected)
    # And parse_message itself, with the fast path on, gives the same message.
    assert fields(parse_message(data)) == fields(expected)
    return True


def check_via(text: str) -> bool:
    kind, expected = reference(lambda: Via.parse(text))
    native = _sipscan.parse_via(text, Via)
    if native is None:
        return False
    assert kind == "ok", f"native read a Via Python refuses ({expected!r}): {text!r}"
    assert type(native) is Via
    assert tuple(native) == tuple(expected)
    assert native.branch == expected.branch
    return True


def check_cseq(text: str) -> bool:
    kind, expected = reference(lambda: parse_cseq(text))
    native = _sipscan.parse_cseq(text)
    if native is None:
        return False
    assert kind == "ok", f"native read a CSeq Python refuses ({expected!r}): {text!r}"
    assert native == expected
    return True


# --------------------------------------------------------------------------- messages


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_every_kamailio_vector_takes_the_fast_path_with_the_same_result(name: str) -> None:
    assert check_message(VECTORS[name])


def test_sipp_benchmark_requests_take_the_fast_path() -> None:
    for number in (0, 7, 12345):
        data = sipp_request(number)
        assert check_message(data)
        message = parse_message(data)
        assert check_via(message.headers.vias[0])
        assert check_cseq(message.headers.first["cseq"])


def test_scan_declines_what_is_not_bytes() -> None:
    data = sipp_request(1)
    assert _sipscan.scan(bytearray(data)) is None
    assert _sipscan.scan(memoryview(data)) is None  # type: ignore[arg-type]


SLOW_CASES = {
    "LF line ends": wire(*BASE, eol="\n"),
    "folded header": wire(*BASE[:3], " ;more", *BASE[3:]),
    "Via list": wire(*replace("Via:", "Via: SIP/2.0/UDP a:1;branch=z9hG4bK1, SIP/2.0/UDP b")),
    "UTF-8 value": wire(*replace("From:", "From: \u00e9 <sip:htable@127.0.0.1:5090>;tag=a")),
    "control byte": wire(*replace("To:", "To: <sip:x@y>\x0b")),
    "lone CR": wire(*replace("To:", "To: <sip:x@y>\rX: 1")),
    "bad version": wire("KDMQ sip:htable@127.0.0.1:5091 SIP/3.0", *BASE[1:]),
    "bad method": wire("KD(Q sip:htable@127.0.0.1:5091 SIP/2.0", *BASE[1:]),
    "three spaces": wire("KDMQ sip:h@1 SIP/2.0 x", *BASE[1:]),
    "URI without colon": wire("KDMQ htable SIP/2.0", *BASE[1:]),
    "no colon": wire(*BASE, "Broken header"),
    "bad name": wire(*BASE, "Bad{Name: 1"),
    "long name": wire(*BASE, "X" * 65 + ": 1"),
    "Content-Length text": wire(*replace("Content-Length", "Content-Length: five")),
    "Content-Length long": wire(*replace("Content-Length", "Content-Length: 0000000005")),
    "short body": wire(*BASE, body=b"hel"),
    "no end of headers": "\r\n".join(BASE).encode(),
    "status 700": wire("SIP/2.0 700 Odd", *BASE[1:]),
    "status 2000": wire("SIP/2.0 2000 Odd", *BASE[1:]),
    "status version": wire("SIP/2.1 200 OK", *BASE[1:]),
}


@pytest.mark.parametrize("name", sorted(SLOW_CASES))
def test_what_the_fast_path_declines_is_left_to_python(name: str) -> None:
    assert not check_message(SLOW_CASES[name])


FAST_CASES = {
    "leading CRLF": b"\r\n" + wire(*BASE),
    "compact forms": wire(
        "KDMQ sip:htable@127.0.0.1:5091 SIP/2.0",
        "v: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK1",
        "f: <sip:htable@127.0.0.1:5090>;tag=a",
        "t: <sip:htable@127.0.0.1:5091>",
        "i: c1@127.0.0.1",
        "CSeq: 10 KDMQ",
        "c: text/plain",
        "l: 5",
    ),
    "odd spacing and case": wire(*replace("Call-ID", "cALL-id \t:\t  c1@127.0.0.1 \t")),
    "two Via lines": wire(*BASE[:2], "Via: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK0", *BASE[2:]),
    "no Content-Length": wire(*[line for line in BASE if "Length" not in line]),
    "body cut to Content-Length": wire(*BASE, body=b"hello, and more"),
    "two Content-Lengths": wire(*BASE, "Content-Length: 99"),
    "response without reason": wire("SIP/2.0 200", *BASE[1:]),
    "response with spaces in reason": wire("SIP/2.0 404 User  Not Found ", *BASE[1:]),
    "unknown header": wire(*BASE, "X-Thing: a, b"),
    "empty value": wire(*BASE, "Subject:"),
}


@pytest.mark.parametrize("name", sorted(FAST_CASES))
def test_fast_path_cases_match_python(name: str) -> None:
    assert check_message(FAST_CASES[name])


@settings(deadline=None, max_examples=300)
@given(messages)
def test_property_generated_messages_match_python(message: SipMessage) -> None:
    check_message(message.to_bytes())


@settings(deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(MUTATION_SOURCES))
def test_property_mutated_vectors_match_python(data: bytes) -> None:
    check_message(data)


ASCII_NOISE = st.text(
    st.sampled_from([*"SIPsip/2.0UDPtcp ;:=,[]\t\r\n\x00\u00e9aZ19", " ", ";", "="]),
    max_size=40,
)


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=300))
def test_property_arbitrary_bytes_match_python(data: bytes) -> None:
    check_message(data)


# --------------------------------------------------------------------------- Via, CSeq

VIA_CASES = [
    ("SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK1;rport", True),
    ("  sip/2.0/tls Node.Test  ", True),
    ("SIP/2.0/UDP h ; branch = b1 ; received=10.0.0.1;;", True),
    ("SIP/2.0/UDP 1.2.3.4 :5060;branch=x", True),
    ("SIP/2.0/UDP h:", True),
    ("SIP/2.0/TCP [::1]:5070;branch=z9hG4bKx", False),
    ("SIP/2.0/UDP h:99999", False),
    ("SIP/2.0/UDP h:0", False),
    ("SIP/2.0/UDP h:0000005060", False),
    ("SIP/2.0/UDP h:1:2", False),
    ("SIP/2.0 h", False),
    ("SIP/2.0/ h", False),
    ("SIP/2.0/UDP", False),
    ("SIP/2.0/UDP ;branch=x", False),
    ("HTTP/1.1/TCP h", False),
    ("SIP/2.0/UDP\th", False),
    ("SIP/2.0/UDP h\u00e9", False),
]


@pytest.mark.parametrize(("text", "fast"), VIA_CASES)
def test_via_cases_match_python(text: str, fast: bool) -> None:
    assert check_via(text) is fast


CSEQ_CASES = [
    ("10 KDMQ", True),
    (" 1  OPTIONS ", True),
    ("0 x-y", True),
    ("KDMQ", False),
    ("x KDMQ", False),
    ("10", False),
    ("10 ", False),
    ("10 K(D", False),
    ("-1 KDMQ", False),
    ("\u00b2 KDMQ", False),
    ("1234567890 KDMQ", False),
    ("10\tKDMQ", False),
]


@pytest.mark.parametrize(("text", "fast"), CSEQ_CASES)
def test_cseq_cases_match_python(text: str, fast: bool) -> None:
    assert check_cseq(text) is fast


@settings(deadline=None, max_examples=500)
@given(ASCII_NOISE)
def test_property_via_and_cseq_noise_match_python(text: str) -> None:
    check_via(text)
    check_cseq(text)
    check_via("SIP/2.0/UDP " + text)
    check_cseq("1 " + text)
