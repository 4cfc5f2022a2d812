"""Dialogs mirrored from a real Kamailio 5.6 call proxy (dialog with ``enable_dmq``).

A sipp call through the Kamailio node (sipp's UAC, Kamailio, sipp's UAS, with
Record-Route) appears in ``GET /v1/dialogs`` while it is up, confirmed, with the
dialog variable and profiles the configuration sets, and goes away after the BYE (the
UAC holds the call until the test sends it an INFO, so that no check races the BYE); the
change stream shows each state in order, then the removal Kamailio sends a few
seconds later.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.ports import free_port
from harness.waiting import wait_until
from tests.interop.conftest import require_kamailio

from .registrar_bus import changes, cli, gateway_on, next_change, registrar

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

SCENARIOS = Path(__file__).parent / "sipp"


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_kamailio()
    if shutil.which("sipp") is None:
        pytest.skip("sipp is not installed (apt-get install sip-tester)")


def sipp(scenario: str, port: int, *extra: str, log: Path) -> subprocess.Popen[bytes]:
    command = [
        "sipp", "-sf", str(SCENARIOS / scenario), "-i", "127.0.0.1", "-p", str(port),
        "-m", "1", "-nostdin", "-timeout", "60", *extra,
    ]  # fmt: skip
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)


def hang_up(uac_port: int, callid: str) -> None:
    """Tell the UAC to send its BYE: an INFO of its call, straight to it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        info = (
            f"INFO sip:sipp@127.0.0.1:{uac_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-hangup\r\n"
            "From: <sip:test@127.0.0.1>;tag=hangup\r\n"
            "To: <sip:sipp@127.0.0.1>\r\n"
            f"Call-ID: {callid}\r\n"
            "CSeq: 1 INFO\r\n"
            "Max-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        sock.sendto(info.encode(), ("127.0.0.1", uac_port))


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def test_a_sipp_call_shows_while_up_and_goes_after_the_bye(tmp_path: Path) -> None:
    uas_port = free_port()
    k = registrar(tmp_path / "k", call_target=uas_port)
    uas = uac = None
    try:
        with (
            gateway_on(k, tmp_path) as (gateway, http),
            changes(gateway, "/v1/dialogs/changes") as ws,
        ):
            uas = sipp("uas_rr.xml", uas_port, log=tmp_path / "uas.log")
            uac_port = free_port()
            uac = sipp(
                "uac_rr.xml",
                uac_port,
                "-s", "svc", f"127.0.0.1:{k.port}",
                log=tmp_path / "uac.log",
            )  # fmt: skip

            def confirmed() -> list[dict[str, Any]]:
                listing = http.get("/v1/dialogs").json()
                return [d for d in listing["items"] if d["state"] == "confirmed"]

            (dialog,) = wait_until(confirmed, 10, "the call confirmed in the replica")
            assert dialog["from_uri"].startswith("sip:sipp@127.0.0.1")
            assert dialog["vars"] == {"billing": "acct-42"}
            assert sorted(p["name"] for p in dialog["profiles"]) == ["caller", "inbound"]
            assert dialog["origin"] == k.server_address
            assert dialog["callee"]["contact"].startswith(f"sip:127.0.0.1:{uas_port}")
            listing = http.get("/v1/dialogs").json()
            assert listing["total"] == 1 and listing["counts"]["confirmed"] == 1
            one = http.get(f"/v1/dialogs/{dialog['id']}")
            assert one.status_code == 200 and one.json()["callid"] == dialog["callid"]
            shown = cli(gateway, "dialogs")
            assert shown.returncode == 0, shown.stderr
            header, row, summary = shown.stdout.splitlines()
            assert header.split()[:3] == ["ID", "STATE", "CALL-ID"]
            assert row.split()[:3] == [dialog["id"], "confirmed", dialog["callid"]]
            assert summary.startswith("1 dialogs (unconfirmed 0, early 0, confirmed_na 0, ")
            as_json = json.loads(cli(gateway, "dialogs", "--json", "--state", "early").stdout)
            assert (as_json["total"], as_json["items"]) == (0, [])

            hang_up(uac_port, dialog["callid"])  # the UAC sends its BYE now
            assert uac.wait(60) == 0, (tmp_path / "uac.log").read_text(errors="replace")
            wait_until(lambda: http.get("/v1/dialogs").json()["total"] == 0, 10, "the call gone")
            seen = []
            while not seen or seen[-1][0] != "removed":
                frame = next_change(ws, 20)  # Kamailio sends the RM ~5 s after the BYE
                assert frame["key"] == dialog["id"]
                seen.append((frame["event"], frame["data"]["state"]))
            assert seen == [
                ("created", "unconfirmed"),
                ("state", "early"),
                ("state", "confirmed"),
                ("state", "deleted"),
                ("removed", "deleted"),
            ]
            counts = http.get("/v1/dialogs").json()["counts"]
            assert sum(counts.values()) == 0
    finally:
        for process in (uac, uas):
            if process is not None:
                stop(process)
        k.stop()


def dialog_metric(http: httpx.Client, what: str) -> float:
    """One number of the dialog mirror in /metrics."""
    line = f'dmq_kamailio_mirror{{mirror="dialog",what="{what}"}} '
    (sample,) = [x for x in http.get("/metrics").text.splitlines() if x.startswith(line)]
    return float(sample.rsplit(" ", 1)[1])


def test_with_dialog_sync_a_gateway_started_after_the_call_learns_it(tmp_path: Path) -> None:
    """A call is up on the Kamailio node before any gateway joins. A gateway with the
    default settings never learns it (no dialog sync is asked for); one started with
    ``--dialog-sync`` asks that node, once, and holds the call as Kamailio does, then
    follows it to its end."""
    uas_port = free_port()
    k = registrar(tmp_path / "k", call_target=uas_port)
    uas = uac = None
    try:
        uas = sipp("uas_rr.xml", uas_port, log=tmp_path / "uas.log")
        uac_port = free_port()
        uac = sipp(
            "uac_rr.xml", uac_port, "-s", "svc", f"127.0.0.1:{k.port}", log=tmp_path / "uac.log"
        )
        wait_until(lambda: "state: 4" in k.kamcmd("dlg.list"), 10, "the call confirmed")
        listed = k.kamcmd("dlg.list")

        with gateway_on(k, tmp_path / "plain") as (_, http):
            # The usrloc bootstrap done: the init hooks have run, a dialog sync would
            # have been asked for by now.
            wait_until(
                lambda: http.get("/v1/registrations").json()["sync"]["state"] == "synced",
                10,
                "the usrloc bootstrap",
            )
            assert dialog_metric(http, "sync_requests_sent") == 0
            listing = http.get("/v1/dialogs").json()
            assert (listing["total"], listing["sync"]["state"]) == (0, "off")

        with (
            gateway_on(k, tmp_path / "synced", "--dialog-sync") as (gateway, http),
            changes(gateway, "/v1/dialogs/changes") as ws,
        ):

            def confirmed() -> list[dict[str, Any]]:
                listing = http.get("/v1/dialogs").json()
                return [d for d in listing["items"] if d["state"] == "confirmed"]

            (dialog,) = wait_until(confirmed, 10, "the call learnt from the sync")
            assert dialog_metric(http, "sync_requests_sent") == 1
            sync = http.get("/v1/dialogs").json()["sync"]
            assert (sync["state"], sync["requests_sent"]) == ("synced", 1)
            assert dialog["callid"] in listed
            assert dialog["origin"] == k.server_address
            assert dialog["vars"] == {"billing": "acct-42"}
            assert sorted(p["name"] for p in dialog["profiles"]) == ["caller", "inbound"]
            assert dialog["callee"]["contact"].startswith(f"sip:127.0.0.1:{uas_port}")
            assert dialog["start_ts"] > 0 and dialog["lifetime"] > 0

            hang_up(uac_port, dialog["callid"])
            assert uac.wait(60) == 0, (tmp_path / "uac.log").read_text(errors="replace")
            wait_until(lambda: http.get("/v1/dialogs").json()["total"] == 0, 10, "the call gone")
            seen = []
            while not seen or seen[-1] != "removed":
                frame = next_change(ws, 20)
                assert frame["key"] == dialog["id"]
                seen.append(frame["event"])
            assert seen == ["created", "state", "removed"]
    finally:
        for process in (uac, uas):
            if process is not None:
                stop(process)
        k.stop()
