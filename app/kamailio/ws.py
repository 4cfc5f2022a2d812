"""The WebSocket endpoint every mirror offers as ``GET .../changes``.

A mirror's route is one line::

    @ws_router.websocket("/{table}/changes")
    async def changes(websocket: WebSocket, table: str) -> None:
        await serve_changes(websocket, lambda: mirror_of(websocket).stream_for(table))

:func:`serve_changes` does what ``GET /v1/peers/{peer_id}/subscribe`` does, with the
same query parameters (``since``, ``epoch``, ``token``), frames (``subscribed``,
``gap``, then ``change`` frames instead of ``message`` frames) and close codes (1008,
1012, 4004, 4008; :data:`CLOSE_CODES`). Clients send nothing: a client frame is
answered with an ``error`` frame, and more than ``--ws-max-frames-per-second`` of them
close the connection with 1008, as on the subscribe path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from fastapi import WebSocket, WebSocketDisconnect

from app.api.deps import token_ok
from app.api.routes.subscribe import (
    CLOSE_PEER_REMOVED,
    CLOSE_POLICY_VIOLATION,
    CLOSE_SERVICE_RESTART,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_BIG,
    CLOSE_WAIT,
    DEFAULT_FRAME_RATE,
    _bearer,
    _query,
    close_reason,
)
from app.gateway.hub import Ending
from app.kamailio.frames import ErrorFrame
from app.kamailio.stream import ChangeStream, ChangeSubscriber

#: Every close code of a ``.../changes`` endpoint and what it means (AsyncAPI).
CLOSE_CODES: dict[int, str] = {
    CLOSE_POLICY_VIOLATION: "before the handshake completes, a missing or wrong API token "
    "(the handshake is refused with HTTP 403); after it, a since that is not a "
    "non-negative integer, an epoch without a since, or client frames sent faster than "
    "--ws-max-frames-per-second; the reason says which",
    CLOSE_SERVICE_RESTART: "the gateway is stopping; the replica is rebuilt at the next "
    "start, in a new epoch (a resume then gets a gap frame and the changes held)",
    CLOSE_PEER_REMOVED: "no such stream: the mirror is turned off (--kamailio-mirrors) or "
    "the name is not one it can hold; the reason says which",
    CLOSE_SLOW_CONSUMER: "the client read too slowly and its send queue overflowed; the "
    "reason says since=N to resume from",
    CLOSE_TOO_BIG: "the client sent a frame larger than --ws-max-frame",
}

#: Every ``.../changes`` endpoint, for the AsyncAPI document: channel name ->
#: (address, title, description of its path parameters). A mirror adds its own.
CHANGE_CHANNELS: dict[str, tuple[str, str, dict[str, str]]] = {
    "htableChanges": (
        "/v1/htable/{table}/changes",
        "an htable's changes (events set, delete, expire)",
        {"table": "the htable's name, as in Kamailio's configuration"},
    ),
    "registrationsChanges": (
        "/v1/registrations/changes",
        "the registrations' changes (events register, refresh, unregister, expire; key: "
        "the contact's ruid; data: the contact)",
        {},
    ),
    "dialogsChanges": (
        "/v1/dialogs/changes",
        "the dialogs' changes (events created, state, removed, expired; key: the dialog's "
        "id; data: the dialog, with previous for a state change)",
        {},
    ),
}

_CLOSE_FOR: dict[Ending, int] = {
    Ending.OVERFLOW: CLOSE_SLOW_CONSUMER,
    Ending.PEER_REMOVED: CLOSE_PEER_REMOVED,
    Ending.STOPPING: CLOSE_SERVICE_RESTART,
}


class NoSuchStream(LookupError):
    """Raised by a stream lookup: the endpoint closes with 4004 and the message."""


async def serve_changes(websocket: WebSocket, stream_for: Callable[[], ChangeStream]) -> None:
    """Serve one client of a change stream until it leaves or the stream ends it.

    ``stream_for`` is called after the token and the query were checked; it returns
    the stream, or raises :class:`NoSuchStream` (close code 4004 with its message).
    """
    if not token_ok(websocket.app.state.api_tokens, _bearer(websocket)):
        await websocket.close(code=CLOSE_POLICY_VIOLATION, reason="missing or wrong API token")
        return
    query = _query(websocket)
    await websocket.accept()
    if isinstance(query, str):
        await websocket.close(code=CLOSE_POLICY_VIOLATION, reason=close_reason(query))
        return
    gateway = getattr(websocket.app.state, "gateway", None)
    if gateway is not None and gateway.stopping:
        await websocket.close(code=CLOSE_SERVICE_RESTART, reason="the gateway is stopping")
        return
    try:
        stream = stream_for()
    except NoSuchStream as exc:
        await websocket.close(code=CLOSE_PEER_REMOVED, reason=close_reason(str(exc)))
        return
    subscription = stream.subscribe(*query)
    subscriber = subscription.subscriber
    handler = asyncio.current_task()
    sender = asyncio.ensure_future(_send_frames(websocket, subscriber, subscription.first_frames))
    receiving = True

    def sender_stopped(_: object) -> None:
        if receiving and handler is not None:
            handler.cancel()

    sender.add_done_callback(sender_stopped)

    def cut_off() -> None:
        sender.cancel()

    subscriber.on_overflow = cut_off
    try:
        await _receive(websocket)
    except asyncio.CancelledError:
        if not sender.done() or handler is None:
            raise
        handler.uncancel()
    finally:
        receiving = False
        stream.unsubscribe(subscriber)
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
    if subscriber.ending is not None:
        code = _CLOSE_FOR[subscriber.ending]
        reason = {
            Ending.OVERFLOW: f"send queue overflow: resume with since={subscriber.sent_offset}",
            Ending.PEER_REMOVED: f"stream {stream.name!r} was removed",
            Ending.STOPPING: "the gateway is stopping",
        }[subscriber.ending]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                websocket.close(code=code, reason=close_reason(reason)), CLOSE_WAIT
            )


async def _send_frames(
    websocket: WebSocket, subscriber: ChangeSubscriber, first: list[str]
) -> None:
    send = websocket.send_text
    for frame in first:
        await send(frame)
    frames = subscriber.frames
    while True:
        await subscriber.wakeup.wait()
        subscriber.wakeup.clear()
        while frames:
            if subscriber.ending is not None:
                return
            offset, frame = frames.popleft()
            await send(frame)
            subscriber.sent_offset = offset
        if subscriber.ending is not None:
            return


async def _receive(websocket: WebSocket) -> None:
    """Read (and refuse) client frames, rate-limited as on the subscribe path."""
    limits = getattr(websocket.app.state, "limits", None)
    rate = limits.api.ws_frames_per_second if limits is not None else DEFAULT_FRAME_RATE
    tokens = rate
    clock = asyncio.get_running_loop().time
    last = clock()
    while True:
        try:
            await websocket.receive_text()
        except (WebSocketDisconnect, RuntimeError, KeyError):
            return
        now = clock()
        tokens = min(rate, tokens + (now - last) * rate)
        last = now
        if tokens < 1:
            with contextlib.suppress(Exception):
                await websocket.close(
                    code=CLOSE_POLICY_VIOLATION, reason=f"more than {rate:g} frames per second"
                )
            return
        tokens -= 1
        await websocket.send_text(
            ErrorFrame(type="error", error="a change stream takes no client frames").text()
        )
