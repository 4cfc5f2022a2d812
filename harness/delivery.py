"""What reached each subscriber, and how: counted the same way by the fault tests and
the delivery benchmark.

Every message a test or benchmark broadcasts says who sent it and its number in the
body, in the shape Kamailio's htable replicates (so a Kamailio node on the bus stores
it too): ``{"action": 2, "htname": "ht", "cname": "a-17", "type": 2, "strval": "17",
"mode": 1}`` is message 17 of origin ``a``. A :class:`Subscriber` keeps one WebSocket
subscription to a gateway's peer open (resuming after the gateway restarts), and
:func:`account` turns the frames it received into a :class:`Delivery` per origin:
what arrived, twice, out of order, was missed, or was declared lost by a ``gap`` frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

__all__ = ["Delivery", "Subscriber", "account", "htable_body", "parse_body"]

TABLE = "ht"


def htable_body(origin: str, n: int) -> bytes:
    """Message ``n`` of ``origin``, as a Kamailio htable set (action 2, string value)."""
    return json.dumps(
        {
            "action": 2,
            "htname": TABLE,
            "cname": f"{origin}-{n}",
            "type": 2,
            "strval": str(n),
            "mode": 1,
        },
        separators=(",", ":"),
    ).encode()


def parse_body(body: str) -> tuple[str, int] | None:
    """``(origin, n)`` of a body made by :func:`htable_body`, or None for anything else."""
    try:
        data = json.loads(body)
        origin, _, n = str(data["cname"]).rpartition("-")
        return origin, int(n)
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class Subscriber:
    """One subscription to ``peer`` on a gateway's API, open until :meth:`close`.

    Every frame is kept in :attr:`frames`, in arrival order. When the connection
    closes (the gateway stopped or was killed) it connects again, every ``retry``
    seconds, resuming with ``since`` and ``epoch`` of the last history entry it got (a
    message, or a gap entry naming an origin), as a well-behaved client does;
    :attr:`connections` counts the subscriptions made.
    """

    ws_url: str
    peer: str
    token: str | None = None
    retry: float = 0.2
    frames: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0
    _task: asyncio.Task[None] | None = None
    _connected: asyncio.Event = field(default_factory=asyncio.Event)
    _last: tuple[int, str] | None = None

    def _url(self) -> str:
        query = []
        if self._last is not None:
            query += [f"since={self._last[0]}", f"epoch={quote(self._last[1])}"]
        if self.token:
            query.append(f"token={quote(self.token)}")
        tail = "?" + "&".join(query) if query else ""
        return f"{self.ws_url}/v1/peers/{self.peer}/subscribe{tail}"

    async def start(self, timeout: float = 10.0) -> Subscriber:
        """Subscribe; return once the first ``subscribed`` frame arrived."""
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._connected.wait(), timeout)
        return self

    async def _run(self) -> None:
        while True:
            try:
                async with connect(self._url(), max_size=None, open_timeout=5) as ws:
                    await self._read(ws)
            except (OSError, ConnectionClosed, InvalidHandshake, InvalidStatus, TimeoutError):
                pass
            await asyncio.sleep(self.retry)

    async def _read(self, ws: ClientConnection) -> None:
        async for raw in ws:
            frame: dict[str, Any] = json.loads(raw)
            self.frames.append(frame)
            if frame.get("type") == "subscribed":
                self.connections += 1
                self._connected.set()
            elif frame.get("type") == "message" or (
                # An origin gap is an entry of the history too, replayed like a message.
                frame.get("type") == "gap" and frame.get("offset") is not None
            ):
                self._last = (int(frame["offset"]), str(frame["epoch"]))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def messages(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == "message"]

    def gaps(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == "gap"]


@dataclass
class Delivery:
    """What one subscriber got of one origin's ``expected`` messages (their numbers)."""

    origin: str
    expected: frozenset[int]
    arrived: list[int]
    #: Messages the gateway declared lost for this origin (sum of its gap frames' ranges).
    declared_lost: int

    @property
    def delivered(self) -> int:
        return len(set(self.arrived))

    @property
    def duplicates(self) -> int:
        return len(self.arrived) - len(set(self.arrived))

    @property
    def inversions(self) -> int:
        """Messages that arrived after one with a higher number."""
        highest, count = 0, 0
        for n in self.arrived:
            if n < highest:
                count += 1
            highest = max(highest, n)
        return count

    @property
    def missed(self) -> int:
        return len(self.expected - set(self.arrived))

    @property
    def silently_missed(self) -> int:
        """Missed and not declared lost by any gap frame."""
        return max(0, self.missed - self.declared_lost)

    @property
    def complete(self) -> bool:
        """Everything arrived or was declared lost: waiting longer changes nothing."""
        return self.missed <= self.declared_lost

    def as_dict(self) -> dict[str, int | str]:
        return {
            "origin": self.origin,
            "expected": len(self.expected),
            "delivered": self.delivered,
            "missed": self.missed,
            "declared_lost": self.declared_lost,
            "silently_missed": self.silently_missed,
            "duplicates": self.duplicates,
            "inversions": self.inversions,
        }


def _gap_size(frame: Mapping[str, Any]) -> int:
    try:
        return max(0, int(frame["to"]) - int(frame["from"]) + 1)
    except (KeyError, TypeError, ValueError):
        return 0


def account(
    frames: list[dict[str, Any]],
    expected: Mapping[str, int | Collection[int]],
    uris: Mapping[str, str],
) -> dict[str, Delivery]:
    """One :class:`Delivery` per origin name in ``expected`` from a subscriber's frames.

    ``expected`` gives each origin's message numbers, or their count ``N`` for ``1..N``.
    ``uris`` gives each origin's SIP URI (``sip:HOST:PORT``): a gap frame counts for the
    origin whose URI its ``origin`` field names. Gap frames without an origin (a
    resume beyond the history held) are not any origin's declared loss.
    """
    arrived: dict[str, list[int]] = {name: [] for name in expected}
    lost = dict.fromkeys(expected, 0)
    for frame in frames:
        if frame.get("type") == "message":
            parsed = parse_body(str(frame.get("body", "")))
            if parsed is not None and parsed[0] in arrived:
                arrived[parsed[0]].append(parsed[1])
        elif frame.get("type") == "gap" and frame.get("origin"):
            for name, uri in uris.items():
                if name in lost and _names(str(frame["origin"]), uri):
                    lost[name] += _gap_size(frame)
    return {
        name: Delivery(
            name,
            frozenset(range(1, want + 1) if isinstance(want, int) else want),
            arrived[name],
            lost[name],
        )
        for name, want in expected.items()
    }


def _names(origin: str, uri: str) -> bool:
    """Whether an ``origin`` field (``<sip:H:P>;epoch=E``, or the bare URI) is ``uri``."""
    bare = origin.strip().removeprefix("<").split(">", 1)[0].split(";", 1)[0]
    return bare == uri.split(";", 1)[0]
