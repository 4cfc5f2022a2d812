"""``GET /v1/peers/{peer_id}/subscribe``: a peer's messages over a WebSocket.

Close codes (besides the standard ones):

* 4004 - the peer is not registered (or was unregistered while subscribed);
* 4008 - the client read too slowly and its send queue overflowed; the reason says
  the offset to resume from with ``?since=``;
* 1008 - before the handshake completes (HTTP 403): missing or wrong API token; after
  it: ``since`` is not a non-negative integer.

:data:`CLOSE_CODES` and :data:`QUERY_PARAMETERS` say the same for
``openapi/websocket.json`` (``make openapi``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deps import token_ok
from app.api.schemas import ReplyFrame
from app.dmq.peers import PeerReply
from app.gateway.hub import CLOSE_PEER_REMOVED, CLOSE_SLOW_CONSUMER, Hub, Subscriber

#: Seconds to wait for the close frame of a cut-off client to be queued.
CLOSE_WAIT = 10.0

router = APIRouter(tags=["subscribe"])
log = logging.getLogger("dmq.gateway")

PATH = "/v1/peers/{peer_id}/subscribe"
#: WebSocket close code for a policy violation (bad token, bad query parameter).
CLOSE_POLICY_VIOLATION = 1008

#: The close codes this endpoint uses besides the standard ones, and what each means
#: (openapi/websocket.json is generated from this table).
CLOSE_CODES: dict[int, str] = {
    CLOSE_PEER_REMOVED: "the peer is not registered (or was unregistered while subscribed)",
    CLOSE_SLOW_CONSUMER: "the client read too slowly and its send queue overflowed; the "
    "reason says the offset to resume from with ?since=",
    CLOSE_POLICY_VIOLATION: "before the handshake completes, a missing or wrong API token "
    "(the handshake is refused with HTTP 403); after it, a since that is not a "
    "non-negative integer",
}

#: The query parameters the endpoint reads, as JSON schemas (for openapi/websocket.json).
QUERY_PARAMETERS: dict[str, dict[str, object]] = {
    "since": {
        "type": "integer",
        "minimum": 0,
        "maximum": 10**18 - 1,
        "description": "replay every message of the peer's history after this offset, "
        "then go live; without it the stream starts with the next message",
    },
    "epoch": {
        "type": "string",
        "description": "with since: the epoch the offset belongs to; another epoch than "
        "the peer's (the gateway restarted) replays the whole history after a gap frame",
    },
    "token": {
        "type": "string",
        "description": "an API token, for clients that cannot send an "
        "'Authorization: Bearer' header (browsers)",
    },
}


def _bearer(websocket: WebSocket) -> str | None:
    header = websocket.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return value.strip()
    return websocket.query_params.get("token")


def _int_param(websocket: WebSocket, name: str) -> int | str | None:
    raw = websocket.query_params.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 18:
        return f"{name} must be a non-negative integer offset, not {raw[:20]!r}"
    return int(raw)


@router.websocket(PATH)
async def subscribe(websocket: WebSocket, peer_id: str) -> None:
    """Stream a peer's messages; ``?since=N&epoch=E`` replays what the client missed."""
    hub: Hub = websocket.app.state.hub
    if not token_ok(websocket.app.state.api_tokens, _bearer(websocket)):
        await websocket.close(code=CLOSE_POLICY_VIOLATION, reason="missing or wrong API token")
        return
    since = _int_param(websocket, "since")
    epoch = websocket.query_params.get("epoch")
    await websocket.accept()
    if isinstance(since, str):
        await websocket.close(code=CLOSE_POLICY_VIOLATION, reason=since)
        return
    if peer_id not in hub.channels:
        await websocket.close(code=CLOSE_PEER_REMOVED, reason=f"no peer {peer_id!r} is registered")
        return
    subscription = hub.subscribe(peer_id, since, epoch)
    subscriber = subscription.subscriber
    # Two loops per connection: frames out (a task) and replies in (this handler, so
    # that an idle connection costs one task less). When the sender stops (overflow,
    # peer removed) it cancels the handler's wait for client frames.
    handler = asyncio.current_task()
    sender = asyncio.ensure_future(_send_frames(websocket, subscriber, subscription.gap))
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
        await _receive_replies(websocket, hub, peer_id)
    except asyncio.CancelledError:
        if not sender.done() or handler is None:
            raise  # cancelled from outside (server shutdown), not by the sender
        handler.uncancel()
    finally:
        receiving = False
        hub.unsubscribe(subscriber)
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
    code, reason = (None, "")
    if subscriber.overflowed:
        code = CLOSE_SLOW_CONSUMER
        reason = f"send queue overflow: resume with since={subscriber.sent_offset}"
    elif peer_id not in hub.channels:
        code, reason = CLOSE_PEER_REMOVED, f"peer {peer_id!r} was unregistered"
    if code is not None:
        # The close frame queues behind whatever the client has not read yet; if it
        # can't even be queued in CLOSE_WAIT seconds, give up and let the server drop
        # the connection when this handler returns.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(websocket.close(code=code, reason=reason), CLOSE_WAIT)


async def _send_frames(
    websocket: WebSocket, subscriber: Subscriber, gap: dict[str, object] | None
) -> None:
    send = websocket.send_text
    if gap is not None:
        await send(json.dumps(gap))
    frames = subscriber.frames
    wakeup = subscriber.wakeup
    while True:
        await wakeup.wait()
        wakeup.clear()
        while frames:
            if subscriber.overflowed or subscriber.closed:
                return
            offset, frame = frames.popleft()
            await send(frame)
            subscriber.sent_offset = offset
        if subscriber.overflowed or subscriber.closed:
            return


async def _receive_replies(websocket: WebSocket, hub: Hub, peer_id: str) -> None:
    while True:
        try:
            text = await websocket.receive_text()
        except (WebSocketDisconnect, RuntimeError, KeyError):
            return
        error = _handle_reply(hub, peer_id, text)
        if error is not None:
            await websocket.send_text(json.dumps({"type": "error", "error": error}))


def _handle_reply(hub: Hub, peer_id: str, text: str) -> str | None:
    try:
        frame = ReplyFrame.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return f"not a reply frame: {where + ': ' if where else ''}{first.get('msg')}"
    body = frame.body.encode()
    if frame.encoding == "base64":
        try:
            body = base64.b64decode(frame.body, validate=True)
        except (binascii.Error, ValueError):
            return "body is not valid base64"
    reply = PeerReply(frame.code, frame.reason, frame.content_type, body)
    if not hub.reply(peer_id, frame.id, reply):
        return f"no message {frame.id!r} is waiting for a reply (answered or timed out)"
    return None


_SUBSCRIBE_PATH = re.compile(r"/v1/peers/([^/]+)/subscribe")


class SubscribeFastPath:
    """An ASGI wrapper that hands subscribe WebSockets straight to :func:`subscribe`.

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
        await self.app(scope, receive, send)
