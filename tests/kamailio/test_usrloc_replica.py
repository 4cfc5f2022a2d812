"""The registrations replica on a fake clock: events, expiry, repeats, pages.

Sans-IO: messages are the codec's, time is a number, so every case is exact.
"""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from app.kamailio import usrloc
from app.kamailio.registrations import RegistrationEventKind as Kind
from app.kamailio.registrations import Registrations

A = "sip:127.0.0.1:5060"
B = "sip:127.0.0.1:5062"
NOW = 1_800_000_000


def contact(
    aor: str = "alice", ruid: str = "r1", expires: int = NOW + 60, **kw: object
) -> usrloc.Contact:
    fields = dict(
        aor=aor,
        ruid=ruid,
        c=f"sip:{aor}@10.0.0.1:5060",
        received="",
        path="",
        callid=f"cid-{ruid}",
        user_agent="phone",
        instance="",
        expires=expires,
        cseq=1,
        flags=0,
        cflags=0,
        q=-1,
        last_modified=NOW,
        methods=usrloc.ALL_METHODS,
        reg_id=0,
        server_id=0,
    )
    fields.update(kw)
    return usrloc.Contact(**fields)  # type: ignore[arg-type]


def update(c: usrloc.Contact) -> usrloc.ContactMessage:
    return usrloc.ContactMessage(usrloc.Action.UPDATE, c)


def rm(c: usrloc.Contact) -> usrloc.ContactMessage:
    return usrloc.ContactMessage(usrloc.Action.RM, c)


def kinds(events: list) -> list[str]:  # type: ignore[type-arg]
    return [e.kind.value for e in events]


def test_register_refresh_unregister() -> None:
    replica = Registrations()
    first = contact()
    assert kinds(replica.apply(update(first), A, NOW)) == ["register"]
    assert kinds(replica.apply(update(first), B, NOW + 1)) == []  # a repeat says nothing
    again = dataclasses.replace(first, cseq=2, expires=NOW + 120)
    events = replica.apply(update(again), A, NOW + 2)
    assert kinds(events) == ["refresh"]
    assert events[0].to_json()["cseq"] == 2
    assert [r.contact for r in replica.contacts_of("alice")] == [again]
    assert kinds(replica.apply(rm(again), A, NOW + 3)) == ["unregister"]
    assert replica.contacts_of("alice") == [] and len(replica) == 0
    assert kinds(replica.apply(rm(again), A, NOW + 3)) == []  # unknown ruid: nothing


def test_contacts_expire_at_their_expires_unless_refreshed() -> None:
    replica = Registrations()
    replica.apply(update(contact(ruid="r1", expires=NOW + 10)), A, NOW)
    replica.apply(update(contact(ruid="r2", expires=NOW + 20)), A, NOW)
    replica.apply(update(contact(aor="perm", ruid="p", expires=0)), A, NOW)
    assert replica.next_expiry() == NOW + 10
    # r1 is refreshed before it expires: its old deadline is stale.
    replica.apply(update(contact(ruid="r1", expires=NOW + 30, cseq=2)), A, NOW + 5)
    assert replica.next_expiry() == NOW + 20
    assert replica.expire(NOW + 19) == []
    events = replica.expire(NOW + 20)
    assert [(e.kind, e.registration.contact.ruid) for e in events] == [(Kind.EXPIRE, "r2")]
    assert kinds(replica.expire(NOW + 30)) == ["expire"]
    assert replica.next_expiry() is None
    assert [r.contact.ruid for r in replica.contacts_of("perm")] == ["p"]  # 0: permanent


def test_an_update_already_expired_is_not_kept() -> None:
    replica = Registrations()
    assert replica.apply(update(contact(expires=NOW - 1)), A, NOW) == []
    replica.apply(update(contact(expires=NOW + 5)), A, NOW)
    assert kinds(replica.apply(update(contact(expires=NOW, cseq=3)), A, NOW)) == ["expire"]
    assert len(replica) == 0


def test_a_batched_sync_answer_and_sync_requests() -> None:
    replica = Registrations()
    batch = usrloc.Multi(tuple(update(contact(aor=f"u{i}", ruid=f"r{i}")) for i in range(5)))
    assert kinds(replica.apply(batch, A, NOW)) == ["register"] * 5
    assert replica.apply(batch, B, NOW) == []
    assert replica.apply(usrloc.SyncRequest(), A, NOW) == []
    assert len(replica) == 5 and replica.aor_count == 5


def test_the_node_kept_is_the_one_that_told_us_last() -> None:
    replica = Registrations()
    replica.apply(update(contact()), A, NOW)
    replica.apply(update(contact(cseq=5)), B, NOW + 1)
    (held,) = replica.contacts_of("alice")
    assert held.node == B and held.updated_at == NOW + 1


def test_pages_by_aor_with_a_prefix() -> None:
    replica = Registrations()
    for name in ["bob", "alice", "al", "alan", "carol", "albert"]:
        replica.apply(update(contact(aor=name, ruid=name)), A, NOW)
    replica.apply(update(contact(aor="alice", ruid="alice-2")), A, NOW)
    page, cursor, total = replica.page("al", limit=2)
    assert [aor for aor, _ in page] == ["al", "alan"] and cursor == "alan" and total == 4
    page, cursor, total = replica.page("al", after=cursor, limit=2)
    assert [aor for aor, _ in page] == ["albert", "alice"] and cursor is None
    assert [len(contacts) for _, contacts in page] == [1, 2]
    page, cursor, total = replica.page("", limit=100)
    assert [aor for aor, _ in page] == ["al", "alan", "albert", "alice", "bob", "carol"]
    assert cursor is None and total == 6
    assert replica.page("zz") == ([], None, 0)


_ops = st.lists(
    st.tuples(
        st.sampled_from(["update", "rm", "tick"]),
        st.sampled_from(["r1", "r2", "r3"]),
        st.sampled_from(["a", "b"]),
        st.integers(0, 30),
    ),
    max_size=40,
)


@settings(max_examples=200)
@given(_ops)
def test_the_replica_matches_a_plain_model(ops: list[tuple[str, str, str, int]]) -> None:
    """Whatever the order of updates, removals and ticks, the replica holds what a
    dictionary of unexpired contacts holds, and its AOR index agrees with it."""
    replica = Registrations()
    model: dict[str, usrloc.Contact] = {}
    now = NOW
    for op, ruid, aor, n in ops:
        if op == "tick":
            now += n
            replica.expire(now)
            model = {k: c for k, c in model.items() if c.expires > now}
            continue
        c = contact(aor=aor, ruid=ruid, expires=now + n, cseq=n)
        if op == "update":
            replica.apply(update(c), A, now)
            if c.expires > now:
                model[ruid] = c
            else:
                model.pop(ruid, None)
        else:
            replica.apply(rm(c), A, now)
            model.pop(ruid, None)
    held = {r.contact.ruid: r.contact for aor in ("a", "b") for r in replica.contacts_of(aor)}
    assert held == model
    assert replica.aor_count == len({c.aor for c in model.values()})


def test_the_mirror_answers_500_to_a_message_it_fails_to_apply_and_keeps_serving() -> None:
    """A bug while applying one message is the gateway's, not the sender's: that message
    is answered 500 and logged, and the next one is applied as usual."""
    from app.dmq.peers import PeerMessage
    from app.dmq.sip import SipUri
    from app.kamailio.registrations import RegistrationsMirror

    mirror = RegistrationsMirror(None, clock=lambda: NOW)  # type: ignore[arg-type]
    body = usrloc.build(update(contact()))

    def message(n: int) -> PeerMessage:
        return PeerMessage(n, "usrloc", body, "application/json", SipUri.parse(A), f"c{n}", 0, 1)

    apply = mirror.replica.apply
    mirror.replica.apply = lambda *args: 1 / 0  # type: ignore[assignment,method-assign,misc]
    assert mirror.handle(message(1)).code == 500
    mirror.replica.apply = apply  # type: ignore[method-assign]
    assert mirror.handle(message(2)).code == 200
    assert [r.contact.ruid for r in mirror.replica.contacts_of("alice")] == ["r1"]
