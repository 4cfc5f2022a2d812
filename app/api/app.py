"""Builds the FastAPI application around a DMQ node; its lifespan starts and stops both."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI

from app import __version__
from app.api import problems
from app.api.deps import require_token
from app.api.routes import health, metrics, nodes, peers, subscribe
from app.gateway.config import GatewayConfig
from app.gateway.hub import Hub
from app.gateway.models import PeerSettings
from app.gateway.store import PeerStore
from app.transport.server import DmqServer

log = logging.getLogger("dmq.gateway")

DESCRIPTION = """\
Take part in a Kamailio DMQ bus over HTTP and WebSocket.

Register a **peer** (a DMQ channel such as `htable`, or your own), broadcast to every
node or send to one with a POST (the body goes out as the KDMQ body, byte for byte),
and subscribe to what arrives for a peer over the WebSocket
`GET /v1/peers/{peer_id}/subscribe` (frames documented in `openapi/websocket.json`).
Errors are `application/problem+json` (RFC 9457).
"""


def create_app(gateway: GatewayConfig) -> FastAPI:
    """The API around one gateway; its lifespan starts and stops the DMQ node."""
    node_config = gateway.node

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server = DmqServer(node_config, drop_rate=gateway.drop_rate)
        store = PeerStore(gateway.state_dir) if gateway.state_dir is not None else None
        hub = Hub(server, store, queue_limit=gateway.queue_limit)
        loaded = hub.load()
        for peer_id in gateway.startup_peers:
            if peer_id not in hub.channels:
                hub.register(
                    peer_id, PeerSettings(description="--peer"), persist=False, ephemeral=True
                )
        app.state.hub = hub
        await server.start()
        log.info("gateway up: %d stored peers, %d from --peer", loaded, len(gateway.startup_peers))
        try:
            yield
        finally:
            for channel in hub.channels.values():
                for subscriber in list(channel.subscribers):
                    subscriber.closed = True
                    subscriber.wakeup.set()
            await server.stop()

    app = FastAPI(
        title="dmq-gateway",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "health", "description": "Is this node up"},
            {"name": "nodes", "description": "The DMQ node list (dmq.list_nodes/add/remove)"},
            {"name": "peers", "description": "Peers, broadcast and send"},
            {"name": "metrics", "description": "Prometheus metrics"},
        ],
    )
    app.state.api_tokens = gateway.api_tokens
    problems.install(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problems.document_problems(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    secured = [Depends(require_token)]
    for module in (health, nodes, peers):
        app.include_router(module.router, dependencies=secured)
    app.include_router(metrics.router, dependencies=secured)
    app.include_router(subscribe.router)
    return app
