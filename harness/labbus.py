"""A DMQ bus of real gateways (and Kamailio nodes) on the hosts of a fault lab.

:class:`LabBus` makes a :class:`harness.netns.Lab` with one host per node, starts a
``dmq-gateway serve`` on each gateway host (peer ``htable`` registered through the API,
so kept in its state directory; fast timers:
ping every second, Timer F 2 s) joined through the first one, and a Kamailio node on
each Kamailio host; it stops them all and tears the lab down however the block ends.
The fault tests and ``bench/delivery_loss.py`` use it the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from harness.delivery import htable_body
from harness.gateway import Gateway
from harness.kamailio import KamailioNode
from harness.netns import Lab
from harness.waiting import wait_until

__all__ = ["LAB_TIMERS", "PEER", "LabBus"]

#: Retransmit from 100 ms, at most every 400 ms, give up after 2 s: a few tries per
#: request, so that loss turns into timeouts the gateways must recover from.
LAB_TIMERS = ("--t1", "0.1", "--t2", "0.4", "--timer-f", "2")

PEER = "htable"

#: The SIP port of every node: each host has an address of its own.
SIP_PORT = 5060
#: Messages each gateway's peer keeps: more than any test or benchmark sends.
HISTORY = 10_000
HTTP_PORT = 8000


class LabBus:
    """Gateways ``gateways`` and Kamailio nodes ``kamailios`` (host names) on one bus.

    ``extra`` options go to every gateway (``--history-store``, for one); ``transport``
    is ``udp`` or ``tcp`` for the gateways' SIP addresses.
    """

    def __init__(
        self,
        workdir: Path,
        gateways: Sequence[str],
        kamailios: Sequence[str] = (),
        *,
        transport: str = "udp",
        extra: Sequence[str] = (),
        ping_interval: float = 1.0,
        timers: Sequence[str] = LAB_TIMERS,
    ) -> None:
        self.workdir = workdir
        self.lab = Lab([*gateways, *kamailios])
        self.gateway_names = list(gateways)
        self.kamailio_names = list(kamailios)
        self.transport = transport
        self.extra = tuple(extra)
        self.ping_interval = ping_interval
        #: SIP timer options of the gateways (() for the defaults: T1 0.5 s, Timer F 32 s).
        self.timers = tuple(timers)
        self.gateways: dict[str, Gateway] = {}
        self.kamailios: dict[str, KamailioNode] = {}

    def __enter__(self) -> Self:
        self.lab.start()
        try:
            self._start_nodes()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start_nodes(self) -> None:
        first: Gateway | None = None
        for name in self.gateway_names:
            host = self.lab[name]
            gateway = Gateway(
                name,
                self.workdir,
                notify=[first] if first is not None else [],
                tokens=(self.lab.token,),
                transport=self.transport,
                ping_interval=self.ping_interval,
                timers=self.timers,
                extra=("--trusted", str(self.lab.network), *self.extra),
                host=host.address,
                command_prefix=host.command_prefix,
            )
            # Every host has its own address: the same ports everywhere, never taken.
            gateway.sip_port, gateway.http_port = SIP_PORT, HTTP_PORT
            self.gateways[name] = gateway
            gateway.spawn()
            first = first or gateway
        for gateway in self.gateways.values():
            gateway.wait_ready()
            self.register_peer(gateway)
        for name in self.kamailio_names:
            host = self.lab[name]
            assert first is not None, "a Kamailio node joins the bus through a gateway"
            self.kamailios[name] = KamailioNode(
                self.workdir / name,
                SIP_PORT,
                host=host.address,
                command_prefix=host.command_prefix,
                notification_addresses=[first.uri],
                transport="tcp" if self.transport == "tcp" else "udp",
                ping_interval=5,
                fr_timer_ms=2000,
                children=2,
            )
        self.wait_formed()

    def register_peer(self, gateway: Gateway) -> None:
        """PUT peer ``htable`` (kept in the state dir, so its history is durable, unlike
        a ``--peer`` one), with room for every message a run sends."""
        response = httpx.put(
            f"{gateway.url}/v1/peers/{PEER}",
            json={"reply": "auto", "history": HISTORY},
            headers=gateway.headers,
            timeout=10,
            trust_env=False,
        )
        if response.status_code not in (200, 201):
            raise AssertionError(f"PUT peer {PEER} on {gateway}: {response.status_code}")

    def wait_formed(self, timeout: float = 30.0) -> None:
        """Every gateway sees every other node active."""
        others = len(self.gateways) + len(self.kamailios) - 1

        def formed() -> bool:
            for gateway in self.gateways.values():
                health = gateway.health()
                if health is None or health["active_nodes"] < others:
                    return False
            return True

        wait_until(formed, timeout, f"a bus of {others + 1} nodes in the lab", interval=0.2)

    def close(self) -> None:
        for kamailio in self.kamailios.values():
            with contextlib.suppress(Exception):
                kamailio.stop()
        for gateway in self.gateways.values():
            with contextlib.suppress(Exception):
                gateway.stop(timeout=10)
            gateway.kill()
        self.lab.close()

    def uris(self) -> dict[str, str]:
        return {name: g.uri for name, g in self.gateways.items()}

    def __getitem__(self, name: str) -> Gateway:
        return self.gateways[name]


async def broadcast(
    client: httpx.AsyncClient, gateway: Gateway, n: int, *, wait: bool = False
) -> httpx.Response:
    """POST message ``n`` of ``gateway`` (named after it) to peer ``htable``."""
    return await client.post(
        f"{gateway.url}/v1/peers/{PEER}/broadcast",
        params={"wait": "true" if wait else "false"},
        content=htable_body(gateway.name, n),
        headers={**gateway.headers, "content-type": "application/json"},
    )
