"""Registrations mirrored from a real Kamailio 5.6 registrar (dmq_usrloc).

A REGISTER sent to Kamailio as a raw UDP datagram shows in
``GET /v1/registrations/{aor}``, is refreshed, and goes on un-REGISTER and on expiry,
with the matching events on ``/v1/registrations/changes``. A gateway started after the
registrar already holds 300 registrations holds the same ones as ``kamcmd ul.dump``
after one sync request, whether Kamailio answers one message per contact or in
``multi`` batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.sip_phone import SipPhone, ul_dump
from harness.waiting import wait_until
from tests.interop.conftest import require_kamailio

from .registrar_bus import (
    changes,
    cli,
    gateway_on,
    next_change,
    registrar,
    replica_contacts,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


@pytest.fixture(autouse=True)
def _kamailio() -> None:
    require_kamailio()


def test_a_register_shows_is_refreshed_and_goes_on_unregister_and_on_expiry(
    tmp_path: Path,
) -> None:
    k = registrar(tmp_path / "k")
    phone = SipPhone(k)
    try:
        with (
            gateway_on(k, tmp_path) as (gateway, http),
            changes(gateway, "/v1/registrations/changes") as ws,
        ):
            phone.register("alice", 300)
            found = wait_until(
                lambda: http.get("/v1/registrations/alice").status_code == 200,
                10,
                "alice in the replica",
            )
            assert found
            (contact,) = http.get("/v1/registrations/alice").json()["contacts"]
            assert contact["contact"] == phone.contact("alice")
            assert contact["callid"] == "reg-alice@127.0.0.1"
            assert contact["user_agent"] == "test-phone/1.0"
            assert contact["node"] == k.server_address
            assert set(ul_dump(k)) == {contact["ruid"]}
            event = next_change(ws, 10)
            assert (event["event"], event["key"]) == ("register", contact["ruid"])
            assert event["data"]["aor"] == "alice"
            shown = cli(gateway, "registrations", "alice")
            assert shown.returncode == 0, shown.stderr
            header, row = shown.stdout.splitlines()
            assert header.split()[:3] == ["AOR", "CONTACT", "EXPIRES"]
            assert row.split()[:2] == ["alice", phone.contact("alice")]
            assert "test-phone/1.0" in row and contact["ruid"] in row
            as_json = json.loads(cli(gateway, "registrations", "--json").stdout)
            assert [item["aor"] for item in as_json["items"]] == ["alice"]
            one = json.loads(cli(gateway, "registrations", "alice", "--json").stdout)
            assert (one["aor"], [c["ruid"] for c in one["contacts"]]) == (
                "alice",
                [contact["ruid"]],
            )
            listed = cli(gateway, "registrations").stdout.splitlines()
            assert listed[0].split()[:3] == ["AOR", "CONTACT", "EXPIRES"]
            assert listed[1].split()[:2] == ["alice", phone.contact("alice")]
            assert listed[2].startswith("1 AORs shown of 1, 1 contacts in all (sync: synced")

            phone.register("alice", 300)  # a refresh: CSeq 2
            event = next_change(ws, 10)
            assert (event["event"], event["data"]["cseq"]) == ("refresh", 2)

            phone.register("alice", 0)  # un-REGISTER
            event = next_change(ws, 10)
            assert (event["event"], event["key"]) == ("unregister", contact["ruid"])
            assert http.get("/v1/registrations/alice").status_code == 404
            gone = cli(gateway, "registrations", "alice")
            assert gone.returncode == 1
            assert "no contact of AOR 'alice'" in gone.stderr

            phone.register("bob", 2)  # Kamailio replicates no expiry: the replica's own
            event = next_change(ws, 10)
            assert (event["event"], event["data"]["aor"]) == ("register", "bob")
            assert http.get("/v1/registrations/bob").status_code == 200
            event = next_change(ws, 10)
            assert (event["event"], event["data"]["aor"]) == ("expire", "bob")
            assert event["from"] is None  # the gateway's own timer, not a node
            assert http.get("/v1/registrations/bob").status_code == 404
            listing = http.get("/v1/registrations").json()
            assert (listing["aors"], listing["contacts"], listing["items"]) == (0, 0, [])
            summary = cli(gateway, "registrations").stdout
            assert summary.startswith("0 AORs shown of 0, 0 contacts in all (sync: synced")
    finally:
        phone.close()
        k.stop()


@pytest.mark.parametrize("batch", [1, 50], ids=["one-per-contact", "multi-50"])
def test_a_late_gateway_converges_to_ul_dump_after_one_sync_request(
    tmp_path: Path, batch: int
) -> None:
    k = registrar(tmp_path / "k", batch=batch)
    phone = SipPhone(k)
    try:
        aors = [f"user{i:03d}" for i in range(300)]
        phone.register(aors, 600)
        expected = ul_dump(k)
        assert len(expected) == 300 and set(expected.values()) == set(aors)
        with gateway_on(k, tmp_path) as (_, http):
            wait_until(
                lambda: http.get("/v1/registrations").json()["contacts"] == 300,
                30,
                "300 contacts in the replica",
            )
            assert replica_contacts(http) == expected
            listing = http.get("/v1/registrations", params={"prefix": "user1"}).json()
            assert (listing["aors"], listing["matched"]) == (300, 100)
            sync = listing["sync"]
            assert (sync["state"], sync["requests_sent"]) == ("synced", 1)
            assert sync["donor"] == k.server_address
    finally:
        phone.close()
        k.stop()
