"""What the usrloc and dialog interop tests share: a Kamailio 5.6 registrar on a bus
with a gateway process, a REGISTER client over raw UDP, and ``kamcmd ul.dump`` read.

The Kamailio node runs ``examples/kamailio/registrar.cfg`` (dmq_usrloc, dialog with
``enable_dmq``), relaying INVITEs to ``call_target``; the gateway (``dmq-gateway
serve``, every mirror on by default) joins the bus through it.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from harness.gateway import Gateway
from harness.kamailio import REGISTRAR_CONFIG, KamailioNode
from harness.ports import free_port
from harness.waiting import wait_until

LOOPBACK = "127.0.0.1"
JOIN_TIMEOUT = 15.0


def registrar(
    workdir: Path,
    *,
    call_target: int | None = None,
    batch: int = 1,
    notify: Sequence[str] = (),
) -> KamailioNode:
    """A started Kamailio registrar node (the caller stops it)."""
    defines = [
        f'CALL_TARGET="sip:{LOOPBACK}:{call_target or free_port()}"',
        "MIN_EXPIRES=1",
        f"BATCH={batch}",
    ]
    return KamailioNode(
        workdir,
        free_port(),
        notification_addresses=notify,
        ping_interval=5,
        fr_timer_ms=2000,
        config=REGISTRAR_CONFIG,
        extra_defines=defines,
    )


def joined(k: KamailioNode, gateway: Gateway, http: httpx.Client) -> bool:
    """Kamailio lists the gateway active, and the gateway lists Kamailio active."""
    seen = any(
        n["port"] == gateway.sip_port and n["status"] == "active" and not n["local"]
        for n in k.list_nodes()
    )
    nodes = http.get("/v1/nodes").json()
    return seen and any(n["port"] == k.port and n["status"] == "active" for n in nodes)


@contextlib.contextmanager
def gateway_on(k: KamailioNode, workdir: Path) -> Iterator[tuple[Gateway, httpx.Client]]:
    """A gateway process joined to ``k``'s bus, stopped on the way out."""
    gateway = Gateway("gateway", workdir, notify=[k.server_address], ping_interval=1.0)
    http = httpx.Client(base_url=gateway.url, timeout=10, trust_env=False)
    try:
        gateway.start()
        wait_until(lambda: joined(k, gateway, http), JOIN_TIMEOUT, "the gateway to join")
        yield gateway, http
    finally:
        http.close()
        with contextlib.suppress(Exception):
            gateway.stop(timeout=10)
        gateway.kill()


def changes(gateway: Gateway, path: str, since: int = 0) -> ClientConnection:
    """A change stream's WebSocket, from ``since`` (0: every change held)."""
    return connect(f"{gateway.ws_url}{path}?since={since}", open_timeout=5, proxy=None)


def next_change(ws: ClientConnection, timeout: float) -> dict[str, Any]:
    """The next ``change`` frame (the ``subscribed`` frame is skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no change frame within {timeout} s")
        try:
            frame: dict[str, Any] = json.loads(ws.recv(timeout=remaining))
        except TimeoutError:
            continue
        if frame.get("type") == "change":
            return frame


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


def replica_contacts(http: httpx.Client) -> dict[str, str]:
    """ruid -> AOR of every contact in the gateway's replica, page by page."""
    held: dict[str, str] = {}
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if after is not None:
            params["after"] = after
        page = http.get("/v1/registrations", params=params).json()
        for item in page["items"]:
            for contact in item["contacts"]:
                held[contact["ruid"]] = item["aor"]
        after = page["next"]
        if after is None:
            return held
