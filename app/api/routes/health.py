from __future__ import annotations

from fastapi import APIRouter

from app import __version__
from app.api.deps import HubDep
from app.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/v1/health", operation_id="get_health")
async def get_health(hub: HubDep) -> Health:
    """This node's address, status, uptime and number of active nodes."""
    server = hub.server
    node = server.node
    uptime = 0.0
    if server.started_at is not None and server.running:
        uptime = server.loop_time() - server.started_at
    return Health(
        node=str(node.nodes.local.uri),
        status="stopping" if node.stopped else "active",
        uptime=round(uptime, 3),
        active_nodes=len(node.nodes.active_others()),
        version=__version__,
    )
