"""A raw ASGI path for ``POST /v1/peers/{peer_id}/broadcast`` and ``/send``.

These two routes carry the bus's traffic: every message published over HTTP is one of
them. Through FastAPI each costs routing, dependency injection (``solve_dependencies``
alone was over a quarter of the CPU of a POST), a Request and a Response object and
response validation: three times the DMQ send itself. :class:`MessageFastPath` answers
the common request, one whose query parameters are plainly valid, itself, with the same
status, headers and bytes the routed endpoint gives (``tests/ingress`` compares both
for every status); anything else (a query that needs FastAPI's validation to be refused
with its exact 422, another method) goes on to the routed app, which stays the one that
is documented in the OpenAPI document.

It sits inside :class:`~app.api.guard.GuardMiddleware`, so the token and the body's
size are checked before it reads a byte, exactly as for the routed endpoint.

:class:`MessageFront` puts the same guard and fast path in front of the whole FastAPI
application (``serve`` runs it so): FastAPI's own layers (its error, telemetry and
body-limit middleware, Starlette's exception middleware) cost a tenth of the CPU of a
fast-path POST and do nothing for it. A request the fast path leaves to FastAPI goes
through them, and through the inner guard, as before.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api import problems
from app.api.guard import GuardMiddleware
from app.api.routes.peers import answer, content_type_of
from app.dmq.errors import DmqUsageError
from app.gateway.errors import GatewayError
from app.gateway.models import Dispatch
from app.gateway.service import Gateway

_MESSAGE_PATH = re.compile(r"/v1/peers/([^/]+)/(broadcast|send)")
#: What pydantic's lax bool takes, lower-cased: anything else goes to the routed app
#: for its 422.
_BOOLS = {
    "true": True, "1": True, "yes": True, "on": True, "t": True, "y": True,
    "false": False, "0": False, "no": False, "off": False, "f": False, "n": False,
}  # fmt: skip
#: A timeout the fast path parses itself; any other spelling goes to the routed app.
_PLAIN_NUMBER = re.compile(r"[0-9]{1,3}(\.[0-9]{1,9})?")


class _Delegate(Exception):
    """The request is not one the fast path answers: the routed app does."""


def _query(scope: Scope, send_route: bool) -> tuple[bool, float | None, str | None]:
    """``(wait, timeout, node)``, as the routed endpoint would validate them, or
    :class:`_Delegate` when only FastAPI's validation can say how they are wrong."""
    raw: bytes = scope.get("query_string", b"")
    values: dict[str, str] = {}
    if raw:
        # Starlette keeps the last of repeated parameters for a single value.
        values = dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))
    wait = False
    text = values.get("wait")
    if text is not None:
        parsed = _BOOLS.get(text.lower())
        if parsed is None:
            raise _Delegate
        wait = parsed
    timeout: float | None = None
    text = values.get("timeout")
    if text is not None:
        if not _PLAIN_NUMBER.fullmatch(text):
            raise _Delegate
        timeout = float(text)
        if not (0 < timeout <= 300 and math.isfinite(timeout)):
            raise _Delegate
    node = values.get("node")
    if send_route and (node is None or not 5 <= len(node) <= 512):
        raise _Delegate
    return wait, timeout, node


class MessageFastPath:
    """ASGI middleware answering broadcast and send POSTs without FastAPI's router."""

    def __init__(self, app: ASGIApp, owner: Starlette | None = None) -> None:
        self.app = app
        #: The application whose state holds the gateway; inside it, ``scope["app"]``.
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _MESSAGE_PATH.fullmatch(scope["path"])
            if match is not None:
                try:
                    query = _query(scope, match.group(2) == "send")
                except _Delegate:
                    pass
                else:
                    await self._message(scope, receive, send, match.group(1), *query)
                    return
        await self.app(scope, receive, send)

    async def _message(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        peer_id: str,
        wait: bool,
        timeout: float | None,
        node: str | None,
    ) -> None:
        gateway: Gateway = (self.owner or scope["app"]).state.gateway
        header = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                header = value.decode("latin-1")
                break
        try:
            content_type = content_type_of(header)
            body = await _read_body(receive)
            if body is None:
                return  # the client is gone, or the guard refused the body with 413
            dispatch: Dispatch
            if node is None:
                dispatch = await gateway.broadcast(
                    peer_id, body, content_type, wait=wait, timeout=timeout
                )
            else:
                dispatch = await gateway.send(
                    peer_id, node, body, content_type, wait=wait, timeout=timeout
                )
        except problems.ProblemError as exc:
            response = problems.problem(
                Request(scope), exc.status, exc.detail, type_=exc.type, headers=exc.headers
            )
        except (GatewayError, DmqUsageError) as exc:
            response = problems.problem(Request(scope), getattr(exc, "status_hint", 500), str(exc))
        except sqlite3.Error as exc:
            response = problems.store_failed(Request(scope), exc)
        else:
            if dispatch.outcomes is None:
                await _accepted(send, dispatch)
                return
            model, status = answer(dispatch)
            response = JSONResponse(model.model_dump(mode="json"), status_code=status)
        await response(scope, receive, send)


class MessageFront:
    """Broadcast and send POSTs to the guard and the fast path before FastAPI; every
    other request straight to FastAPI.

    The guard is the application's (same tokens, limits and refusal counters), so a
    request is refused, counted and answered exactly as inside FastAPI; one the fast
    path leaves to FastAPI meets the inner guard too, which finds nothing more to
    refuse (its body stream is the outer guard's, already bounded at the same limit).
    """

    def __init__(self, app: ASGIApp, owner: Starlette) -> None:
        """``owner`` is the FastAPI application (its state holds the gateway and the
        guard's settings), ``app`` what every other request goes to: the owner, or a
        wrapper of it."""
        self.app = app
        state = owner.state
        self.guarded = GuardMiddleware(
            MessageFastPath(owner, owner=owner),
            tokens=state.api_tokens,
            # Only GET /v1/health can be public, never one of these POSTs.
            public_health=False,
            limits=state.limits.api,
            stats=state.guard_stats,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and _MESSAGE_PATH.fullmatch(scope["path"]) is not None
        ):
            await self.guarded(scope, receive, send)
            return
        await self.app(scope, receive, send)


#: How ``json.dumps(..., ensure_ascii=False)`` (JSONResponse's rendering) writes a
#: string: the same C encoder, called directly.
_string = json.encoder.encode_basestring


async def _accepted(send: Send, dispatch: Dispatch) -> None:
    """The 202 answer, rendered as the routed endpoint's JSONResponse renders
    SendAccepted (the same bytes and headers) without building the model or a dict for
    the JSON encoder: the common answer of the fast path. ``test_fastpath`` compares
    the bytes with the router's for ids, peers and nodes that need escaping."""
    targets = dispatch.targets
    body = (
        f'{{"id":{_string(dispatch.id)},"peer":{_string(dispatch.peer)},'
        f'"targets":{len(targets)},"nodes":[{",".join(map(_string, targets))}]}}'
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 202,
            "headers": [
                (b"content-length", str(len(body)).encode("latin-1")),
                (b"content-type", b"application/json"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
