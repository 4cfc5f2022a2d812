"""The dialogs replica on a fake clock: one call's life, relays, the unknowable.

Built from the captured bodies of one call through Kamailio 5.6.3 (INVITE, 180, ACK,
BYE, RM) and variations of them: a sync relay from another node, a late join, an
h_id reused, a dialog whose node never says it ended.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from app.kamailio import dialog
from app.kamailio.dialogs import (
    DELETED_GRACE,
    EARLY_GRACE,
    EARLY_TIMEOUT,
    LIFETIME_GRACE,
    ApplyResult,
    Dialogs,
    DialogsMirror,
)

CAPTURES = Path(__file__).parent / "captures" / "dialog"
A = "sip:127.0.0.1:5090"
B = "sip:127.0.0.1:5091"
NOW = 1796118308.0


def read(name: str) -> dialog.DialogMessage:
    return dialog.parse((CAPTURES / name).read_bytes())


def test_one_call_from_invite_to_rm() -> None:
    replica = Dialogs()
    steps = [
        ("02-update-new-dialog.json", ["created"], "unconfirmed"),
        ("03-state-early.json", ["state"], "early"),
        ("04-state-confirmed.json", ["state"], "confirmed"),
    ]
    for name, expected, state in steps:
        result, events = replica.apply(read(name), A, NOW)
        assert result is ApplyResult.APPLIED
        assert [e.kind.value for e in events] == expected
        assert events[0].dialog.to_json()["state"] == state
    (held,) = replica.dialogs()
    data = held.to_json()
    assert data["id"] == f"2502:1058@{A}"
    assert data["callid"] == "1-17651@127.0.0.1"
    assert data["vars"] == {"billing": "acct-42"}
    assert data["profiles"][1] == {
        "name": "caller",
        "value": "sipp",
        "puid": "dlgp-6b0e9724-4493-1",
    }
    assert data["callee"]["tag"] == "17650SIPpTag011"
    assert replica.counts()["confirmed"] == 1
    _, events = replica.apply(read("06-state-deleted.json"), A, NOW + 5)
    assert [(e.kind.value, e.previous) for e in events] == [("state", "confirmed")]
    assert replica.dialogs() == []  # no longer live
    assert [d.state for d in replica.dialogs(dialog.DialogState.DELETED)] == [5]
    _, events = replica.apply(read("07-rm.json"), A, NOW + 10)
    assert [e.kind.value for e in events] == ["removed"]
    assert len(replica) == 0
    assert replica.counts() == dict.fromkeys(
        ["unconfirmed", "early", "confirmed_na", "confirmed", "deleted"], 0
    )


def test_a_relay_from_a_sync_answer_is_the_same_dialog() -> None:
    replica = Dialogs()
    replica.apply(read("02-update-new-dialog.json"), A, NOW)
    # Node B answers someone's sync with its replica of A's dialog, now confirmed.
    _, events = replica.apply(read("05-update-from-sync-confirmed.json"), B, NOW + 1)
    assert [(e.kind.value, e.previous) for e in events] == [("state", "unconfirmed")]
    (held,) = replica.dialogs()
    assert held.origin == A and held.seen_from == {A, B}
    # A STATE from B (an in-dialog request through B) finds it too.
    result, events = replica.apply(read("06-state-deleted.json"), B, NOW + 2)
    assert result is ApplyResult.APPLIED and events[0].dialog is held


def test_a_state_for_a_dialog_never_seen_is_answered_as_kamailio_does() -> None:
    replica = Dialogs()
    result, events = replica.apply(read("04-state-confirmed.json"), A, NOW)
    assert (result, events, replica.unknown) == (ApplyResult.UNKNOWN_DIALOG, [], 1)
    result, _ = replica.apply(read("07-rm.json"), A, NOW)
    assert result is ApplyResult.UNKNOWN_DIALOG and replica.unknown == 2


def test_backwards_and_repeated_states_change_nothing() -> None:
    replica = Dialogs()
    replica.apply(read("02-update-new-dialog.json"), A, NOW)
    replica.apply(read("04-state-confirmed.json"), A, NOW)
    assert replica.apply(read("03-state-early.json"), A, NOW)[1] == []
    assert replica.apply(read("04-state-confirmed.json"), A, NOW)[1] == []
    assert replica.dialogs()[0].state == dialog.DialogState.CONFIRMED


def test_two_nodes_reusing_one_h_id_make_two_dialogs() -> None:
    replica = Dialogs()
    new = read("02-update-new-dialog.json")
    assert isinstance(new, dialog.Update)
    replica.apply(new, A, NOW)
    replica.apply(dataclasses.replace(new, callid="other-call"), B, NOW)
    assert sorted(d.origin for d in replica.dialogs()) == [A, B]
    # A STATE from A goes to A's; a STATE from a third node is ambiguous: unknown.
    replica.apply(read("03-state-early.json"), A, NOW)
    states = {d.origin: d.state for d in replica.dialogs()}
    assert states == {A: 2, B: 1}
    assert replica.apply(read("03-state-early.json"), "sip:127.0.0.1:5099", NOW)[0] is (
        ApplyResult.UNKNOWN_DIALOG
    )


def test_a_node_reusing_its_own_h_id_ends_the_old_dialog() -> None:
    replica = Dialogs()
    new = read("02-update-new-dialog.json")
    assert isinstance(new, dialog.Update)
    replica.apply(new, A, NOW)
    _, events = replica.apply(dataclasses.replace(new, callid="next-call"), A, NOW + 1)
    assert [e.kind.value for e in events] == ["removed", "created"]
    assert [d.callid for d in replica.dialogs()] == ["next-call"]


def test_deleted_dialogs_without_rm_and_confirmed_dialogs_past_their_lifetime_go() -> None:
    replica = Dialogs()
    replica.apply(read("02-update-new-dialog.json"), A, NOW)
    replica.apply(read("04-state-confirmed.json"), A, NOW)  # start_ts NOW, lifetime 43200
    deadline = NOW + 43200 + LIFETIME_GRACE
    assert replica.next_deadline() == deadline
    assert replica.expire(deadline - 1) == []
    events = replica.expire(deadline)
    assert [e.kind.value for e in events] == ["expired"] and len(replica) == 0

    replica.apply(read("02-update-new-dialog.json"), A, NOW)
    replica.apply(read("06-state-deleted.json"), A, NOW + 1)
    assert replica.next_deadline() == NOW + 1 + DELETED_GRACE
    events = replica.expire(NOW + 1 + DELETED_GRACE)
    assert [e.kind.value for e in events] == ["removed"] and len(replica) == 0
    assert replica.next_deadline() is None


def test_a_call_whose_node_vanished_before_the_answer_expires_after_early_timeout() -> None:
    """An INVITE answered 180 and then nothing (its node died): Kamailio would have
    destroyed it after early_timeout without a word on the bus, so the replica drops it
    that long after the last update it got, and says so in the stream."""
    clock = [NOW]
    mirror = DialogsMirror(clock=lambda: clock[0])
    replica = mirror.replica
    replica.apply(read("02-update-new-dialog.json"), A, NOW)
    replica.apply(read("03-state-early.json"), A, NOW + 2)  # the 180: the bound restarts
    deadline = NOW + 2 + EARLY_TIMEOUT + EARLY_GRACE
    assert replica.next_deadline() == deadline
    subscription = mirror.stream.subscribe(None, None)
    clock[0] = deadline - 1
    mirror.expire_due()
    assert [d.to_json()["state"] for d in replica.dialogs()] == ["early"]
    clock[0] = deadline
    mirror.expire_due()
    assert len(replica) == 0
    ((_, frame),) = subscription.subscriber.frames
    change = json.loads(frame)
    assert (change["event"], change["key"], change["from"]) == ("expired", f"2502:1058@{A}", None)
    assert change["data"]["state"] == "early" and change["at"] == deadline
    assert replica.next_deadline() is None


def test_an_unconfirmed_dialog_updated_again_is_kept_longer() -> None:
    replica = Dialogs()
    new = read("02-update-new-dialog.json")
    replica.apply(new, A, NOW)
    assert replica.next_deadline() == NOW + EARLY_TIMEOUT + EARLY_GRACE
    _, events = replica.apply(new, B, NOW + 100)  # the same dialog relayed in a sync
    assert events == []
    assert replica.expire(NOW + EARLY_TIMEOUT + EARLY_GRACE) == []
    assert replica.next_deadline() == NOW + 100 + EARLY_TIMEOUT + EARLY_GRACE
    assert len(replica) == 1


def test_updates_that_move_no_deadline_leave_no_timer_entry_behind() -> None:
    """A confirmed dialog re-sent many times (a profile change, relays of a sync) keeps
    its one deadline: the timer heap does not grow with the messages."""
    replica = Dialogs()
    replica.apply(read("02-update-new-dialog.json"), A, NOW)
    replica.apply(read("04-state-confirmed.json"), A, NOW)
    relayed = read("05-update-from-sync-confirmed.json")
    for second in range(100):
        replica.apply(relayed, A, NOW + second)
    assert len(replica) == 1
    assert len(replica._deadlines) <= 2  # the unconfirmed one (stale) and the confirmed


def test_a_sync_request_changes_nothing() -> None:
    replica = Dialogs()
    assert replica.apply(dialog.SyncRequest(), A, NOW) == (ApplyResult.APPLIED, [])
