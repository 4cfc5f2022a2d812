"""Dialogs mirrored from a real Kamailio 5.6 call proxy (dialog with ``enable_dmq``).

A sipp call through the Kamailio node (sipp's UAC, Kamailio, sipp's UAS, with
Record-Route) appears in ``GET /v1/dialogs`` while it is up, confirmed, with the
dialog variable and profiles the configuration sets, and goes away after the BYE; the
change stream shows each state in order, then the removal Kamailio sends a few
seconds later.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.ports import free_port
from harness.waiting import wait_until
from tests.interop.conftest import require_kamailio

from .registrar_bus import changes, gateway_on, next_change, registrar

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

SCENARIOS = Path(__file__).parent / "sipp"
#: How long the call stays up between the ACK and the BYE (sipp's pause), in ms.
CALL_MS = 4000


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
            uac = sipp(
                "uac_rr.xml",
                free_port(),
                "-s", "svc", "-d", str(CALL_MS), f"127.0.0.1:{k.port}",
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
