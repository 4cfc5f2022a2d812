"""Peers: register them, and broadcast or send over the bus."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response

from app.api.deps import GatewayDep
from app.api.problems import UNREADABLE_BODY, ProblemError
from app.api.schemas import NodeResultOut, PeerIn, PeerOut, Problem, SendAccepted, SendResults
from app.gateway.models import Dispatch, NodeOutcome, PeerSettings, ReplyMode

router = APIRouter(prefix="/v1/peers", tags=["peers"])

PEER_ID_DESCRIPTION = (
    "the peer id: the user part of KDMQ Request-URIs (e.g. htable), 1-128 letters, digits "
    "or - _ . ! ~ * ' ( )"
)
PeerId = Annotated[str, Path(description=PEER_ID_DESCRIPTION, examples=["htable"])]

#: The KDMQ Content-Type of a body sent without one.
DEFAULT_CONTENT_TYPE = "application/json"
#: What an HTML form or ``curl -d`` sends when no Content-Type is given: never meant as
#: a KDMQ body's type.
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "no such peer"}
}
RESERVED: dict[int | str, dict[str, Any]] = {
    409: {"model": Problem, "description": "the notification channel is reserved"}
}

#: Any body: it is sent as the KDMQ body byte for byte, with the request's Content-Type.
RAW_BODY = {
    "requestBody": {
        "description": "sent as the KDMQ body byte for byte, with this Content-Type. "
        f"Without a Content-Type the body is sent as {DEFAULT_CONTENT_TYPE} (what "
        "Kamailio's modules exchange); a form encoding (what `curl -d` sends unless told "
        "otherwise) is refused with 415.",
        "required": False,
        "content": {
            "application/json": {"schema": {}},
            "text/plain": {"schema": {"type": "string"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.get("", operation_id="list_peers")
async def list_peers(gateway: GatewayDep) -> list[PeerOut]:
    """Every peer registered on this gateway."""
    return [PeerOut.model_validate(peer) for peer in gateway.peers()]


@router.get("/{peer_id}", operation_id="get_peer", responses=NOT_FOUND)
async def get_peer(peer_id: PeerId, gateway: GatewayDep) -> PeerOut:
    """One peer, with its history position and subscriber count."""
    return PeerOut.model_validate(gateway.peer(peer_id))


@router.put(
    "/{peer_id}",
    operation_id="put_peer",
    responses={
        200: {"model": PeerOut, "description": "updated"},
        201: {"model": PeerOut, "description": "registered"},
        **UNREADABLE_BODY,
        **RESERVED,
    },
)
async def put_peer(
    peer_id: PeerId, body: PeerIn, gateway: GatewayDep, response: Response
) -> PeerOut:
    """Register a peer, or update it (idempotent). It survives a restart."""
    settings = PeerSettings(
        description=body.description,
        reply=ReplyMode(body.reply),
        reply_timeout=body.reply_timeout,
        history=body.history,
        history_max_age=body.history_max_age,
        history_bytes=body.history_bytes,
    )
    peer, created = gateway.put_peer(peer_id, settings)
    response.status_code = 201 if created else 200
    return PeerOut.model_validate(peer)


@router.delete("/{peer_id}", status_code=204, operation_id="delete_peer", responses=NOT_FOUND)
async def delete_peer(peer_id: PeerId, gateway: GatewayDep) -> Response:
    """Unregister a peer: KDMQ for it gets 404 again (a message still waiting for a
    subscriber's reply is answered 404 at once), its subscribers are closed."""
    gateway.delete_peer(peer_id)
    return Response(status_code=204)


def content_type_of(header: str | None) -> str:
    """The KDMQ Content-Type for a request's ``Content-Type`` header; a form encoding
    is refused with 415 (shared with :mod:`app.api.routes.fastpath`)."""
    content_type = header or DEFAULT_CONTENT_TYPE
    if content_type.split(";", 1)[0].strip().lower() in FORM_TYPES:
        raise ProblemError(
            415,
            f"a {content_type.split(';', 1)[0]} body is a form encoding, never sent as a "
            "KDMQ body: set the body's Content-Type (curl -H 'content-type: "
            "application/json' ...)",
        )
    return content_type


async def _body(request: Request) -> tuple[bytes, str]:
    content_type = content_type_of(request.headers.get("content-type"))
    return await request.body(), content_type


def outcome_out(outcome: NodeOutcome) -> NodeResultOut:
    body: str | None = None
    encoding: Literal["base64"] | None = None
    if outcome.body:
        try:
            body = outcome.body.decode("utf-8")
        except UnicodeDecodeError:
            body = base64.b64encode(outcome.body).decode("ascii")
            encoding = "base64"
    timed_out = outcome.timed_out
    reason = outcome.reason
    if reason is None and timed_out:
        reason = "Request Timeout"
    return NodeResultOut(
        node=outcome.node,
        code=outcome.code,
        reason=reason,
        content_type=outcome.content_type,
        body=body,
        encoding=encoding,
        timeout=timed_out,
        outcome=outcome.outcome,  # type: ignore[arg-type]
    )


def answer(dispatch: Dispatch) -> tuple[SendAccepted | SendResults, int]:
    """The answer to a broadcast or send, and its status (202 at once, 200 with every
    node's result)."""
    if dispatch.outcomes is None:
        accepted = SendAccepted(
            id=dispatch.id,
            peer=dispatch.peer,
            targets=len(dispatch.targets),
            nodes=list(dispatch.targets),
        )
        return accepted, 202
    results = SendResults(
        id=dispatch.id,
        peer=dispatch.peer,
        targets=len(dispatch.targets),
        results=[outcome_out(outcome) for outcome in dispatch.outcomes],
    )
    return results, 200


def _answer(dispatch: Dispatch, response: Response) -> SendAccepted | SendResults:
    model, response.status_code = answer(dispatch)
    return model


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
    413: {"model": Problem, "description": "the body is too large for the transport"},
    415: {"model": Problem, "description": "a form-encoded body: set a Content-Type"},
    503: {"model": Problem, "description": "the gateway is stopping"},
    **RESERVED,
}


@router.post(
    "/{peer_id}/broadcast",
    operation_id="broadcast",
    responses=SEND_RESPONSES,
    openapi_extra=RAW_BODY,
    response_model=None,
)
async def broadcast(
    peer_id: PeerId,
    request: Request,
    response: Response,
    gateway: GatewayDep,
    wait: WaitQuery = False,
    timeout: TimeoutQuery = None,
) -> SendAccepted | SendResults:
    """Send the request body to this peer on every active node but this one."""
    body, content_type = await _body(request)
    dispatch = await gateway.broadcast(peer_id, body, content_type, wait=wait, timeout=timeout)
    return _answer(dispatch, response)


@router.post(
    "/{peer_id}/send",
    operation_id="send",
    responses={**SEND_RESPONSES, 404: {"model": Problem, "description": "no such node"}},
    openapi_extra=RAW_BODY,
    response_model=None,
)
async def send(
    peer_id: PeerId,
    request: Request,
    response: Response,
    gateway: GatewayDep,
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
    body, content_type = await _body(request)
    dispatch = await gateway.send(peer_id, node, body, content_type, wait=wait, timeout=timeout)
    return _answer(dispatch, response)
