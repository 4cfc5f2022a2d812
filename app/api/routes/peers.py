"""Peers: register them, and broadcast or send over the bus."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response

from app.api.deps import HubDep
from app.api.problems import ProblemError
from app.api.routes.nodes import UNREADABLE_BODY, resolve_node_uri
from app.api.schemas import NodeResultOut, PeerIn, PeerOut, Problem, SendAccepted, SendResults
from app.dmq.config import is_valid_peer_id
from app.dmq.errors import (
    MessageTooLargeError,
    NodeStoppedError,
    ReservedPeerError,
    UnknownNodeError,
)
from app.dmq.events import NodeResult, SendOperation
from app.gateway.hub import Hub, PeerChannel
from app.gateway.models import PeerSettings, ReplyMode

router = APIRouter(tags=["peers"])

PEER_ID_PATTERN = r"^[A-Za-z0-9\-_.!~*'()]{1,128}$"
PeerId = Annotated[
    str,
    Path(
        pattern=PEER_ID_PATTERN,
        description="the peer id: the user part of KDMQ Request-URIs (e.g. htable)",
        examples=["htable"],
    ),
]

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "no such peer"}
}
RESERVED: dict[int | str, dict[str, Any]] = {
    409: {"model": Problem, "description": "the notification channel is reserved"}
}

#: Any body: it is sent as the KDMQ body byte for byte, with the request's Content-Type.
RAW_BODY = {
    "requestBody": {
        "description": "sent as the KDMQ body byte for byte, with this Content-Type",
        "required": False,
        "content": {
            "application/json": {"schema": {}},
            "text/plain": {"schema": {"type": "string"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def peer_out(channel: PeerChannel) -> PeerOut:
    settings = channel.settings
    return PeerOut(
        peer_id=channel.peer_id,
        description=settings.description,
        reply=settings.reply,
        reply_timeout=settings.reply_timeout,
        history=settings.history,
        epoch=channel.epoch,
        offset=channel.offset,
        history_size=len(channel.history),
        subscribers=len(channel.subscribers),
        received=channel.received,
        persistent=not channel.ephemeral,
    )


def channel_of(hub: Hub, peer_id: str) -> PeerChannel:
    channel = hub.channels.get(peer_id)
    if channel is None:
        raise ProblemError(404, f"no peer {peer_id!r} is registered on this gateway")
    return channel


@router.get("/v1/peers", operation_id="list_peers")
async def list_peers(hub: HubDep) -> list[PeerOut]:
    """Every peer registered on this gateway."""
    return [peer_out(channel) for channel in hub.channels.values()]


@router.get("/v1/peers/{peer_id}", operation_id="get_peer", responses=NOT_FOUND)
async def get_peer(peer_id: PeerId, hub: HubDep) -> PeerOut:
    """One peer, with its history position and subscriber count."""
    return peer_out(channel_of(hub, peer_id))


@router.put(
    "/v1/peers/{peer_id}",
    operation_id="put_peer",
    responses={
        200: {"model": PeerOut, "description": "updated"},
        201: {"model": PeerOut, "description": "registered"},
        **UNREADABLE_BODY,
        **RESERVED,
    },
)
async def put_peer(peer_id: PeerId, body: PeerIn, hub: HubDep, response: Response) -> PeerOut:
    """Register a peer, or update it (idempotent). It survives a restart."""
    settings = PeerSettings(
        description=body.description,
        reply=ReplyMode(body.reply),
        reply_timeout=float(body.reply_timeout),
        history=body.history,
    )
    try:
        channel, created = hub.register(peer_id, settings)
    except ReservedPeerError as exc:
        raise ProblemError(409, str(exc)) from None
    except ValueError as exc:
        raise ProblemError(422, str(exc)) from None
    response.status_code = 201 if created else 200
    return peer_out(channel)


@router.delete(
    "/v1/peers/{peer_id}", status_code=204, operation_id="delete_peer", responses=NOT_FOUND
)
async def delete_peer(peer_id: PeerId, hub: HubDep) -> Response:
    """Unregister a peer: KDMQ for it gets 404 again, its subscribers are closed."""
    if not hub.unregister(peer_id):
        raise ProblemError(404, f"no peer {peer_id!r} is registered on this gateway")
    return Response(status_code=204)


def _check_peer_id(hub: Hub, peer_id: str) -> None:
    if peer_id == hub.server.config.notification_channel:
        raise ProblemError(409, f"{peer_id!r} is the notification channel and carries membership")
    if not is_valid_peer_id(peer_id):
        raise ProblemError(422, f"peer id {peer_id!r} is not valid")


def _result_out(result: NodeResult) -> NodeResultOut:
    body: str | None = None
    encoding: Literal["base64"] | None = None
    if result.body:
        try:
            body = result.body.decode("utf-8")
        except UnicodeDecodeError:
            body = base64.b64encode(result.body).decode("ascii")
            encoding = "base64"
    timed_out = result.timed_out or result.transport_error
    return NodeResultOut(
        node=str(result.node),
        code=None if timed_out else result.code,
        reason="Request Timeout" if timed_out else result.reason,
        content_type=result.content_type,
        body=body,
        encoding=encoding,
        timeout=timed_out,
    )


async def _dispatch(
    request: Request,
    hub: Hub,
    peer_id: str,
    node: str | None,
    wait: bool,
    timeout: float | None,
    response: Response,
) -> Any:
    _check_peer_id(hub, peer_id)
    body = await request.body()
    content_type = request.headers.get("content-type")
    if content_type is not None and ("\r" in content_type or "\n" in content_type):
        raise ProblemError(400, "Content-Type must be a single line")
    server = hub.server
    limit = server.node.max_body_size
    if len(body) > limit:
        raise ProblemError(
            413,
            f"a body of {len(body)} bytes is too large for one KDMQ message "
            f"(at most {limit} bytes on this transport)",
        )
    target = None if node is None else await resolve_node_uri(hub, node)
    try:
        if target is None:
            operation, waiter = server.broadcast_nowait(peer_id, body, content_type)
        else:
            operation, waiter = server.send_nowait(peer_id, body, content_type, target)
    except UnknownNodeError as exc:
        raise ProblemError(404, str(exc)) from None
    except MessageTooLargeError as exc:
        raise ProblemError(413, str(exc)) from None
    except NodeStoppedError as exc:
        raise ProblemError(503, str(exc)) from None
    message_id = f"{hub.instance}-{operation.id}"
    if not wait:
        response.status_code = 202
        return SendAccepted(
            id=message_id,
            peer=peer_id,
            targets=len(operation.targets),
            nodes=[str(t) for t in operation.targets],
        )
    limit_s = timeout if timeout is not None else server.config.timers.timer_f_value + 1
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(waiter), limit_s)
    return SendResults(
        id=message_id,
        peer=peer_id,
        targets=len(operation.targets),
        results=_results(operation),
    )


def _results(operation: SendOperation) -> list[NodeResultOut]:
    answered = {str(r.node): r for r in operation.results}
    out: list[NodeResultOut] = []
    for target in operation.targets:
        result = answered.get(str(target))
        if result is None:
            out.append(
                NodeResultOut(node=str(target), code=None, reason=None, body=None, timeout=True)
            )
        else:
            out.append(_result_out(result))
    return out


WaitQuery = Annotated[
    bool,
    Query(description="false: answer 202 at once; true: answer 200 with every node's result"),
]
TimeoutQuery = Annotated[
    float | None,
    Query(gt=0, le=300, description="with wait=true: seconds to wait (default Timer F + 1)"),
]
SEND_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": SendResults, "description": "wait=true: one result per target node"},
    202: {"model": SendAccepted, "description": "wait=false: accepted, being sent"},
    400: {"model": Problem, "description": "the Content-Type is not a single line"},
    413: {"model": Problem, "description": "the body is too large for the transport"},
    503: {"model": Problem, "description": "the node is stopping"},
    **RESERVED,
}


@router.post(
    "/v1/peers/{peer_id}/broadcast",
    operation_id="broadcast",
    responses=SEND_RESPONSES,
    openapi_extra=RAW_BODY,
    response_model=None,
)
async def broadcast(
    peer_id: PeerId,
    request: Request,
    response: Response,
    hub: HubDep,
    wait: WaitQuery = False,
    timeout: TimeoutQuery = None,
) -> SendAccepted | SendResults:
    """Send the request body to this peer on every active node but this one."""
    result: SendAccepted | SendResults = await _dispatch(
        request, hub, peer_id, None, wait, timeout, response
    )
    return result


@router.post(
    "/v1/peers/{peer_id}/send",
    operation_id="send",
    responses={**SEND_RESPONSES, 404: {"model": Problem, "description": "no such node"}},
    openapi_extra=RAW_BODY,
    response_model=None,
)
async def send(
    peer_id: PeerId,
    request: Request,
    response: Response,
    hub: HubDep,
    node: Annotated[
        str,
        Query(
            min_length=5,
            max_length=512,
            description="the node's SIP URI",
            examples=["sip:127.0.0.1:5062"],
        ),
    ],
    wait: WaitQuery = False,
    timeout: TimeoutQuery = None,
) -> SendAccepted | SendResults:
    """Send the request body to this peer on one node, whatever its status."""
    result: SendAccepted | SendResults = await _dispatch(
        request, hub, peer_id, node, wait, timeout, response
    )
    return result
