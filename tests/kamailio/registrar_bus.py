"""What the usrloc and dialog interop tests share: a Kamailio 5.6 registrar on a bus
with a gateway process, and the replica read page by page (the REGISTER client and
``kamcmd ul.dump`` are in harness/sip_phone.py).

The Kamailio node runs ``examples/kamailio/registrar.cfg`` (dmq_usrloc, dialog with
``enable_dmq``), relaying INVITEs to ``call_target``; the gateway (``dmq-gateway
serve``, every mirror on by default) joins the bus through it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from harness.gateway import Gateway, clean_env, gateway_command
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
def gateway_on(
    k: KamailioNode, workdir: Path, *extra: str
) -> Iterator[tuple[Gateway, httpx.Client]]:
    """A gateway process (``extra``: more options) joined to ``k``'s bus, stopped on the
    way out."""
    gateway = Gateway("gateway", workdir, notify=[k.server_address], ping_interval=1.0, extra=extra)
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


def cli(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``dmq-gateway ARGS --url URL`` as a user would; its exit code and output."""
    return subprocess.run(
        [*gateway_command(), *args, "--url", gateway.url],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
        check=False,
    )
