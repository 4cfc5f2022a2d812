"""The node list, as Kamailio's dmq.list_nodes / dmq.add / dmq.remove."""

from __future__ import annotations

import ipaddress
import re
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
from app.transport import dns

router = APIRouter(tags=["nodes"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "no such node"}
}
#: FastAPI answers 400 to a JSON body it cannot even decode (not UTF-8, say).
UNREADABLE_BODY: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "the body could not be read as JSON"}
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


#: A label of a host name: letters, digits, '-' and (leniently) '_', at most 63.
_HOST_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_host(host: str) -> bool:
    """An IP address, or a syntactically valid (ASCII) host name."""
    if _ip(host) is not None:
        return True
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in name.split("."))


def parse_node_uri(text: str) -> SipUri:
    try:
        uri = SipUri.parse(text)
    except ValueError as exc:
        raise ProblemError(422, f"uri: {exc}") from None
    if uri.transport not in ("udp", "tcp"):
        raise ProblemError(422, f"uri: transport {uri.transport!r} is not supported (udp, tcp)")
    # Anything else would reach the resolver and the socket layer, which refuse it.
    if not _is_host(uri.host):
        raise ProblemError(422, f"uri: {uri.host!r} is not an IP address or a host name")
    return uri


async def resolve_node_uri(hub: Hub, text: str, *, must_resolve: bool = False) -> SipUri:
    """Parse a node URI and resolve its host name off the event loop.

    The answer is cached where the node looks names up, so the node's own (synchronous)
    look-up does not block the loop. ``must_resolve``: a name without an address, or an
    address this node cannot send to, is a 422 (a node to add must be reachable).
    """
    uri = parse_node_uri(text)
    address = uri.host
    if _ip(uri.host) is None:
        try:
            address = await hub.server.resolve_node(uri)
        except dns.DnsResolutionError:
            if must_resolve:
                raise ProblemError(
                    422, f"uri: {uri.host!r} does not resolve to an address"
                ) from None
            return uri
    if must_resolve:
        local, target = _ip(hub.server.node.nodes.local.resolved_ip), _ip(address)
        if local is not None and target is not None and local.version != target.version:
            raise ProblemError(
                422,
                f"uri: {uri.host} is an IPv{target.version} address, and this node "
                f"listens on IPv{local.version} only",
            )
    return uri


@router.get("/v1/nodes", operation_id="list_nodes")
async def list_nodes(hub: HubDep) -> list[NodeOut]:
    """Every node of the bus as this node sees it, this node first."""
    return [node_out(hub, node) for node in hub.server.node.nodes]


@router.post(
    "/v1/nodes",
    status_code=201,
    operation_id="add_node",
    responses={
        **UNREADABLE_BODY,
        409: {"model": Problem, "description": "the uri is this node itself"},
    },
)
async def add_node(body: NodeIn, hub: HubDep) -> NodeOut:
    """Add a node and send it our node list (it answers with its own)."""
    uri = await resolve_node_uri(hub, body.uri, must_resolve=True)
    if hub.server.node.nodes.is_local(uri):
        raise ProblemError(409, f"{uri} is this node itself")
    return node_out(hub, hub.server.add_node(uri))


@router.delete(
    "/v1/nodes/{uri}",
    status_code=204,
    operation_id="remove_node",
    responses={**NOT_FOUND, 409: {"model": Problem, "description": "this node itself"}},
)
async def remove_node(
    uri: Annotated[
        str,
        Path(description="the node's SIP URI, URL-encoded", examples=["sip:127.0.0.1:5062"]),
    ],
    hub: HubDep,
) -> Response:
    """Remove a node from the list (it comes back if it speaks to us again)."""
    parsed = await resolve_node_uri(hub, uri)
    if hub.server.node.nodes.is_local(parsed):
        raise ProblemError(409, f"{uri} is this node itself; stop the gateway to leave")
    try:
        hub.server.remove_node(parsed)
    except UnknownNodeError as exc:
        raise ProblemError(404, str(exc)) from None
    return Response(status_code=204)
