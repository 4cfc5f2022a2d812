"""The SIP codec: Kamailio's captured vectors, table-driven cases, properties, framing.

Cases are fed whole (a datagram) and through :class:`StreamFramer` in every way a
stream can cut them, as in h11's ``test_io.py``.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.dmq.nodes import NodeStatus, parse_node_list
from app.dmq.sip import (
    MAX_UDP_MESSAGE,
    Headers,
    NameAddr,
    SipMessage,
    SipParseError,
    SipRequest,
    SipResponse,
    SipUri,
    StreamFramer,
    Via,
    parse_cseq,
    parse_message,
)
from tests.dmq.helpers import VECTOR_FILES, VECTORS, mutated, vectors_dir

# --------------------------------------------------------------------------- vectors


def vector(name: str) -> bytes:
    if name not in VECTORS:
        pytest.fail(f"vector {name} is missing from {vectors_dir()} (set DMQ_VECTORS_DIR)")
    return VECTORS[name]


def meaning(message: SipMessage) -> tuple[Any, ...]:
    """What a message says. The relative order of header fields with different names is
    not significant (RFC 3261 section 7.3.1), the order of one name's values is; the
    stable sort keeps the latter and forgets the former."""
    if isinstance(message, SipRequest):
        start: tuple[Any, ...] = ("request", message.method, message.uri)
    else:
        start = ("response", message.code, message.reason)
    return (*start, sorted(message.headers, key=lambda item: item[0]), message.body)


def test_the_vectors_directory_holds_kamailio_captures() -> None:
    assert len(VECTOR_FILES) >= 12, f"expected Kamailio's vectors in {vectors_dir()}"


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.name)
def test_every_vector_parses_and_reserialises_to_the_same_meaning(path: Path) -> None:
    data = path.read_bytes()
    message = parse_message(data)
    expected_type = SipRequest if path.name.startswith("request-") else SipResponse
    assert isinstance(message, expected_type)
    assert message.headers.get("cseq") == "10 KDMQ"
    assert message.headers.get("content-length") == str(len(message.body))
    again = parse_message(message.to_bytes())
    assert meaning(again) == meaning(message)
    # The codec writes what it read: the bytes differ from Kamailio's only in where
    # Content-Length is written (we write it last).
    assert sorted(message.to_bytes().split(b"\r\n")) == sorted(data.split(b"\r\n"))


def test_join_vector_fields() -> None:
    message = parse_message(vector("request-notification_peer-mf2.sip"))
    assert isinstance(message, SipRequest)
    assert message.method == "KDMQ"
    assert message.uri == "sip:notification_peer@127.0.0.1:5090"
    assert SipUri.parse(message.uri).user == "notification_peer"
    assert message.headers.get("max-forwards") == "2"
    assert message.headers.get("content-type") == "text/plain"
    assert message.headers.get_all("via") == [
        "SIP/2.0/UDP 127.0.0.1:5091;branch=z9hG4bKbfd6.39406d34000000000000000000000000.0"
    ]
    assert NameAddr.parse(message.headers.get("from") or "").tag == (
        "0bf7951eff7c02982711471478b5006b-9bf9c2c5"
    )
    assert NameAddr.parse(message.headers.get("to") or "").tag is None
    assert message.body == b"sip:127.0.0.1:5091;status=active\r\n"


def test_ping_vector_fields() -> None:
    message = parse_message(vector("request-notification_peer-mf1.sip"))
    assert isinstance(message, SipRequest)
    assert message.headers.get("max-forwards") == "1"
    assert message.headers.get("user-agent") == "kamailio (5.6.3 (x86_64/linux))"
    lines = parse_node_list(message.body).lines
    assert [(str(line.uri), line.status) for line in lines] == [
        ("sip:127.0.0.1:5091", NodeStatus.ACTIVE),
        ("sip:127.0.0.1:5090", NodeStatus.ACTIVE),
    ]


def test_htable_set_vector_fields() -> None:
    message = parse_message(vector("request-htable-action2.sip"))
    assert isinstance(message, SipRequest)
    assert SipUri.parse(message.uri).user == "htable"
    assert message.headers.get("max-forwards") == "1"
    assert message.headers.get("content-type") == "application/json"
    assert message.body == (
        b'{"action":2,"htname":"ht","cname":"greeting","type":2,'
        b'"strval":"hello-from-node1","mode":1}'
    )
    assert len(message.body) == 91


def test_unknown_peer_request_vector_fields() -> None:
    message = parse_message(vector("request-nosuchpeer.sip"))
    assert isinstance(message, SipRequest)
    assert SipUri.parse(message.uri).user == "nosuchpeer"
    assert message.body == b"hello"


@pytest.mark.parametrize(
    ("name", "code", "reason", "body"),
    [
        ("response-200-htable.sip", 200, "OK", b""),
        (
            "response-200-notification_peer-withbody.sip",
            200,
            "OK",
            b"sip:127.0.0.1:5091;status=active\r\nsip:127.0.0.1:5090;status=active\r\n",
        ),
        ("response-400-htable.sip", 400, "Bad Request", b""),
        ("response-404-nosuchpeer.sip", 404, "User Not Found", b""),
    ],
)
def test_response_vector_fields(name: str, code: int, reason: str, body: bytes) -> None:
    message = parse_message(vector(name))
    assert isinstance(message, SipResponse)
    assert (message.code, message.reason, message.body) == (code, reason, body)
    assert NameAddr.parse(message.headers.get("to") or "").tag
    assert message.headers.get("server") == "kamailio (5.6.3 (x86_64/linux))"


# --------------------------------------------------------------------------- table

BASE = [
    "KDMQ sip:htable@127.0.0.1:5091 SIP/2.0",
    "Via: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK1",
    "From: <sip:htable@127.0.0.1:5090>;tag=a",
    "To: <sip:htable@127.0.0.1:5091>",
    "Call-ID: c1@127.0.0.1",
    "CSeq: 10 KDMQ",
    "Content-Type: text/plain",
    "Content-Length: 5",
]
BASE_HEADERS = [
    ("via", "SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK1"),
    ("from", "<sip:htable@127.0.0.1:5090>;tag=a"),
    ("to", "<sip:htable@127.0.0.1:5091>"),
    ("call-id", "c1@127.0.0.1"),
    ("cseq", "10 KDMQ"),
    ("content-type", "text/plain"),
    ("content-length", "5"),
]
TWO_VIAS = [
    ("via", "SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK1"),
    ("via", "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK0"),
]


def wire(*lines: str, body: bytes = b"hello", eol: str = "\r\n") -> bytes:
    return (eol.join(lines) + eol + eol).encode() + body


def replace(old: str, *new: str) -> list[str]:
    """BASE with the line starting with ``old`` replaced by ``new`` lines."""
    out: list[str] = []
    for line in BASE:
        out.extend(new if line.startswith(old) else [line])
    return out


GOOD_CASES = [
    pytest.param(wire(*BASE), BASE_HEADERS, b"hello", id="canonical"),
    pytest.param(
        wire(
            BASE[0],
            "v: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK1",
            "f: <sip:htable@127.0.0.1:5090>;tag=a",
            "t: <sip:htable@127.0.0.1:5091>",
            "i: c1@127.0.0.1",
            "CSeq: 10 KDMQ",
            "c: text/plain",
            "l: 5",
        ),
        BASE_HEADERS,
        b"hello",
        id="compact-names",
    ),
    pytest.param(
        wire(
            BASE[0],
            "VIA: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK1",
            "from: <sip:htable@127.0.0.1:5090>;tag=a",
            "tO: <sip:htable@127.0.0.1:5091>",
            "CALL-id: c1@127.0.0.1",
            "cseq: 10 KDMQ",
            "CONTENT-type: text/plain",
            "Content-LENGTH: 5",
        ),
        BASE_HEADERS,
        b"hello",
        id="case-insensitive-names",
    ),
    pytest.param(
        wire(*replace("Via", "Via  :   SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK1  ")),
        BASE_HEADERS,
        b"hello",
        id="white-space-around-colon-and-value",
    ),
    pytest.param(wire(*BASE, eol="\n"), BASE_HEADERS, b"hello", id="lf-only"),
    pytest.param(b"\r\n\r\n\n" + wire(*BASE), BASE_HEADERS, b"hello", id="leading-crlfs"),
    pytest.param(
        wire(*BASE, body=b"helloEXTRA"), BASE_HEADERS, b"hello", id="body-cut-to-content-length"
    ),
    pytest.param(
        wire(*BASE[:-1], body=b"any\r\nbody"),
        BASE_HEADERS[:-1],
        b"any\r\nbody",
        id="datagram-without-content-length",
    ),
    pytest.param(
        wire(
            *replace(
                "Via",
                "Via: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK1, "
                "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK0",
            )
        ),
        TWO_VIAS + BASE_HEADERS[1:],
        b"hello",
        id="vias-comma-separated",
    ),
    pytest.param(
        wire(
            *replace(
                "Via",
                "Via: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK1",
                "v: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK0",
            )
        ),
        TWO_VIAS + BASE_HEADERS[1:],
        b"hello",
        id="vias-on-several-lines",
    ),
    pytest.param(
        wire(
            *replace(
                "Via",
                "Via: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK1,",
                "  SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK0",
            )
        ),
        TWO_VIAS + BASE_HEADERS[1:],
        b"hello",
        id="vias-comma-separated-and-folded",
    ),
    pytest.param(
        wire(
            *replace(
                "Via",
                'Via: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK1;x="a,b"',
            )
        ),
        [("via", 'SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK1;x="a,b"'), *BASE_HEADERS[1:]],
        b"hello",
        id="comma-in-quoted-via-param-is-not-a-separator",
    ),
    pytest.param(
        wire(*replace("Call-ID", "Subject: first", " second", "\tthird", "Call-ID: c1@127.0.0.1")),
        [*BASE_HEADERS[:3], ("subject", "first second third"), *BASE_HEADERS[3:]],
        b"hello",
        id="folded-header",
    ),
    pytest.param(
        wire(*replace("Content-Length", "Content-Length:", " 5")),
        BASE_HEADERS,
        b"hello",
        id="folded-content-length",
    ),
    pytest.param(
        wire(*replace("Content-Length", "Content-Length: 9"), body=b"a\r\n\r\nbcde", eol="\n"),
        [*BASE_HEADERS[:-1], ("content-length", "9")],
        b"a\r\n\r\nbcde",
        id="lf-only-with-crlf-blank-line-in-body",
    ),
]


@pytest.mark.parametrize(("data", "headers", "body"), GOOD_CASES)
def test_request_parses(data: bytes, headers: list[tuple[str, str]], body: bytes) -> None:
    message = parse_message(data)
    assert isinstance(message, SipRequest)
    assert (message.method, message.uri) == ("KDMQ", "sip:htable@127.0.0.1:5091")
    assert list(message.headers) == headers
    assert message.body == body


@pytest.mark.parametrize(("data", "headers", "body"), GOOD_CASES)
def test_request_reserialises_to_the_same_meaning(
    data: bytes, headers: list[tuple[str, str]], body: bytes
) -> None:
    message = parse_message(data)
    again = parse_message(message.to_bytes())
    expected = meaning(message)
    if "content-length" not in dict(headers):
        # A datagram may omit Content-Length; we always write it.
        expected = (*expected[:3], sorted([*headers, ("content-length", str(len(body)))]), body)
    assert meaning(again) == expected


@pytest.mark.parametrize(("data", "headers", "body"), GOOD_CASES)
def test_request_through_the_stream_framer_byte_by_byte(
    data: bytes, headers: list[tuple[str, str]], body: bytes
) -> None:
    if "content-length" not in dict(headers):
        pytest.skip("a stream needs Content-Length")
    framer = StreamFramer()
    frames: list[bytes] = []
    for index in range(len(data)):
        frames.extend(framer.feed(data[index : index + 1]))
    [frame] = frames
    message = parse_message(frame)
    assert list(message.headers) == headers
    assert message.body == body
    # What follows the message (here "EXTRA") waits for the rest of the next one.
    assert framer.buffered == len(data.lstrip(b"\r\n")) - len(frame)


def test_headers_lookup_is_case_insensitive_and_compact_aware() -> None:
    message = parse_message(wire(*BASE))
    headers = message.headers
    assert headers.get("CALL-ID") == headers.get("i") == "c1@127.0.0.1"
    assert headers.get("V") == "SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK1"
    assert "Content-Type" in headers and "c" in headers
    assert "Subject" not in headers
    assert headers.get("subject", "none") == "none"


def test_responses_parse_with_and_without_a_reason() -> None:
    ok = parse_message(b"SIP/2.0 202 Accepted DMQ\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(ok, SipResponse)
    assert (ok.code, ok.reason) == (202, "Accepted DMQ")
    bare = parse_message(b"SIP/2.0 500\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(bare, SipResponse)
    assert (bare.code, bare.reason) == (500, "")


BAD_CASES = [
    pytest.param(wire(*BASE, body=b"hell"), 400, True, id="body-shorter-than-content-length"),
    pytest.param(
        wire(*replace("Content-Length", "Content-Length: five")), 400, True, id="cl-not-a-number"
    ),
    pytest.param(
        wire(*replace("Content-Length", "Content-Length: -1")), 400, True, id="cl-negative"
    ),
    pytest.param(wire(*replace("Content-Length", "Content-Length:")), 400, True, id="cl-empty"),
    pytest.param(wire("KDMQ sip:htable@127.0.0.1:5091", *BASE[1:]), 400, False, id="two-words"),
    pytest.param(
        wire("KDMQ  sip:htable@127.0.0.1:5091 SIP/2.0", *BASE[1:]), 400, False, id="double-space"
    ),
    pytest.param(
        wire("KD(MQ sip:htable@127.0.0.1:5091 SIP/2.0", *BASE[1:]), 400, False, id="bad-method"
    ),
    pytest.param(wire("KDMQ htable SIP/2.0", *BASE[1:]), 400, False, id="bad-request-uri"),
    pytest.param(
        wire("KDMQ sip:htable@127.0.0.1:5091 SIP/3.0", *BASE[1:]), 505, True, id="bad-version"
    ),
    pytest.param(wire("SIP/1.0 200 OK", "Content-Length: 0", body=b""), 400, False, id="resp-ver"),
    pytest.param(wire("SIP/2.0 20 OK", "Content-Length: 0", body=b""), 400, False, id="code-2"),
    pytest.param(wire("SIP/2.0 700 No", "Content-Length: 0", body=b""), 400, False, id="code-700"),
    pytest.param(wire("SIP/2.0 abc OK", "Content-Length: 0", body=b""), 400, False, id="code-abc"),
    pytest.param(
        wire("SIP/2.0 \u00b200 OK", "Content-Length: 0", body=b""),
        400,
        False,
        id="code-superscript-digit",
    ),
    pytest.param(
        b"KDMQ sip:a@h SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nSubject: caf\xe9\r\n\r\n",
        400,
        False,
        id="non-utf8-header",
    ),
    pytest.param(
        wire(*replace("Call-ID", "Call-ID: c1\rInjected: x")), 400, False, id="stray-cr-in-value"
    ),
    pytest.param(
        wire(*replace("Call-ID", "Call-ID: c1\nInjected: x")), 400, False, id="stray-lf-in-value"
    ),
    pytest.param(
        wire(*replace("Call-ID", "Call-ID: c1\rInjected: x"), eol="\n"),
        400,
        False,
        id="stray-cr-in-lf-message",
    ),
    pytest.param(b"KDMQ sip:a@h SIP/2.0\r\nVia: x\r\n", 400, False, id="no-end-of-headers"),
    pytest.param(b"", 400, False, id="empty"),
    pytest.param(b"\r\n\r\n", 400, False, id="only-crlfs"),
    pytest.param(wire(*replace("Call-ID", "Call-ID c1")), 400, True, id="line-without-colon"),
    pytest.param(wire(*replace("Call-ID", "Call ID: c1")), 400, True, id="bad-header-name"),
    pytest.param(wire(BASE[0], " folded", *BASE[1:]), 400, True, id="continuation-first"),
    pytest.param(b"x" * (MAX_UDP_MESSAGE + 1), 513, False, id="oversized-datagram"),
]


@pytest.mark.parametrize(("data", "status", "has_request"), BAD_CASES)
def test_malformed_message_raises_parse_error_with_status(
    data: bytes, status: int, has_request: bool
) -> None:
    with pytest.raises(SipParseError) as caught:
        parse_message(data)
    assert caught.value.status == status
    assert (caught.value.request is not None) is has_request
    assert caught.value.reason


def test_partly_parsed_request_carries_the_headers_a_reply_needs() -> None:
    with pytest.raises(SipParseError) as caught:
        parse_message(wire(*BASE, body=b"hell"))
    request = caught.value.request
    assert request is not None
    assert request.method == "KDMQ"
    assert request.headers.get("call-id") == "c1@127.0.0.1"
    assert request.headers.get_all("via") == [BASE_HEADERS[0][1]]


def test_bad_version_request_keeps_its_headers_so_it_can_be_answered_505() -> None:
    with pytest.raises(SipParseError) as caught:
        parse_message(wire("KDMQ sip:htable@127.0.0.1:5091 SIP/3.0", *BASE[1:]))
    assert caught.value.status == 505
    request = caught.value.request
    assert request is not None
    assert request.headers.get("cseq") == "10 KDMQ"
    assert request.headers.get_all("via") == [BASE_HEADERS[0][1]]


def test_max_size_is_configurable() -> None:
    data = wire(*BASE)
    assert isinstance(parse_message(data, max_size=len(data)), SipRequest)
    with pytest.raises(SipParseError) as caught:
        parse_message(data, max_size=len(data) - 1)
    assert caught.value.status == 513


# --------------------------------------------------------------------------- properties

TOKEN_ALPHABET = string.ascii_letters + string.digits + "-.!%*_+`'~"
tokens = st.text(TOKEN_ALPHABET, min_size=1, max_size=12)
#: Printable text without CR, LF or other control characters; spaces allowed inside.
line_text = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=30)
header_values = line_text.map(str.strip)
no_space_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Z")), min_size=1, max_size=30
)
other_header_names = tokens.filter(
    lambda name: Headers.canonical(name) not in ("via", "content-length")
)
hosts = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z]{2,5})?", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
)
via_values = st.builds(
    lambda transport, host, port, branch: (
        f"SIP/2.0/{transport} {host}:{port};branch=z9hG4bK{branch}"
    ),
    st.sampled_from(["UDP", "TCP", "TLS"]),
    hosts,
    st.integers(1, 65535),
    tokens,
)
header_items = st.lists(
    st.one_of(
        st.tuples(st.just("via"), via_values),
        st.tuples(other_header_names, header_values),
    ),
    max_size=10,
)
bodies = st.binary(max_size=200)


def build_headers(items: list[tuple[str, str]]) -> Headers:
    headers = Headers()
    for name, value in items:
        headers.add(name, value)
    return headers


requests = st.builds(
    lambda method, uri, items, body: SipRequest(method, uri, build_headers(items), body),
    tokens,
    no_space_text.map(lambda text: "sip:" + text),
    header_items,
    bodies,
)
responses = st.builds(
    lambda code, reason, items, body: SipResponse(code, reason, build_headers(items), body),
    st.integers(100, 699),
    line_text,
    header_items,
    bodies,
)
messages = st.one_of(requests, responses)


def assert_same_message(parsed: SipMessage, original: SipMessage) -> None:
    assert type(parsed) is type(original)
    if isinstance(original, SipRequest):
        assert isinstance(parsed, SipRequest)
        assert (parsed.method, parsed.uri) == (original.method, original.uri)
    else:
        assert isinstance(parsed, SipResponse)
        assert (parsed.code, parsed.reason) == (original.code, original.reason)
    assert list(parsed.headers) == [
        *original.headers,
        ("content-length", str(len(original.body))),
    ]
    assert parsed.body == original.body


@settings(deadline=None, max_examples=300)
@given(messages)
def test_property_generated_messages_round_trip(message: SipMessage) -> None:
    assert_same_message(parse_message(message.to_bytes()), message)


def parse_or_error(data: bytes) -> None:
    try:
        result = parse_message(data)
    except SipParseError as exc:
        assert 400 <= exc.status <= 599
        assert exc.request is None or isinstance(exc.request, SipRequest)
    else:
        assert isinstance(result, SipRequest | SipResponse)


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=600))
def test_property_any_bytes_give_a_message_or_a_parse_error(data: bytes) -> None:
    parse_or_error(data)


MUTATION_SOURCES = [*VECTORS.values(), wire(*BASE)]


@settings(deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(MUTATION_SOURCES))
def test_property_mutated_vectors_give_a_message_or_a_parse_error(data: bytes) -> None:
    parse_or_error(data)


@settings(deadline=None, max_examples=200)
@given(
    st.lists(messages, min_size=1, max_size=4),
    st.lists(st.sampled_from([b"", b"\r\n", b"\r\n\r\n"]), min_size=4, max_size=4),
    st.lists(st.integers(0, 5000), max_size=8),
)
def test_property_stream_framer_cuts_any_split_into_the_messages(
    sent: list[SipMessage], keepalives: list[bytes], cuts: list[int]
) -> None:
    frames = [message.to_bytes() for message in sent]
    stream = b"".join(
        keepalive + frame
        for keepalive, frame in zip(keepalives[: len(frames)], frames, strict=True)
    )
    points = sorted({cut % (len(stream) + 1) for cut in cuts})
    framer = StreamFramer()
    out: list[bytes] = []
    start = 0
    for point in [*points, len(stream)]:
        out.extend(framer.feed(stream[start:point]))
        start = point
    assert out == frames
    assert framer.buffered == 0
    for frame, message in zip(out, sent, strict=True):
        assert_same_message(parse_message(frame), message)


@settings(deadline=None, max_examples=200)
@given(st.one_of(st.binary(max_size=400), mutated(MUTATION_SOURCES)))
def test_property_stream_framer_gives_frames_or_a_parse_error(data: bytes) -> None:
    framer = StreamFramer(max_size=2048)
    try:
        frames = framer.feed(data)
    except SipParseError as exc:
        assert exc.status in (400, 513)
    else:
        assert all(frame in data for frame in frames)


# --------------------------------------------------------------------------- framing

M1 = wire(*BASE)
M2 = wire(*replace("Content-Length", "Content-Length: 0"), body=b"")
M3 = vector("response-200-notification_peer-withbody.sip") if VECTORS else wire(*BASE)


def test_framer_whole_message_in_one_read() -> None:
    framer = StreamFramer()
    assert framer.feed(M1) == [M1]
    assert framer.buffered == 0


def test_framer_message_byte_by_byte() -> None:
    framer = StreamFramer()
    for index in range(len(M1) - 1):
        assert framer.feed(M1[index : index + 1]) == []
    assert framer.buffered == len(M1) - 1
    assert framer.feed(M1[-1:]) == [M1]
    assert framer.buffered == 0


def test_framer_several_messages_in_one_read() -> None:
    assert StreamFramer().feed(M1 + M2 + M3) == [M1, M2, M3]


def test_framer_keeps_a_partial_message_for_the_next_read() -> None:
    framer = StreamFramer()
    assert framer.feed(M1 + M2[:10]) == [M1]
    assert framer.buffered == 10
    assert framer.feed(M2[10:] + M3) == [M2, M3]


def test_framer_skips_crlf_keepalives_between_messages() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r\n" + M1 + b"\r\n" + M2 + b"\r\n\r\n\r\n") == [M1, M2]
    assert framer.feed(b"\r\n") == []
    assert framer.buffered == 0
    assert framer.feed(M3) == [M3]


def test_framer_accepts_compact_content_length() -> None:
    message = wire(*replace("Content-Length", "l: 5"))
    assert StreamFramer().feed(message + M2) == [message, M2]


def test_framer_lf_only_message_with_crlf_blank_line_in_body() -> None:
    message = wire(*replace("Content-Length", "Content-Length: 9"), body=b"a\r\n\r\nbcde", eol="\n")
    assert StreamFramer().feed(message + M2) == [message, M2]


def test_framer_requires_content_length() -> None:
    with pytest.raises(SipParseError) as caught:
        StreamFramer().feed(wire(*BASE[:-1]))
    assert caught.value.status == 400


def test_framer_rejects_bad_content_length() -> None:
    with pytest.raises(SipParseError):
        StreamFramer().feed(wire(*replace("Content-Length", "Content-Length: x")))
    with pytest.raises(SipParseError):
        StreamFramer().feed(wire(*replace("Content-Length", "Content-Length: -3")))


def test_framer_rejects_an_oversized_message_before_its_body_arrives() -> None:
    framer = StreamFramer(max_size=1024)
    head = wire(*replace("Content-Length", "Content-Length: 2000"), body=b"")
    with pytest.raises(SipParseError) as caught:
        framer.feed(head)
    assert caught.value.status == 513


def test_framer_rejects_headers_that_never_end() -> None:
    framer = StreamFramer(max_size=1024)
    assert framer.feed(b"KDMQ sip:a@h SIP/2.0\r\n") == []
    with pytest.raises(SipParseError) as caught:
        framer.feed(b"X-Filler: " + b"y" * 1100)
    assert caught.value.status == 513


def test_framer_accepts_a_message_of_exactly_max_size() -> None:
    framer = StreamFramer(max_size=len(M1))
    assert framer.feed(M1) == [M1]


# --------------------------------------------------------------------------- URIs

URI_CASES = [
    ("sip:127.0.0.1:5060", "127.0.0.1", 5060, None, "udp", 5060, ()),
    ("sip:htable@127.0.0.1:5091", "127.0.0.1", 5091, "htable", "udp", 5091, ()),
    ("sip:node-a.test", "node-a.test", None, None, "udp", 5060, ()),
    ("SIP:Node-A.Test:7000", "node-a.test", 7000, None, "udp", 7000, ()),
    ("sips:h", "h", None, None, "tls", 5061, ()),
    ("sip:h;transport=TCP", "h", None, None, "tcp", 5060, (("transport", "TCP"),)),
    ("sip:h;transport=tls", "h", None, None, "tls", 5061, (("transport", "tls"),)),
    ("sip:[::1]:5070", "::1", 5070, None, "udp", 5070, ()),
    ("sip:dmq@[2001:DB8::1];transport=tcp", "2001:db8::1", None, "dmq", "tcp", 5060, ()),
    ("sip:user:secret@h:1", "h", 1, "user", "udp", 1, ()),
    ("<sip:h:65535>", "h", 65535, None, "udp", 65535, ()),
    (
        "sip:127.0.0.1:5090;lr;status=active",
        "127.0.0.1",
        5090,
        None,
        "udp",
        5090,
        (("lr", None), ("status", "active")),
    ),
    ("sip:h:5060?subject=x", "h", 5060, None, "udp", 5060, ()),
]


@pytest.mark.parametrize(
    ("text", "host", "port", "user", "transport", "effective_port", "params"), URI_CASES
)
def test_sip_uri_parses(
    text: str,
    host: str,
    port: int | None,
    user: str | None,
    transport: str,
    effective_port: int,
    params: tuple[tuple[str, str | None], ...],
) -> None:
    parsed = SipUri.parse(text)
    assert (parsed.host, parsed.port, parsed.user) == (host, port, user)
    assert parsed.transport == transport
    assert parsed.effective_port == effective_port
    if params:
        assert parsed.params == params
    assert SipUri.parse(str(parsed)) == parsed


def test_sip_uri_params_and_rewrites() -> None:
    parsed = SipUri.parse("sip:127.0.0.1:5090;transport=tcp;lr;status=active")
    assert parsed.param("status") == "active"
    assert parsed.param("lr") == ""
    assert parsed.param("missing") is None
    assert (
        str(parsed.with_user("htable"))
        == "sip:htable@127.0.0.1:5090;transport=tcp;lr;status=active"
    )
    assert str(SipUri.parse("sip:[::1]:5070")) == "sip:[::1]:5070"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "http://example.com",
        "127.0.0.1:5060",
        "sip:",
        "sip:@h",
        "sip::5060",
        "sip:h:0",
        "sip:h:65536",
        "sip:h:abc",
        "sip:h:-1",
        "sip:h:\u00b2",
        "sip:[::1",
        "sip:[::1]x",
        "sip:[]:5060",
    ],
)
def test_bad_sip_uri_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        SipUri.parse(text)


def test_name_addr_with_display_name_uri_params_and_tag() -> None:
    parsed = NameAddr.parse('"Node A" <sip:htable@127.0.0.1:5090;transport=tcp>;tag=abc;x')
    assert parsed.uri.user == "htable"
    assert parsed.uri.transport == "tcp"
    assert parsed.tag == "abc"
    assert parsed.params == (("tag", "abc"), ("x", None))


def test_name_addr_addr_spec_params_belong_to_the_header() -> None:
    parsed = NameAddr.parse("sip:htable@127.0.0.1:5090;tag=xyz")
    assert parsed.uri == SipUri.parse("sip:htable@127.0.0.1:5090")
    assert parsed.tag == "xyz"
    assert NameAddr.parse("<sip:h>").tag is None


@pytest.mark.parametrize("text", ["<sip:h", "<http://h>", "", "mailto:x@y"])
def test_bad_name_addr_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        NameAddr.parse(text)


VIA_CASES = [
    (
        "SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK1;rport",
        "udp",
        "127.0.0.1",
        5090,
        "z9hG4bK1",
    ),
    ("SIP/2.0/TCP [::1]:5070;branch=z9hG4bKx", "tcp", "::1", 5070, "z9hG4bKx"),
    ("sip/2.0/tls Node.Test", "tls", "node.test", None, None),
    ("SIP/2.0/UDP h ; branch = b1 ; received=10.0.0.1", "udp", "h", None, "b1"),
]


@pytest.mark.parametrize(("text", "transport", "host", "port", "branch"), VIA_CASES)
def test_via_parses(
    text: str, transport: str, host: str, port: int | None, branch: str | None
) -> None:
    parsed = Via.parse(text)
    assert (parsed.transport, parsed.host, parsed.port, parsed.branch) == (
        transport,
        host,
        port,
        branch,
    )


def test_via_flag_params_read_as_empty() -> None:
    parsed = Via.parse("SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK1;rport")
    assert parsed.param("rport") == ""
    assert parsed.param("received") is None


@pytest.mark.parametrize(
    "text", ["SIP/2.0 h", "HTTP/1.1/TCP h", "SIP/2.0/UDP", "SIP/2.0/UDP h:99999", "SIP/2.0/ h"]
)
def test_bad_via_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        Via.parse(text)


@pytest.mark.parametrize(
    ("text", "expected"), [("10 KDMQ", (10, "KDMQ")), (" 1  OPTIONS", (1, "OPTIONS"))]
)
def test_cseq_parses(text: str, expected: tuple[int, str]) -> None:
    assert parse_cseq(text) == expected


@pytest.mark.parametrize("text", ["KDMQ", "x KDMQ", "10", "10 K(D", "-1 KDMQ", "\u00b2 KDMQ"])
def test_bad_cseq_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cseq(text)
