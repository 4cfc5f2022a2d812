"""A SIP phone over raw UDP that REGISTERs with a Kamailio node, and what the node holds.

:class:`SipPhone` sends REGISTERs (one AOR or hundreds, retransmitted until each is
answered 200) from one socket on 127.0.0.1; :func:`ul_dump` reads back every contact the
node holds (ruid -> AOR) with kamcmd. The usrloc interop tests and the join benchmark
share them.
"""

from __future__ import annotations

import re
import secrets
import socket
import time
from collections.abc import Sequence

from harness.kamailio import KamailioNode

LOOPBACK = "127.0.0.1"


class SipPhone:
    """REGISTERs over one UDP socket on 127.0.0.1: one phone, as many AORs as wanted."""

    def __init__(self, registrar: KamailioNode) -> None:
        self.target = (LOOPBACK, registrar.port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.cseq: dict[str, int] = {}

    def close(self) -> None:
        self.sock.close()

    def contact(self, aor: str) -> str:
        return f"sip:{aor}@{LOOPBACK}:{self.port}"

    def request(self, aor: str, expires: int) -> tuple[str, bytes]:
        """A REGISTER of ``aor`` (the Call-ID stays, the CSeq goes up); its branch."""
        cseq = self.cseq[aor] = self.cseq.get(aor, 0) + 1
        branch = f"z9hG4bK-{secrets.token_hex(6)}"
        text = (
            f"REGISTER sip:{LOOPBACK}:{self.target[1]} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {LOOPBACK}:{self.port};branch={branch}\r\n"
            f"From: <sip:{aor}@{LOOPBACK}>;tag={aor}-tag\r\n"
            f"To: <sip:{aor}@{LOOPBACK}>\r\n"
            f"Call-ID: reg-{aor}@{LOOPBACK}\r\n"
            f"CSeq: {cseq} REGISTER\r\n"
            f"Contact: <{self.contact(aor)}>\r\n"
            f"Expires: {expires}\r\n"
            "User-Agent: test-phone/1.0\r\n"
            "Max-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        return branch, text.encode()

    def register(self, aors: Sequence[str] | str, expires: int, timeout: float = 10.0) -> None:
        """REGISTER each AOR; resend those not answered 200 yet every 0.5 s."""
        pending = {}
        for aor in [aors] if isinstance(aors, str) else aors:
            branch, data = self.request(aor, expires)
            pending[branch] = data
        deadline = time.monotonic() + timeout
        resend_at = 0.0
        while pending:
            now = time.monotonic()
            if now >= deadline:
                raise AssertionError(f"{len(pending)} REGISTERs not answered 200 in {timeout} s")
            if now >= resend_at:
                for data in list(pending.values())[:100]:
                    self.sock.sendto(data, self.target)
                resend_at = now + 0.5
            self.sock.settimeout(0.1)
            try:
                reply = self.sock.recv(65535).decode(errors="replace")
            except TimeoutError:
                continue
            status = reply.split("\r\n", 1)[0]
            match = re.search(r"branch=([^;\r\n]+)", reply)
            if match is None or match.group(1) not in pending:
                continue
            if status.startswith("SIP/2.0 1"):
                continue
            assert status.startswith("SIP/2.0 200"), f"REGISTER answered {status!r}"
            del pending[match.group(1)]


def ul_dump(k: KamailioNode) -> dict[str, str]:
    """ruid -> AOR of every contact the node holds: the AORs of ``kamcmd ul.dump
    brief``, then ``ul.lookup location AOR`` for each (the full ``ul.dump`` of a few
    hundred contacts is more than kamcmd's 128 KB reply buffer)."""
    aors = [
        line.strip().removeprefix("AoR:").strip()
        for line in k.kamcmd("ul.dump", "brief", timeout=30).splitlines()
        if line.strip().startswith("AoR:")
    ]
    held: dict[str, str] = {}
    for aor in aors:
        for line in k.kamcmd("ul.lookup", "location", f"s:{aor}").splitlines():
            if line.strip().startswith("Ruid:"):
                held[line.strip().removeprefix("Ruid:").strip()] = aor
    return held
