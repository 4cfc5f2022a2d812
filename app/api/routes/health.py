from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter

from app import __version__
from app.api.deps import GatewayDep
from app.api.schemas import Health

router = APIRouter(prefix="/v1/health", tags=["health"])


@router.get("", operation_id="get_health")
async def get_health(gateway: GatewayDep) -> Health:
    """This node's address, status, uptime and number of active nodes."""
    return Health(**asdict(gateway.health()), version=__version__)
