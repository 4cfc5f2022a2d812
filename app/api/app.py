"""Builds the FastAPI application around one :class:`~app.gateway.service.Gateway`;
its lifespan starts and stops the gateway.

``/docs`` and ``/redoc`` load Swagger UI and ReDoc from the gateway itself (the assets
ship in the ``fastapi-offline`` package), so they work on a machine with no internet.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from app import __version__
from app.api import problems
from app.api.asyncapi import asyncapi_document
from app.api.deps import require_token
from app.api.guard import GuardMiddleware
from app.api.limits import GuardStats, ServeLimits
from app.api.routes import (
    dialogs,
    health,
    htable,
    metrics,
    nodes,
    peers,
    publish,
    registrations,
    subscribe,
)
from app.api.routes.console import router as console_router
from app.api.routes.fastpath import MessageFastPath
from app.gateway.config import GatewayConfig
from app.gateway.service import Gateway
from app.kamailio.mirrors import MirrorCollector, attach_mirrors

log = logging.getLogger("dmq.gateway")

#: Where the documentation pages' scripts, stylesheets and icon are served from.
DOCS_ASSETS = "/docs-assets"
ASYNCAPI_PATH = "/asyncapi.json"

DESCRIPTION = f"""\
Take part in a Kamailio DMQ bus over HTTP and WebSocket.

Register a **peer** (a DMQ channel such as `htable`, or your own), broadcast to every
node or send to one with a POST (the body goes out as the KDMQ body, byte for byte),
and subscribe to what arrives for a peer over the WebSocket
`GET /v1/peers/{{peer_id}}/subscribe`, whose frames and close codes are described by the
AsyncAPI document at [{ASYNCAPI_PATH}]({ASYNCAPI_PATH}).
Errors are `application/problem+json` (RFC 9457).
"""


def create_app(config: GatewayConfig, limits: ServeLimits | None = None) -> FastAPI:
    """The API around one gateway; its lifespan starts and stops the gateway.

    ``limits`` bound what clients and other nodes may make it hold (the defaults of
    ``serve`` when not given); refusals are counted in ``app.state.guard_stats`` and
    the driver's ``TransportStats``.
    """
    limits = limits or ServeLimits()
    # The API guard's refusal counters: the guard writes them, /metrics reads them.
    stats = GuardStats()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = Gateway(config)
        # The driver's bounds are set before it starts (Gateway builds the driver from
        # the node's settings alone).
        gateway._server.limits = limits.transport
        app.state.gateway = gateway
        # Kamailio's own peers, typed (--kamailio-mirrors): tapped before the start.
        app.state.mirrors = mirrors = attach_mirrors(gateway, config)
        app.state.metrics = metrics.registry_for(gateway, stats)
        app.state.metrics.register(MirrorCollector(mirrors))
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPIOffline(
        title="dmq-gateway",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        static_url=DOCS_ASSETS,
        openapi_tags=[
            {"name": "health", "description": "Is this node up"},
            {"name": "nodes", "description": "The DMQ node list (dmq.list_nodes/add/remove)"},
            {"name": "peers", "description": "Peers, broadcast and send"},
            {
                "name": "htable",
                "description": "Kamailio's htables: the replica, and writes to every node",
            },
            {
                "name": "registrations",
                "description": "Kamailio's registrations (dmq_usrloc), cluster-wide: the replica",
            },
            {
                "name": "dialogs",
                "description": "Kamailio's dialogs (dialog enable_dmq), cluster-wide: the replica",
            },
            {"name": "metrics", "description": "Prometheus metrics"},
        ],
    )
    app.state.api_tokens = config.api_tokens
    app.state.limits = limits
    app.state.guard_stats = stats
    # Inside the guard (added before it, so it runs after it): broadcast and send
    # POSTs, checked by the guard, are answered without FastAPI's router.
    app.add_middleware(MessageFastPath)
    # Outermost but for the error handler: the token and the body's size are checked
    # before any route (or FastAPI's body parsing) reads a byte of the body.
    app.add_middleware(
        GuardMiddleware,
        tokens=config.api_tokens,
        public_health=config.public_health,
        limits=limits.api,
        stats=stats,
    )
    problems.install(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = publish.document_batch_items(
                problems.document_problems(FastAPI.openapi(app))
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    document = asyncapi_document()

    @app.get(ASYNCAPI_PATH, include_in_schema=False)
    async def get_asyncapi() -> JSONResponse:
        return JSONResponse(document)

    # The console page and its files carry no data of the gateway: open, like the
    # documentation's assets (the page sends the token with each API call it makes).
    app.include_router(console_router)

    secured = [Depends(require_token)]
    app.include_router(health.router, dependencies=[] if config.public_health else secured)
    for module in (nodes, peers, publish, htable, registrations, dialogs, metrics):
        app.include_router(module.router, dependencies=secured)
    app.include_router(subscribe.router)
    app.include_router(publish.ws_router)
    app.include_router(htable.ws_router)
    app.include_router(registrations.ws_router)
    app.include_router(dialogs.ws_router)
    return app
