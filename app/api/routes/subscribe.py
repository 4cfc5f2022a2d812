"""``GET /v1/peers/{peer_id}/subscribe``: a peer's messages over a WebSocket.

The first frame is always ``subscribed`` (where the stream starts), then a ``gap`` when
a resume asks for more than is held, then the messages. :data:`CLOSE_CODES` lists every
close code the endpoint uses and :data:`QUERY_PARAMETERS` its query parameters; both go
into ``openapi/websocket.json`` (``make openapi``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deps import token_ok
from app.api.limits import ServeLimits
from app.dmq.errors import DmqUsageError
from app.dmq.peers import PeerReply
from app.gateway.errors import GatewayError
from app.gateway.frames import ErrorFrame, ReplyFrame
from app.gateway.hub import Ending, Subscriber
from app.gateway.service import Gateway

#: Seconds to wait for the close frame of a cut-off client to be queued.
CLOSE_WAIT = 10.0
#: The most bytes a close frame's reason may have (RFC 6455 section 5.5: a control
#: frame's payload is at most 125 bytes, 2 of them the code).
MAX_CLOSE_REASON = 123

#: Client frames per second allowed when the app was built without limits.
DEFAULT_FRAME_RATE = 100.0

router = APIRouter(prefix="/v1/peers", tags=["subscribe"])
log = logging.getLogger("dmq.gateway")

PATH = "/v1/peers/{peer_id}/subscribe"
#: A bad token (before the handshake) or a bad query parameter.
CLOSE_POLICY_VIOLATION = 1008
#: The gateway is stopping (a restart, usually): reconnect and resume.
CLOSE_SERVICE_RESTART = 1012
#: The peer is not registered, or was unregistered while subscribed.
CLOSE_PEER_REMOVED = 4004
#: The client read too slowly and its send queue overflowed.
CLOSE_SLOW_CONSUMER = 4008
#: The client sent a frame over the size limit (sent by the WebSocket layer itself).
CLOSE_TOO_BIG = 1009

#: Every close code the endpoint uses, and what each means (openapi/websocket.json is
#: generated from this table).
CLOSE_CODES: dict[int, str] = {
    CLOSE_POLICY_VIOLATION: "before the handshake completes, a missing or wrong API token "
    "(the handshake is refused with HTTP 403); after it, a since that is not a "
    "non-negative integer, an epoch without a since, or client frames sent faster than "
    "--ws-max-frames-per-second; the reason says which",
    CLOSE_SERVICE_RESTART: "the gateway is stopping; the reason says since=N to resume "
    "from (with the epoch of the subscribed frame) once it is back",
    CLOSE_PEER_REMOVED: "the peer is not registered (or was unregistered while subscribed)",
    CLOSE_SLOW_CONSUMER: "the client read too slowly and its send queue overflowed; the "
    "reason says since=N to resume from",
    CLOSE_TOO_BIG: "the client sent a frame larger than --ws-max-frame (replies are small)",
}

_CLOSE_FOR: dict[Ending, int] = {
    Ending.OVERFLOW: CLOSE_SLOW_CONSUMER,
    Ending.PEER_REMOVED: CLOSE_PEER_REMOVED,
    Ending.STOPPING: CLOSE_SERVICE_RESTART,
}

#: The query parameters the endpoint reads, as JSON schemas (for openapi/websocket.json).
QUERY_PARAMETERS: dict[str, dict[str, object]] = {
    "since": {
        "type": "integer",
        "minimum": 0,
        "maximum": 10**18 - 1,
        "description": "replay every message of the peer's history after this offset, "
        "then go live; without it the stream starts with the next message. Without epoch, "
        "the offset is taken to be of the peer's current epoch (the subscribed frame "
        "says which); one beyond the current offset can only be of an earlier epoch, and "
        "gets a gap frame and the whole history. Pass the epoch you last saw to be told "
        "of a restart even when the offsets happen to fit",
    },
    "epoch": {
        "type": "string",
        "description": "with since (never alone: that is close code 1008): the epoch the "
        "offset belongs to; another epoch than the peer's (the gateway restarted) replays "
        "the whole history after a gap frame",
    },
    "token": {
        "type": "string",
        "description": "an API token, for clients that cannot send an "
        "'Authorization: Bearer' header (browsers)",
    },
}


def close_reason(text: str) -> str:
    """``text`` cut to what a close frame can carry (123 bytes of UTF-8), never in the
    middle of a character: a longer reason would make the close itself fail."""
    data = text.encode("utf-8")
    if len(data) <= MAX_CLOSE_REASON:
        return text
    return data[: MAX_CLOSE_REASON - 3].decode("utf-8", "ignore") + "..."


def _bearer(websocket: WebSocket) -> str | None:
    header = websocket.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return value.strip()
    return websocket.query_params.get("token")


def _query(websocket: WebSocket) -> tuple[int | None, str | None] | str:
    """``(since, epoch)``, or why they are refused."""
    raw = websocket.query_params.get("since")
    epoch = websocket.query_params.get("epoch")
    if raw is None:
        if epoch is not None:
            return "epoch needs since: the offset in that epoch to resume after"
        return None, None
    # isascii: str.isdigit() is also true for "²", which int() refuses.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        return f"since must be a non-negative integer offset, not {raw[:20]!r}"
    return int(raw), epoch


@router.websocket("/{peer_id}/subscribe")
async def subscribe(websocket: WebSocket, peer_id: str) -> None:
    """Stream a peer's messages; ``?since=N&epoch=E`` replays what the client missed."""
    gateway: Gateway = websocket.app.state.gateway
    if not token_ok(websocket.app.state.api_tokens, _bearer(websocket)):
        await websocket.close(code=CLOSE_POLICY_VIOLATION, reason="missing or wrong API token")
        return
    query = _query(websocket)
    await websocket.accept()
    if isinstance(query, str):
        await websocket.close(code=CLOSE_POLICY_VIOLATION, reason=close_reason(query))
        return
    try:
        subscription = gateway.subscribe(peer_id, *query, _queue_bytes(websocket))
    except (GatewayError, DmqUsageError) as exc:
        code = CLOSE_SERVICE_RESTART if gateway.stopping else CLOSE_PEER_REMOVED
        await websocket.close(code=code, reason=close_reason(str(exc)))
        return
    subscriber = subscription.subscriber
    # Two loops per connection: frames out (a task) and replies in (this handler, so
    # that an idle connection costs one task less). When the sender stops (overflow,
    # peer removed, stopping) it cancels the handler's wait for client frames.
    handler = asyncio.current_task()
    sender = asyncio.ensure_future(_send_frames(websocket, subscriber, subscription.first_frames))
    receiving = True

    def sender_stopped(_: object) -> None:
        if receiving and handler is not None:
            handler.cancel()

    def cut_off() -> None:
        # A client that stops reading leaves the sender stuck in a send behind a full
        # TCP buffer; on overflow, stop it at once so the subscriber is let go.
        sender.cancel()

    sender.add_done_callback(sender_stopped)
    subscriber.on_overflow = cut_off
    try:
        await _receive_replies(websocket, gateway, peer_id)
    except asyncio.CancelledError:
        if not sender.done() or handler is None:
            raise  # cancelled from outside (server shutdown), not by the sender
        handler.uncancel()
    finally:
        receiving = False
        gateway.unsubscribe(subscriber)
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
    if subscriber.ending is not None:
        code = _CLOSE_FOR[subscriber.ending]
        reason = {
            Ending.OVERFLOW: f"send queue overflow: resume with since={subscriber.sent_offset}",
            Ending.PEER_REMOVED: f"peer {peer_id!r} was unregistered",
            Ending.STOPPING: f"the gateway is stopping: resume with since={subscriber.sent_offset}",
        }[subscriber.ending]
        # The close frame queues behind whatever the client has not read yet; if it
        # can't even be queued in CLOSE_WAIT seconds, give up and let the server drop
        # the connection when this handler returns.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                websocket.close(code=code, reason=close_reason(reason)), CLOSE_WAIT
            )


def _queue_bytes(websocket: WebSocket) -> int | None:
    """The subscriber's byte budget from the app's limits (``--ws-queue-bytes``); the
    gateway's default for an app built without limits."""
    limits: ServeLimits | None = getattr(websocket.app.state, "limits", None)
    return None if limits is None else limits.api.ws_queue_bytes


async def _send_frames(websocket: WebSocket, subscriber: Subscriber, first: list[str]) -> None:
    send = websocket.send_text
    for frame in first:
        await send(frame)
    frames = subscriber.frames
    wakeup = subscriber.wakeup
    while True:
        await wakeup.wait()
        wakeup.clear()
        while frames:
            if subscriber.ending is not None:
                return
            offset, frame = frames.popleft()
            await send(frame)
            subscriber.sent_offset = offset
        if subscriber.ending is not None:
            return


async def _receive_replies(websocket: WebSocket, gateway: Gateway, peer_id: str) -> None:
    limits = getattr(websocket.app.state, "limits", None)
    rate = limits.api.ws_frames_per_second if limits is not None else DEFAULT_FRAME_RATE
    # A token bucket: a burst of `rate` frames, then `rate` per second. A client over
    # it is closed rather than slowed: its frames would otherwise starve the loop.
    tokens = rate
    clock = asyncio.get_running_loop().time
    last = clock()
    while True:
        try:
            text = await websocket.receive_text()
        except (WebSocketDisconnect, RuntimeError, KeyError):
            return
        now = clock()
        tokens = min(rate, tokens + (now - last) * rate)
        last = now
        if tokens < 1:
            stats = getattr(websocket.app.state, "guard_stats", None)
            if stats is not None:
                stats.ws_rate_limited += 1
            with contextlib.suppress(Exception):
                await websocket.close(
                    code=CLOSE_POLICY_VIOLATION,
                    reason=f"more than {rate:g} frames per second",
                )
            return
        tokens -= 1
        error = _handle_reply(gateway, peer_id, text)
        if error is not None:
            await websocket.send_text(error.text())


def _handle_reply(gateway: Gateway, peer_id: str, text: str) -> ErrorFrame | None:
    try:
        frame = ReplyFrame.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return ErrorFrame(
            type="error",
            error=f"not a reply frame: {where + ': ' if where else ''}{first.get('msg')}",
        )
    body = frame.body.encode()
    if frame.encoding == "base64":
        try:
            body = base64.b64decode(frame.body, validate=True)
        except (binascii.Error, ValueError):
            return ErrorFrame(type="error", error="body is not valid base64", id=frame.id)
    try:
        gateway.reply(
            peer_id, frame.id, PeerReply(frame.code, frame.reason, frame.content_type, body)
        )
    except (GatewayError, DmqUsageError) as exc:
        return ErrorFrame(type="error", error=f"reply to {frame.id} refused: {exc}", id=frame.id)
    return None


_SUBSCRIBE_PATH = re.compile(r"/v1/peers/([^/]+)/subscribe")
_PUBLISH_PATH = re.compile(r"/v1/peers/([^/]+)/publish")


class SubscribeFastPath:
    """An ASGI wrapper that hands subscribe (and publish) WebSockets straight to their
    endpoints (:func:`subscribe`, :func:`app.api.routes.publish.publish`).

    Each WebSocket lives for hours, and FastAPI's router keeps its exit stacks, request
    scope and exception-handler wrappers alive for all that time: about 12 KB per idle
    connection, a third of what one costs. The endpoint does its own authentication and
    error handling, so it needs none of them. Everything else goes to the app.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            match = _SUBSCRIBE_PATH.fullmatch(scope["path"])
            if match is not None:
                scope["app"] = self.app
                await subscribe(WebSocket(scope, receive, send), match.group(1))
                return
            match = _PUBLISH_PATH.fullmatch(scope["path"])
            if match is not None:
                # A publishing WebSocket receives a frame and sends an ack per message:
                # FastAPI's wrappers around every receive and send were a tenth of the
                # publishing gateway's CPU. The endpoint authenticates itself too.
                from app.api.routes.publish import publish  # (publish imports this)

                scope["app"] = self.app
                await publish(WebSocket(scope, receive, send), match.group(1))
                return
        await self.app(scope, receive, send)
