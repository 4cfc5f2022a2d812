"""The node list, as Kamailio's dmq.list_nodes / dmq.add / dmq.remove."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response

from app.api.deps import HubDep
from app.api.problems import ProblemError
from app.api.schemas import NodeIn, NodeOut, Problem
from app.dmq.errors import UnknownNodeError
from app.dmq.nodes import Node
from app.dmq.sip import SipUri
from app.gateway.hub import Hub

router = APIRouter(tags=["nodes"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "no such node"}
}


def node_out(hub: Hub, node: Node) -> NodeOut:
    last_reply = None
    if node.last_reply is not None and hub.server.running:
        last_reply = round(time.time() - (hub.server.loop_time() - node.last_reply), 3)
    return NodeOut(
        uri=str(node.uri),
        host=node.host,
        port=node.port,
        transport=node.transport,
        status=node.status.value,
        local=node.local,
        last_reply=last_reply,
        failures=node.failures,
    )


def parse_node_uri(text: str) -> SipUri:
    try:
        uri = SipUri.parse(text)
    except ValueError as exc:
        raise ProblemError(422, f"uri: {exc}") from None
    if uri.transport not in ("udp", "tcp"):
        raise ProblemError(422, f"uri: transport {uri.transport!r} is not supported (udp, tcp)")
    return uri


@router.get("/v1/nodes", operation_id="list_nodes")
async def list_nodes(hub: HubDep) -> list[NodeOut]:
    """Every node of the bus as this node sees it, this node first."""
    return [node_out(hub, node) for node in hub.server.node.nodes]


@router.post(
    "/v1/nodes",
    status_code=201,
    operation_id="add_node",
    responses={409: {"model": Problem, "description": "the uri is this node itself"}},
)
async def add_node(body: NodeIn, hub: HubDep) -> NodeOut:
    """Add a node and send it our node list (it answers with its own)."""
    uri = parse_node_uri(body.uri)
    try:
        node = hub.server.add_node(uri)
    except ValueError as exc:
        raise ProblemError(409, str(exc)) from None
    return node_out(hub, node)


@router.delete(
    "/v1/nodes/{uri}",
    status_code=204,
    operation_id="remove_node",
    responses={**NOT_FOUND, 409: {"model": Problem, "description": "this node itself"}},
)
async def remove_node(
    uri: Annotated[str, Path(description="the node's SIP URI, URL-encoded")], hub: HubDep
) -> Response:
    """Remove a node from the list (it comes back if it speaks to us again)."""
    parsed = parse_node_uri(uri)
    if hub.server.node.nodes.is_local(parsed):
        raise ProblemError(409, f"{uri} is this node itself; stop the gateway to leave")
    try:
        hub.server.remove_node(parsed)
    except UnknownNodeError as exc:
        raise ProblemError(404, str(exc)) from None
    return Response(status_code=204)
