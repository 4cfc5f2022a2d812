"""The htable codec against Kamailio 5.6.3's own bodies, and by property.

Every body in ``captures/htable`` (captured from Kamailio 5.6.3 on a loopback lab)
parses; each one Kamailio sends compact is rebuilt byte for byte; any message the
codec can build parses back to itself; and what a 5.6 node answers 400 is refused with
the kind the metrics count.
"""

from __future__ import annotations

import importlib.machinery
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import app.kamailio.htable_codec as codec
from app.dmq import _sipscan
from app.dmq.sip import SipRequest, parse_message
from app.kamailio.htable_codec import (
    INT32_MAX,
    INT32_MIN,
    Cell,
    DeleteCell,
    HtableMessage,
    MalformedBody,
    RemoveCells,
    SetCell,
    SetCellExpire,
    SyncAnswer,
    SyncRequest,
    Unsupported,
    build,
    parse,
    read_full,
    read_set,
)

CAPTURES = Path(__file__).parent / "captures" / "htable"
JSON_CAPTURES = sorted(CAPTURES.glob("*.json"))
SIP_CAPTURES = sorted(CAPTURES.glob("*.sip"))


def test_the_captures_are_there() -> None:
    # A glob that matched nothing would make the parametrized tests vanish.
    assert len(JSON_CAPTURES) == 15 and len(SIP_CAPTURES) == 3


@pytest.mark.parametrize("path", JSON_CAPTURES, ids=lambda p: p.name)
def test_every_captured_body_parses(path: Path) -> None:
    body = path.read_bytes()
    message = parse(body)
    assert not isinstance(message, Unsupported)
    document = json.loads(body)
    if "cells" in document:
        assert isinstance(message, SyncAnswer)
        assert len(message.cells) == len(document["cells"])
        # Parsed the same as json.loads reads it, cell by cell.
        for cell, raw in zip(message.cells, document["cells"], strict=True):
            assert cell.cname == raw["cname"]
            assert cell.value == raw.get("strval", raw.get("intval"))
            assert cell.expire == raw["expire"]
    # Kamailio writes unformatted JSON: rebuilt byte for byte (02 is pretty-printed
    # in the captures; it is compared as JSON).
    rebuilt = build(message)
    if body.strip().startswith(b"{\n"):
        assert json.loads(rebuilt) == document
    else:
        assert rebuilt == body.strip()


@pytest.mark.parametrize("path", SIP_CAPTURES, ids=lambda p: p.name)
def test_every_captured_sip_message_body_parses(path: Path) -> None:
    message = parse_message(path.read_bytes())
    assert isinstance(message, SipRequest)
    assert message.uri.startswith("sip:htable@")
    parsed = parse(message.body)
    assert build(parsed) == message.body


def test_the_captured_actions_read_as_kamailio_means_them() -> None:
    read = {p.name: parse(p.read_bytes()) for p in JSON_CAPTURES}
    assert read["01-sync-request.json"] == SyncRequest()
    assert read["10-set-str.json"] == SetCell("ht", "live_s", "hello-live", 1)
    assert read["12-set-int-negative.json"] == SetCell("ht", "neg", -5, 1)
    assert read["14-set-expire.json"] == SetCellExpire("ht", "live_s", 90)
    assert read["16-delete.json"] == DeleteCell("ht", "live_i")
    assert read["17-rm-name-regex.json"] == RemoveCells("ht", "re", "name", "^tmp_")
    assert read["18-rm-value-regex.json"] == RemoveCells("ht", "re", "value", "^old-")
    assert read["19-rm-name-startswith.json"] == RemoveCells("ht", "sw", "name", "pre_")
    assert read["03-sync-answer-empty.json"] == SyncAnswer(())
    cells = read["02-sync-answer-cells.json"]
    assert isinstance(cells, SyncAnswer)
    by_name = {(c.htname, c.cname): c for c in cells.cells}
    assert by_name["ht", "n1"] == Cell("ht", "n1", 42, 0)
    assert by_name["ht", "quote"].value == 'he said "hi"\\tand left'
    assert by_name["hx", "e1"].expire > 0


# ---------------------------------------------------------------------- strictness


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"not json", "json"),
        (b"\xff\xfe", "json"),
        (b"[1,2]", "shape"),
        (b"{}", "shape"),
        # master's last-write-wins field: a 5.6 node answers 400
        (
            b'{"action":2,"htname":"ht","cname":"k","type":2,"strval":"v","mode":1,'
            b'"last_modified":1796118594000}',
            "field",
        ),
        (b'{"action":"2","htname":"ht","cname":"k"}', "type"),
        (b'{"action":true,"htname":"ht","cname":"k"}', "type"),
        (b'{"action":2,"htname":7,"cname":"k","type":0,"intval":1,"mode":1}', "type"),
        (b'{"action":2,"htname":"ht","cname":"k","type":0,"intval":2147483648,"mode":1}', "range"),
        (b'{"action":2,"htname":"ht","cname":"k","type":0,"intval":1.5,"mode":1}', "type"),
        (b'{"action":2,"htname":"ht","type":0,"intval":1,"mode":1}', "missing"),
        (b'{"action":4,"cname":"k","mode":0}', "missing"),
        (b'{"action":5,"htname":"ht","type":2,"mode":0}', "missing"),
        (b'{"action":2,"htname":"ht","cname":"a\\u0000b","type":0,"intval":1}', "type"),
        (b'{"cells":{}}', "shape"),
        (b'{"cells":[1]}', "shape"),
        (b'{"cells":[{"htname":"ht","cname":"k","type":0,"intval":"x","expire":0}]}', "type"),
    ],
)
def test_what_a_56_node_refuses_is_refused(body: bytes, kind: str) -> None:
    with pytest.raises(MalformedBody) as caught:
        parse(body)
    assert caught.value.kind == kind


def test_tolerant_where_kamailio_is() -> None:
    # Duplicate keys: the last one wins, as in Kamailio's loop over the fields.
    assert parse(b'{"action":2,"htname":"ht","cname":"a","cname":"b","type":0,"intval":1}') == (
        SetCell("ht", "b", 1, 0)
    )
    # A SET without the value its type names: 5.6 stores an empty one (200).
    message = parse(b'{"action":2,"htname":"ht","cname":"k","type":2,"mode":1}')
    assert message == SetCell("ht", "k", "", 1, value_missing=True)
    # Unknown fields of a sync cell are warned about by Kamailio, not refused, and a
    # cell without both names is skipped.
    answer = parse(
        b'{"cells":[{"htname":"ht","cname":"k","type":0,"intval":3,"expire":0,'
        b'"last_modified":5},{"htname":"ht","type":0,"intval":4,"expire":0}]}'
    )
    assert answer == SyncAnswer((Cell("ht", "k", 3, 0),), skipped=1)
    # Integral doubles are numbers to srjson.
    assert parse(b'{"action":4,"htname":"ht","cname":"k","mode":0.0}') == DeleteCell("ht", "k")


@pytest.mark.parametrize("action", [0, 7, 8, 9, -1])
def test_actions_a_56_node_cannot_replay_are_unsupported(action: int) -> None:
    message = parse(json.dumps({"action": action, "htname": "ht", "mode": 0}).encode())
    assert message == Unsupported(action, "ht")
    with pytest.raises(ValueError):
        build(message)


@pytest.mark.parametrize(
    "message",
    [
        SetCell("ht", "k", INT32_MAX + 1),
        SetCell("ht", "k", True),
        SetCell("ht", "k\x00", "v"),
        SetCellExpire("ht", "k", 2**31),
    ],
)
def test_build_refuses_what_kamailio_cannot_carry(message: HtableMessage) -> None:
    with pytest.raises(ValueError):
        build(message)


# ---------------------------------------------------------------------- properties

names = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), min_size=1)
texts = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]))
int32 = st.integers(INT32_MIN, INT32_MAX)
values = st.one_of(texts, int32)
messages = st.one_of(
    st.builds(SyncRequest, st.none() | names),
    st.builds(SetCell, names, names, values, int32),
    st.builds(SetCellExpire, names, names, int32),
    st.builds(DeleteCell, names, names),
    st.builds(
        RemoveCells, names, st.sampled_from(["re", "sw"]), st.sampled_from(["name", "value"]), texts
    ),
    st.builds(
        SyncAnswer,
        st.lists(st.builds(Cell, names, names, values, int32), max_size=20).map(tuple),
    ),
)


@given(messages)
def test_build_then_parse_is_the_identity(message: HtableMessage) -> None:
    assert parse(build(message)) == message


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_are_refused_cleanly(body: bytes) -> None:
    try:
        parse(body)
    except MalformedBody as exc:
        assert exc.kind in {"json", "shape", "field", "type", "range", "missing"}


# The usual SET body is read by a shortcut (htable_codec.read_set, one scan of its
# bytes), and other bodies are decoded without json's encoding guess; everything
# the shortcut does not take goes the full way. These properties check that the
# shortcut never changes an outcome: for bodies near a SET (each field right, of a
# wrong type, out of range, with a NUL, escaped, missing, an extra field, in
# Kamailio's order or another, compact or not, any encoding json accepts, any bytes
# in the names and numbers), parse gives the same message or the same refusal with
# the shortcut and without it.

field_values = st.one_of(
    st.integers(INT32_MIN - 2, INT32_MIN + 2),
    st.integers(INT32_MAX - 2, INT32_MAX + 2),
    st.integers(-3, 9),
    st.booleans(),
    st.none(),
    st.sampled_from([2.0, 2.5, -0.0, 1e10]),
    st.text(max_size=4),
    st.sampled_from(["ht", "k\x00", "", "é", 'a"b', "a\\b", "\ud800"]),
    st.lists(st.integers(), max_size=2),
)
#: Kamailio's order (strval or intval, then mode), and a field it never sends.
KEYS = ["action", "htname", "cname", "type", "strval", "intval", "mode", "extra"]
USUAL: dict[str, object] = {"action": 2, "htname": "ht", "cname": "k", "type": 2, "strval": "v"}
near_set = st.tuples(
    st.dictionaries(st.sampled_from(KEYS), field_values, max_size=3),
    st.sets(st.sampled_from(KEYS), max_size=2),
).map(lambda t: {k: v for k, v in (USUAL | {"mode": 1} | t[0]).items() if k not in t[1]})
encodings = st.sampled_from(
    ["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"]
)


def outcome(body: bytes) -> object:
    try:
        return parse(body)
    except MalformedBody as exc:
        return (exc.kind, exc.detail)


def full_reading(body: bytes) -> object:
    """parse without the shortcut: json.loads itself, and every field read in turn."""
    try:
        return read_full(body, json.loads)
    except MalformedBody as exc:
        return (exc.kind, exc.detail)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(
    near_set,
    st.none() | st.permutations(range(len(KEYS))),
    st.booleans(),
    st.booleans(),
    encodings,
)
def test_the_shortcut_reads_a_set_as_the_full_reading_does(
    document: dict[str, object],
    order: list[int] | None,
    compact: bool,
    ascii_only: bool,
    encoding: str,
) -> None:
    rank = order or list(range(len(KEYS)))  # None: Kamailio's order
    shuffled = dict(sorted(document.items(), key=lambda item: rank[KEYS.index(item[0])]))
    separators = (",", ":") if compact else None
    try:
        text = json.dumps(shuffled, ensure_ascii=ascii_only, separators=separators)
        body = text.encode(encoding)
    except UnicodeEncodeError:
        body = text.encode("utf-8", "surrogatepass")  # a lone surrogate
    assert outcome(body) == full_reading(body)


raw_text = st.binary(max_size=6) | st.sampled_from([b"\xc3\xa9", b"\xed\xa0\x80", b"\\u00e9"])
raw_number = st.integers(INT32_MIN - 2, INT32_MAX + 2).map(lambda n: str(n).encode()) | (
    st.sampled_from([b"-0", b"01", b"1.0", b"1e2", b"", b" 2", b"99999999999", b"-"])
    | st.sampled_from([INT32_MIN - 1, INT32_MIN, INT32_MAX, INT32_MAX + 1]).map(
        lambda n: str(n).encode()
    )
)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw_text,
    raw_text,
    raw_number,
    raw_number,
    st.booleans(),
    st.sampled_from([b"2", b"0", b"3"]),
    st.sampled_from([b"", b"\r\n", b"\n", b" \t\r\n", b"\x0b", b"\x00", b"\r\n}", b"\xc2\xa0"]),
)
def test_the_shortcut_reads_any_bytes_in_the_fields_as_the_full_reading_does(
    name: bytes, value: bytes, number: bytes, mode: bytes, as_text: bool, type_: bytes, end: bytes
) -> None:
    field = b'"strval":"' + value + b'"' if as_text else b'"intval":' + number
    body = (
        b'{"action":2,"htname":"ht","cname":"'
        + name
        + b'","type":'
        + type_
        + b","
        + field
        + b',"mode":'
        + mode
        + b"}"
        + end
    )
    assert outcome(body) == full_reading(body)
    assert_every_reading_agrees(body)


def assert_every_reading_agrees(body: bytes) -> None:
    """Every way of reading the usual SET, whichever this build runs: the regular
    expression, the compiled scan, and the native one where it is built."""
    expected = codec._match_set(body)
    assert codec._scan_set(body) == expected, body
    if _sipscan.AVAILABLE:
        native = _sipscan.scan_set(body)
        assert native == expected, body
        # The same types too (an int value is not a str, and bool is no int here).
        assert [type(part) for part in native or ()] == [type(p) for p in expected or ()]


@given(st.binary(max_size=40).map(lambda tail: b"{" + tail))
def test_the_shortcut_decodes_bytes_as_json_does(body: bytes) -> None:
    assert outcome(body) == full_reading(body)


def test_the_shortcut_takes_the_usual_set() -> None:
    """The properties above are only worth something if the shortcut is taken: every
    SET Kamailio sent in the captures, string or integer, comes out of it whole."""
    taken = 0
    for path in JSON_CAPTURES:
        body = path.read_bytes().strip()
        message = parse(body)
        if isinstance(message, SetCell) and not message.value_missing:
            assert read_set(body) == (message.htname, message.cname, message.value, message.mode)
            taken += 1
    assert taken >= 2
    assert read_set(build(SetCell("h", "ké", -5, 1))) == ("h", "ké", -5, 1)
    assert read_set(build(SetCell("h", "c", "v", 1)) + b"\r\n") == ("h", "c", "v", 1)  # sipp's
    assert read_set(build(SetCell("h", "c", 'a"b', 1))) is None  # escaped: the full way


#: Bytes that steer the shortcut's scan: quotes and escapes ending or refusing a name,
#: digits, signs and separators around numbers, braces, whitespace, control and
#: non-UTF-8 bytes.
STEERING = b'"\\0159-+.,:{} \t\r\n\x00\x1f\x7f\xc3\xff'


@pytest.mark.parametrize(
    "usual",
    [
        b'{"action":2,"htname":"ht","cname":"k-1","type":2,"strval":"v\xc3\xa9","mode":1}',
        b'{"action":2,"htname":"ht","cname":"k-2","type":0,"intval":-2147483648,"mode":1}',
    ],
    ids=["strval", "intval"],
)
def test_the_shortcut_agrees_with_the_full_reading_on_every_cut_and_every_byte(
    usual: bytes,
) -> None:
    """Kamailio's SET body cut at every length, and with each byte replaced in turn by
    each byte that steers the scan: every one reads as the full reading reads it (the
    shortcut takes it or leaves it to the full reading, never reads it otherwise)."""
    assert read_set(usual) is not None
    assert read_set(usual + b" \t\r\n") == read_set(usual)  # JSON's whitespace after it
    bodies = [usual[:size] for size in range(len(usual))]
    bodies += [
        usual[:at] + bytes([byte]) + usual[at + 1 :]
        for at in range(len(usual))
        for byte in STEERING
    ]
    bodies += [usual + end for end in (b" \t\r\n", b"\x0b", b"}", b"\x00")]
    for body in bodies:
        assert outcome(body) == full_reading(body), body
        assert_every_reading_agrees(body)


def test_the_compiled_codec_scans_and_the_python_one_matches() -> None:
    """read_set takes the way that is fastest where it runs: the scan when the codec
    is compiled, the regular expression when it is Python."""
    compiled = str(codec.__file__).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert codec._SCANNED is compiled
    # The native scan is built with the compiled core, and read_set takes it there.
    assert codec._NATIVE is _sipscan.AVAILABLE
    if _sipscan.AVAILABLE:
        body = build(SetCell("ht", "k", "v", 1))
        assert _sipscan.scan_set(body) == read_set(body) == ("ht", "k", "v", 1)
        with pytest.raises(TypeError):
            _sipscan.scan_set(bytearray(body))  # type: ignore[arg-type]
