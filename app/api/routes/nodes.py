"""The node list, as Kamailio's dmq.list_nodes / dmq.add / dmq.remove."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from app.api.deps import GatewayDep
from app.api.problems import UNREADABLE_BODY
from app.api.schemas import NodeIn, NodeOut, Problem

router = APIRouter(prefix="/v1/nodes", tags=["nodes"])


@router.get("", operation_id="list_nodes")
async def list_nodes(gateway: GatewayDep) -> list[NodeOut]:
    """Every node of the bus as this node sees it, this node first."""
    return [NodeOut.model_validate(node) for node in gateway.nodes()]


@router.post(
    "",
    status_code=201,
    operation_id="add_node",
    responses={
        **UNREADABLE_BODY,
        409: {"model": Problem, "description": "the uri is this node itself"},
    },
)
async def add_node(body: NodeIn, gateway: GatewayDep) -> NodeOut:
    """Add a node and send it our node list (it answers with its own)."""
    return NodeOut.model_validate(await gateway.add_node(body.uri))


@router.delete(
    "/{uri}",
    status_code=204,
    operation_id="remove_node",
    responses={
        404: {"model": Problem, "description": "no such node"},
        409: {"model": Problem, "description": "this node itself"},
    },
)
async def remove_node(
    uri: Annotated[
        str,
        Path(description="the node's SIP URI, URL-encoded", examples=["sip:127.0.0.1:5062"]),
    ],
    gateway: GatewayDep,
) -> Response:
    """Remove a node from the list (it comes back if it speaks to us again)."""
    await gateway.remove_node(uri)
    return Response(status_code=204)
