"""The dialog codec: every body captured from Kamailio 5.6.3, 5.6's quirks, properties.

The quirks are the point: a 5.6 UPDATE of an early or confirmed dialog repeats the
caller's leg keys (a sync answer shows it), and ``profiles`` is a JSON document inside
a JSON string. Captured bodies parse and are rebuilt byte for byte; build then parse
is the identity (Hypothesis); anything off 5.6's field sets is refused with a reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.dmq.sip import SipRequest, parse_message
from app.kamailio import dialog
from app.kamailio._json import UINT32_MAX, BodyError

CAPTURES = Path(__file__).parent / "captures" / "dialog"
BODIES = sorted(CAPTURES.glob("*.json"))
KINDS = {"json", "shape", "field", "missing", "duplicate", "type", "range", "action"}


def test_the_capture_set_is_there() -> None:
    assert len(BODIES) >= 8


@pytest.mark.parametrize("path", BODIES, ids=lambda p: p.name)
def test_every_captured_body_is_rebuilt_byte_for_byte(path: Path) -> None:
    raw = path.read_bytes().strip()
    message = dialog.parse(raw)
    assert dialog.build(message) == raw
    assert dialog.parse(dialog.build(message)) == message


def test_the_captured_kdmq_request_body_is_rebuilt_byte_for_byte() -> None:
    request = parse_message((CAPTURES / "dialog-update.sip").read_bytes())
    assert isinstance(request, SipRequest)
    assert dialog.build(dialog.parse(request.body)) == request.body


def _read(name: str) -> dialog.DialogMessage:
    return dialog.parse((CAPTURES / name).read_bytes())


def test_one_call_as_captured() -> None:
    assert _read("01-sync-request.json") == dialog.SyncRequest()
    new = _read("02-update-new-dialog.json")
    assert isinstance(new, dialog.Update)
    assert (new.h_entry, new.h_id, new.state) == (2502, 1058, dialog.DialogState.UNCONFIRMED)
    assert new.vars == (("billing", "acct-42"),)
    assert new.profiles == (
        dialog.Profile("inbound", puid="dlgp-6b0e9724-4493-2"),
        dialog.Profile("caller", value="sipp", puid="dlgp-6b0e9724-4493-1"),
    )
    assert new.timing is None and new.callee is None
    early = _read("03-state-early.json")
    assert isinstance(early, dialog.StateChange)
    assert early.state == 2 and early.timing == dialog.Timing(0, 43200)
    assert early.callee is None
    confirmed = _read("04-state-confirmed.json")
    assert isinstance(confirmed, dialog.StateChange)
    assert confirmed.callee == dialog.Leg(
        "17650SIPpTag011", "0", "", "sip:127.0.0.1:5070;transport=UDP"
    )
    assert _read("06-state-deleted.json") == dialog.StateChange(2502, 1058, 5)
    assert _read("07-rm.json") == dialog.Removal(2502, 1058, 5)


def test_a_sync_update_with_repeated_leg_keys_is_read() -> None:
    synced = _read("05-update-from-sync-confirmed.json")
    assert isinstance(synced, dialog.Update)
    assert synced.state == dialog.DialogState.CONFIRMED
    assert synced.caller.tag == "17651SIPpTag001"
    assert synced.callee is not None and synced.callee.tag == "17650SIPpTag011"
    assert synced.timing == dialog.Timing(1796118308, 43200)


def test_repeated_leg_keys_the_last_wins_as_in_kamailio() -> None:
    raw = (CAPTURES / "05-update-from-sync-confirmed.json").read_bytes().strip()
    # the second "tag1" differs from the first: Kamailio's reader keeps the last.
    first = raw.index(b'"tag1":"17651SIPpTag001"')
    second = raw.index(b'"tag1":"17651SIPpTag001"', first + 1)
    changed = raw[:second] + b'"tag1":"later"' + raw[second + len(b'"tag1":"17651SIPpTag001"') :]
    message = dialog.parse(changed)
    assert isinstance(message, dialog.Update) and message.caller.tag == "later"


UPDATE = (CAPTURES / "02-update-new-dialog.json").read_bytes().strip()
STATE4 = (CAPTURES / "04-state-confirmed.json").read_bytes().strip()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"nope", "not JSON"),
        (b"{}", "missing 'action'"),
        (b'{"action":7}', "unknown action 7"),
        (b'{"action":4,"h_id":1}', "unknown field 'h_id'"),
        (b'{"action":3,"h_entry":1,"h_id":2}', "missing 'state'"),
        (b'{"action":3,"h_entry":1,"h_id":2,"state":6}', "out of range"),
        (b'{"action":3,"h_entry":1,"h_id":2,"state":0}', "out of range"),
        (b'{"action":3,"h_entry":-1,"h_id":2,"state":5}', "out of range"),
        (b'{"action":3,"h_entry":1,"h_id":2,"state":5,"last_modified":1}', "unknown field"),
        (b'{"action":2,"h_entry":1,"h_id":2,"state":2}', "missing 'start_ts'"),
        (b'{"action":2,"h_entry":1,"h_id":2,"state":5,"state":5}', "more than once"),
        (STATE4.replace(b'"cseq2":"0"', b'"cseq2":0'), "'cseq2' must be a string"),
        (STATE4.replace(b'"tag1"', b'"tag1":"x","tag1"'), "more than once"),
        (UPDATE.replace(b'"callid"', b'"iflags":1,"callid"'), "unknown field 'iflags'"),
        (UPDATE.replace(b'"tag1":"17651SIPpTag001",', b""), "missing 'tag1'"),
        (UPDATE.replace(b'"tag1"', b'"tag1":"x","tag1"'), "more than once"),
        (UPDATE.replace(b'{"billing":"acct-42"}', b'{"billing":42}'), "'billing' must be"),
        (UPDATE.replace(b'{"billing":"acct-42"}', b'["x"]'), "'vars' must be a JSON object"),
        (UPDATE.replace(b'"profiles":"{', b'"profiles":"x{'), "must hold a JSON document"),
        (UPDATE.replace(b'\\"name\\":\\"inbound\\"', b'\\"nom\\":\\"inbound\\"'), "'name'"),
        (UPDATE.replace(b'"{\\"profiles\\":[', b'"{\\"profile\\":['), "'profiles'"),
    ],
)
def test_a_body_off_the_5_6_field_sets_is_refused_saying_why(body: bytes, reason: str) -> None:
    with pytest.raises(BodyError, match=reason) as refused:
        dialog.parse(body)
    assert refused.value.kind in KINDS  # the word /metrics counts it under


def test_a_dialog_in_state_1_may_not_repeat_its_leg() -> None:
    body = UPDATE.replace(b'"state":1}', b'"state":1,"tag1":"17651SIPpTag001"}')
    with pytest.raises(BodyError, match="more than once"):
        dialog.parse(body)


# ------------------------------------------------------------------------ properties

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
_u32 = st.integers(0, UINT32_MAX)
legs = st.builds(dialog.Leg, _text, _text, _text, _text)
timings = st.builds(dialog.Timing, _u32, _u32)
profiles = st.builds(
    dialog.Profile,
    _text,
    st.none() | _text,
    st.none() | _text,
    st.none() | st.integers(1, 2**64 - 1),
    st.none() | st.integers(1, UINT32_MAX),
)
states = st.sampled_from(list(dialog.DialogState))


@st.composite
def updates(draw: st.DrawFn) -> dialog.Update:
    state = draw(states)
    timed = state in (dialog.DialogState.EARLY, dialog.DialogState.CONFIRMED)
    names = st.lists(_text, unique=True, max_size=4)
    return dialog.Update(
        draw(_u32),
        draw(_u32),
        draw(_u32),
        draw(_text),
        draw(_text),
        draw(_text),
        draw(_text),
        caller=draw(legs),
        vars=draw(st.none() | names.map(lambda ks: tuple((k, k + "v") for k in ks))),
        profiles=draw(st.none() | st.lists(profiles, max_size=3).map(tuple)),
        state=state,
        timing=draw(timings) if timed else None,
        callee=draw(legs) if state == dialog.DialogState.CONFIRMED else None,
    )


@st.composite
def state_changes(draw: st.DrawFn) -> dialog.StateChange:
    state = draw(states)
    timed = state in (dialog.DialogState.EARLY, dialog.DialogState.CONFIRMED)
    return dialog.StateChange(
        draw(_u32),
        draw(_u32),
        state,
        draw(timings) if timed else None,
        draw(legs) if timed else None,
        draw(legs) if state == dialog.DialogState.CONFIRMED else None,
    )


messages = (
    updates()
    | state_changes()
    | st.builds(dialog.Removal, _u32, _u32, states)
    | st.just(dialog.SyncRequest())
    | st.just(dialog.Nop())
)


@given(messages)
def test_build_then_parse_is_the_identity(message: dialog.DialogMessage) -> None:
    assert dialog.parse(dialog.build(message)) == message


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_are_refused_with_a_reason(body: bytes) -> None:
    try:
        dialog.parse(body)
    except BodyError as exc:
        assert str(exc)
