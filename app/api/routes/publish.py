"""Many messages per request: ``POST /v1/peers/{peer_id}/broadcast/batch`` (and
``/send/batch``), and the publishing WebSocket ``GET /v1/peers/{peer_id}/publish``.

One POST per message spends most of its CPU on HTTP itself; a batch pays that once for
up to :data:`MAX_BATCH` messages, and a publishing WebSocket once per connection. Both
keep order: the messages of one batch, or of one connection, leave in the order given
(and the node's cap on messages in flight per node holds back the rest of a burst, in
order, so that no receiver's socket buffer overflows).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from collections import deque
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from app.api.deps import GatewayDep, token_ok
from app.api.problems import ProblemError
from app.api.routes.peers import (
    DEFAULT_CONTENT_TYPE,
    NOT_FOUND,
    RESERVED,
    PeerId,
    TimeoutQuery,
    WaitQuery,
    answer,
    content_type_of,
)
from app.api.routes.subscribe import (
    CLOSE_POLICY_VIOLATION,
    CLOSE_SERVICE_RESTART,
    _bearer,
    close_reason,
)
from app.api.schemas import BatchAccepted, BatchMessageIn, BatchResults, Problem, SendResults
from app.dmq.errors import DmqUsageError
from app.dmq.events import SendOperation
from app.gateway.errors import GatewayError
from app.gateway.frames import NodeResultFrame, PublishErrorFrame, PublishFrame
from app.gateway.models import Dispatch
from app.gateway.service import Gateway, Published

router = APIRouter(prefix="/v1/peers", tags=["peers"])
#: The WebSocket authenticates itself (a header or ?token=), like subscribe.
ws_router = APIRouter(prefix="/v1/peers", tags=["publish"])

#: The most messages one batch may hold.
MAX_BATCH = 1000
#: Publishes a WebSocket client may have sent and not yet had acknowledged; beyond
#: it the gateway stops reading the connection until acks go out, so a publisher
#: faster than the bus is slowed by TCP instead of filling the gateway's memory.
MAX_UNACKED = 1000
PUBLISH_PATH = "/v1/peers/{peer_id}/publish"
NDJSON = "application/x-ndjson"

_ITEMS = TypeAdapter(list[BatchMessageIn])
_ITEM = TypeAdapter(BatchMessageIn)

BATCH_BODY = {
    "requestBody": {
        "description": f"1 to {MAX_BATCH} messages: a JSON array of message objects, or "
        f"with Content-Type {NDJSON} one message object per line. Each body is sent as "
        "a KDMQ body, byte for byte (base64-decoded with encoding), with its "
        f"content_type (default {DEFAULT_CONTENT_TYPE}), in the batch's order.",
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_BATCH,
                    "items": {"$ref": "#/components/schemas/BatchMessageIn"},
                }
            },
            NDJSON: {"schema": {"type": "string"}},
        },
    }
}


def document_batch_items(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the schema of one batch message to the OpenAPI components.

    The batch routes read their body themselves (JSON or NDJSON), so FastAPI never
    sees the model and would leave the ``$ref`` above dangling (ReDoc then refuses the
    whole document)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.setdefault(
        "BatchMessageIn",
        BatchMessageIn.model_json_schema(ref_template="#/components/schemas/{model}"),
    )
    return schema


BATCH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": BatchResults, "description": "wait=true: one result per message"},
    202: {"model": BatchAccepted, "description": "wait=false: accepted, being sent in order"},
    413: {"model": Problem, "description": "a message is too large for the transport"},
    503: {"model": Problem, "description": "the gateway is stopping"},
    **NOT_FOUND,
    **RESERVED,
}


def _decode(item: BatchMessageIn) -> tuple[bytes, str]:
    """The KDMQ body and Content-Type of one message; raises ValueError for bad base64."""
    if item.encoding == "base64":
        body = base64.b64decode(item.body, validate=True)
    else:
        body = item.body.encode()
    return body, content_type_of(item.content_type)


def _items(raw: bytes, content_type: str | None) -> list[BatchMessageIn]:
    """The batch's messages, or a 422 naming the first thing wrong (with its index)."""
    media = (content_type or "application/json").split(";", 1)[0].strip().lower()
    try:
        if media == NDJSON:
            items = [_ITEM.validate_json(line) for line in raw.split(b"\n") if line.strip()]
        elif media == "application/json":
            items = _ITEMS.validate_json(raw)
        else:
            raise ProblemError(
                415, f"a batch is application/json (an array) or {NDJSON}, not {media}"
            )
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error.get("loc", ()))} for error in exc.errors()]
        ) from None
    if not 1 <= len(items) <= MAX_BATCH:
        raise RequestValidationError(
            [
                {
                    "loc": ("body",),
                    "msg": f"a batch holds 1 to {MAX_BATCH} messages, not {len(items)}",
                    "type": "batch_size",
                }
            ]
        )
    return items


async def _batch(
    request: Request,
    gateway: Gateway,
    peer_id: str,
    node: str | None,
    wait: bool,
    timeout: float | None,
) -> Response:
    items = _items(await request.body(), request.headers.get("content-type"))
    messages = []
    for index, item in enumerate(items):
        try:
            messages.append(_decode(item))
        except (binascii.Error, ValueError):
            raise ProblemError(422, f"body.{index}.body: not valid base64") from None
    dispatches = await gateway.send_batch(peer_id, messages, node=node, wait=wait, timeout=timeout)
    # Serialised by pydantic itself: FastAPI's jsonable_encoder walked every result
    # of a large batch in Python, at a cost close to that of sending it.
    if not wait:
        first = dispatches[0]
        accepted = BatchAccepted(
            peer=first.peer,
            targets=len(first.targets),
            nodes=list(first.targets),
            ids=[d.id for d in dispatches],
        )
        return Response(accepted.model_dump_json(), 202, media_type="application/json")
    results = BatchResults(peer=peer_id, results=[_results(d) for d in dispatches])
    return Response(results.model_dump_json(), 200, media_type="application/json")


def _results(dispatch: Dispatch) -> SendResults:
    model, _ = answer(dispatch)
    assert isinstance(model, SendResults)
    return model


@router.post(
    "/{peer_id}/broadcast/batch",
    operation_id="broadcast_batch",
    responses=BATCH_RESPONSES,
    openapi_extra=BATCH_BODY,
    response_model=None,
)
async def broadcast_batch(
    peer_id: PeerId,
    request: Request,
    gateway: GatewayDep,
    wait: WaitQuery = False,
    timeout: TimeoutQuery = None,
) -> Response:
    """Broadcast many messages, in order, in one request (every active node but this
    one gets each of them); one id, or with wait=true one result, per message."""
    return await _batch(request, gateway, peer_id, None, wait, timeout)


@router.post(
    "/{peer_id}/send/batch",
    operation_id="send_batch",
    responses={**BATCH_RESPONSES, 404: {"model": Problem, "description": "no such node"}},
    openapi_extra=BATCH_BODY,
    response_model=None,
)
async def send_batch(
    peer_id: PeerId,
    request: Request,
    gateway: GatewayDep,
    node: Annotated[
        str,
        Query(min_length=5, max_length=512, description="the node's SIP URI"),
    ],
    wait: WaitQuery = False,
    timeout: TimeoutQuery = None,
) -> Response:
    """Send many messages, in order, to one node, whatever its status."""
    return await _batch(request, gateway, peer_id, node, wait, timeout)


# ---------------------------------------------------------------------- WebSocket


#: A JSON string as pydantic writes it (UTF-8 kept, control characters escaped).
_json = json.JSONEncoder(ensure_ascii=False).encode


def _result_frame(dispatch: Dispatch) -> list[NodeResultFrame]:
    model = _results(dispatch)
    return [NodeResultFrame.model_validate(r.model_dump()) for r in model.results]


@ws_router.websocket("/{peer_id}/publish")
async def publish(websocket: WebSocket, peer_id: str) -> None:
    """Publish messages over one connection: a ``publish`` frame each, acknowledged in
    order by an ``ack`` frame with every node's result; ``?node=URI`` sends each to
    that node instead of broadcasting."""
    gateway: Gateway = websocket.app.state.gateway
    if not token_ok(websocket.app.state.api_tokens, _bearer(websocket)):
        await websocket.close(code=CLOSE_POLICY_VIOLATION, reason="missing or wrong API token")
        return
    await websocket.accept()
    node = websocket.query_params.get("node")
    target = None
    if node is not None:
        try:
            target = await gateway.resolve_node(node)
        except (GatewayError, DmqUsageError) as exc:
            await websocket.close(code=CLOSE_POLICY_VIOLATION, reason=close_reason(str(exc)))
            return
    # Acks go out in the order of the publishes, from one task; the reading loop waits
    # for room when MAX_UNACKED publishes are unacknowledged.
    pending: deque[_Pending] = deque()
    room = asyncio.Semaphore(MAX_UNACKED)
    more = asyncio.Event()
    sender = asyncio.ensure_future(_send_acks(websocket, gateway, peer_id, pending, room, more))
    # The publishes read in one turn of the loop leave together, at its end, as one
    # run (bundled for the nodes that read bundles), in the order they came.
    turn: list[tuple[str, tuple[bytes, str] | str]] = []
    loop = asyncio.get_running_loop()

    def flush() -> None:
        if turn:
            _publish_turn(gateway, peer_id, target, turn, pending)
            turn.clear()
            more.set()

    try:
        while not sender.done():
            await room.acquire()
            try:
                text = await websocket.receive_text()
            except (WebSocketDisconnect, RuntimeError, KeyError):
                room.release()
                break
            if not turn:
                loop.call_soon(flush)
            turn.append(_parse_publish(text))
    finally:
        flush()
        # Acks still due are sent (the client may be waiting for them), unless the
        # client is gone.
        pending.append(("", None, "stop"))
        more.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(sender, 35)
        sender.cancel()
    if gateway.stopping:
        with contextlib.suppress(Exception):
            await websocket.close(code=CLOSE_SERVICE_RESTART, reason="the gateway is stopping")


#: One publish on its way to an ack: ``(client id, message, None)``, or
#: ``(client id, None, error frame)`` (``"stop"`` ends the acks).
_Pending = tuple[str, Published | None, str | None]


def _parse_publish(text: str) -> tuple[str, tuple[bytes, str] | str]:
    """One publish frame: ``(client id, (body, content type))``, or ``(id, error frame)``."""
    try:
        frame = PublishFrame.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        client_id = None
        with contextlib.suppress(Exception):
            client_id = json.loads(text).get("id")
        return (
            "",
            PublishErrorFrame(
                type="error",
                error=f"not a publish frame: {where + ': ' if where else ''}{first.get('msg')}",
                id=client_id if isinstance(client_id, str) else None,
                status=422,
            ).text(),
        )
    try:
        if frame.encoding == "base64":
            body = base64.b64decode(frame.body, validate=True)
        else:
            body = frame.body.encode()
        message = body, content_type_of(frame.content_type)
    except (binascii.Error, ValueError):
        return frame.id, _error(frame.id, 422, "body is not valid base64")
    except ProblemError as exc:
        return frame.id, _error(frame.id, exc.status, exc.detail)
    return frame.id, message


def _publish_turn(
    gateway: Gateway,
    peer_id: str,
    target: Any,
    turn: list[tuple[str, tuple[bytes, str] | str]],
    pending: deque[_Pending],
) -> None:
    """Send the publishes of one turn: each stretch of good ones as one run; a run
    the gateway refuses gets its error on each of its publishes, in order."""
    at = 0
    while at < len(turn):
        client_id, item = turn[at]
        if isinstance(item, str):
            pending.append((client_id, None, item))
            at += 1
            continue
        stop = at
        while stop < len(turn) and not isinstance(turn[stop][1], str):
            stop += 1
        ids = [turn[i][0] for i in range(at, stop)]
        run = [item for _, item in turn[at:stop] if not isinstance(item, str)]
        try:
            sent = gateway.publish_run(peer_id, run, target)
        except ProblemError as exc:
            pending.extend((i, None, _error(i, exc.status, exc.detail)) for i in ids)
        except (GatewayError, DmqUsageError) as exc:
            status = getattr(exc, "status_hint", 500)
            pending.extend((i, None, _error(i, status, str(exc))) for i in ids)
        else:
            pending.extend((i, published, None) for i, published in zip(ids, sent, strict=True))
        at = stop


def _error(client_id: str, status: int, error: str) -> str:
    return PublishErrorFrame(type="error", error=error, id=client_id, status=status).text()


async def _send_acks(
    websocket: WebSocket,
    gateway: Gateway,
    peer_id: str,
    pending: deque[_Pending],
    room: asyncio.Semaphore,
    more: asyncio.Event,
) -> None:
    rendered_for: tuple[SendOperation, ...] = ()
    results = ""
    while True:
        while not pending:
            more.clear()
            await more.wait()
        client_id, sent, error = pending.popleft()
        if sent is None:
            assert error is not None
            if error == "stop":
                return
            await websocket.send_text(error)
            room.release()
            continue
        failed = False
        for waiter in sent.waiters:
            with contextlib.suppress(Exception):
                await waiter
            if not waiter.done() or waiter.cancelled() or waiter.exception() is not None:
                failed = True
        if failed:
            await websocket.send_text(
                _error(client_id, 503, "the gateway stopped before every node answered")
            )
            room.release()
            continue
        if sent.parts != rendered_for:
            # The messages of one bundle share its results: rendered once for them all.
            dispatch = gateway.dispatch_of(sent, results=True)
            rendered_for = sent.parts
            results = (
                f'"targets":{len(dispatch.targets)},"results":['
                + ",".join(
                    f.model_dump_json(by_alias=True, exclude_unset=True)
                    for f in _result_frame(dispatch)
                )
                + "]}"
            )
        # AckFrame's text (tests/bundle check it), written without a model per ack.
        await websocket.send_text(
            f'{{"type":"ack","id":{_json(client_id)},'
            f'"message_id":{_json(f"{gateway.instance}-{sent.id}")},'
            f'"peer":{_json(peer_id)},{results}'
        )
        room.release()
