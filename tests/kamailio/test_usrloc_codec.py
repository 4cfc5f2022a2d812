"""The usrloc codec: every body captured from Kamailio 5.6.3, strictness, properties.

Captured bodies are the contract: each one parses, and the compact ones (as Kamailio
sends them) are rebuilt byte for byte. Build then parse is the identity for any
message (Hypothesis). Every departure from 5.6's exact field set is refused with a
reason, because the replica must never store a half-read contact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.dmq.sip import SipRequest, parse_message
from app.kamailio import usrloc
from app.kamailio._json import UINT32_MAX, BodyError

CAPTURES = Path(__file__).parent / "captures" / "usrloc"
BODIES = sorted(CAPTURES.glob("*.json"))
KINDS = {"json", "shape", "field", "missing", "duplicate", "type", "range", "action"}


def test_the_capture_set_is_there() -> None:
    names = {p.name for p in BODIES}
    assert {"01-sync-request.json", "05-sync-answer-multi.json"} <= names
    assert len(BODIES) >= 7


@pytest.mark.parametrize("path", BODIES, ids=lambda p: p.name)
def test_every_captured_body_parses_and_builds_back(path: Path) -> None:
    raw = path.read_bytes()
    message = usrloc.parse(raw)
    rebuilt = usrloc.build(message)
    assert json.loads(rebuilt) == json.loads(raw)
    if b": " not in raw:  # compact, as Kamailio sends it: the very bytes come back
        assert rebuilt == raw.strip()
    assert usrloc.parse(rebuilt) == message


def test_the_captured_kdmq_request_body_is_rebuilt_byte_for_byte() -> None:
    request = parse_message((CAPTURES / "usrloc-update.sip").read_bytes())
    assert isinstance(request, SipRequest)
    message = usrloc.parse(request.body)
    assert usrloc.build(message) == request.body
    assert isinstance(message, usrloc.ContactMessage)
    assert message.action == usrloc.Action.UPDATE
    assert message.contact.aor == "carol"
    assert message.contact.ruid == "uloc-6b0e9718-44ad-1"
    assert message.contact.methods == usrloc.ALL_METHODS
    assert message.contact.q == usrloc.Q_UNSET


def test_the_captured_actions() -> None:
    def read(name: str) -> usrloc.UsrlocMessage:
        return usrloc.parse((CAPTURES / name).read_bytes())

    assert read("01-sync-request.json") == usrloc.SyncRequest()
    new, refresh, rm = (
        read("02-update-new-contact.json"),
        read("03-update-refresh.json"),
        read("04-rm-unregister.json"),
    )
    assert isinstance(new, usrloc.ContactMessage) and isinstance(refresh, usrloc.ContactMessage)
    assert isinstance(rm, usrloc.ContactMessage)
    assert (new.action, refresh.action, rm.action) == (1, 1, 2)
    assert new.contact.ruid == refresh.contact.ruid == rm.contact.ruid
    assert (new.contact.cseq, refresh.contact.cseq) == (1, 2)
    multi = read("05-sync-answer-multi.json")
    assert isinstance(multi, usrloc.Multi)
    assert len(multi.items) == 10
    assert len({item.contact.ruid for item in multi.items}) == 10
    single = read("06-sync-answer-single.json")
    assert single == multi.items[0]


CONTACT = json.loads((CAPTURES / "03-update-refresh.json").read_bytes())


def _body(**changes: object) -> bytes:
    data = {**CONTACT, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not _DROP}).encode()


_DROP = object()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"\xff{}", "not UTF-8"),
        (b"[]", "must be a JSON object"),
        (b"{}", "missing 'action'"),
        (b'{"action":9}', "unknown action 9"),
        (b'{"action":"3"}', "'action' must be an integer"),
        (b'{"action":true}', "'action' must be an integer"),
        (b'{"action":3.0}', "'action' must be an integer"),
        (b'{"action":3,"aor":"x"}', "unknown field 'aor'"),
        (b'{"action":3,"action":3}', "more than once"),
        (b'{"action":NaN}', "not JSON"),
        (_body(last_modified=_DROP), "missing 'last_modified'"),
        (_body(xavps={}), "unknown field 'xavps'"),
        (_body(expires=-1), "out of range"),
        (_body(expires=UINT32_MAX + 1), "out of range"),
        (_body(q=1001), "out of range"),
        (_body(q=-2), "out of range"),
        (_body(aor=None), "'aor' must be a string, not null"),
        (_body(c=5), "'c' must be a string"),
        (_body(ruid="a\u0000b"), "NUL"),
        (b'{"multi":[]}', "'multi' must be an object"),
        (b'{"multi":{"1":{"action":3}}}', "a batch holds contact"),
        (b'{"multi":{"1":5}}', "must be a JSON object"),
        (b'{"multi":{},"action":1}', "one key"),
    ],
)
def test_a_body_off_the_5_6_field_set_is_refused_saying_why(body: bytes, reason: str) -> None:
    with pytest.raises(BodyError, match=reason) as refused:
        usrloc.parse(body)
    assert refused.value.kind in KINDS  # the word /metrics counts it under


def test_a_socket_is_read_when_the_sender_replicates_it() -> None:
    body = _body(sock="udp:127.0.0.1:5060")
    message = usrloc.parse(body)
    assert isinstance(message, usrloc.ContactMessage)
    assert message.contact.sock == "udp:127.0.0.1:5060"
    # Kamailio writes it right after "received".
    assert b'"received":"","sock":"udp:127.0.0.1:5060","path"' in usrloc.build(message)


# ------------------------------------------------------------------------ properties

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
_u32 = st.integers(0, UINT32_MAX)
contacts = st.builds(
    usrloc.Contact,
    aor=_text,
    ruid=_text,
    c=_text,
    received=_text,
    path=_text,
    callid=_text,
    user_agent=_text,
    instance=_text,
    expires=_u32,
    cseq=st.integers(0, 2**31 - 1),
    flags=_u32,
    cflags=_u32,
    q=st.integers(-1, 1000),
    last_modified=_u32,
    methods=_u32,
    reg_id=_u32,
    server_id=st.integers(0, 2**31 - 1),
    sock=st.none() | _text,
)
contact_messages = st.builds(
    usrloc.ContactMessage, st.sampled_from([usrloc.Action.UPDATE, usrloc.Action.RM]), contacts
)
messages = (
    contact_messages
    | st.just(usrloc.SyncRequest())
    | st.just(usrloc.Nop())
    | st.builds(usrloc.Multi, st.lists(contact_messages, max_size=5).map(tuple))
)


@given(messages)
def test_build_then_parse_is_the_identity(message: usrloc.UsrlocMessage) -> None:
    body = usrloc.build(message)
    assert usrloc.parse(body) == message
    json.loads(body)  # and it is plain JSON to anyone else


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_are_refused_with_a_reason(body: bytes) -> None:
    try:
        usrloc.parse(body)
    except BodyError as exc:
        assert str(exc)
