"""Dependencies shared by the routes: the gateway, and bearer-token authentication."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.problems import ProblemError
from app.gateway.service import Gateway

bearer = HTTPBearer(auto_error=False, description="an API token given to --api-token")


def token_ok(tokens: tuple[str, ...], presented: str | None) -> bool:
    """True when no token is configured, or ``presented`` is one of them."""
    if not tokens:
        return True
    if not presented:
        return False
    # compare_digest against every token: the time taken says nothing about which.
    matches = [secrets.compare_digest(presented.encode(), t.encode()) for t in tokens]
    return any(matches)


async def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    tokens: tuple[str, ...] = request.app.state.api_tokens
    if not tokens:
        return
    if credentials is None:
        raise ProblemError(
            401,
            "this gateway needs an API token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if credentials.scheme.lower() != "bearer" or not token_ok(tokens, credentials.credentials):
        raise ProblemError(
            401, "the API token is not valid", headers={"WWW-Authenticate": "Bearer"}
        )


async def get_gateway(request: Request) -> Gateway:
    # async on purpose: FastAPI runs a plain def dependency in a worker thread, and the
    # thread hop cost more than the rest of a broadcast request.
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
