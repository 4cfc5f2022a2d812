"""The API's bounds: what an HTTP or WebSocket client may make the gateway hold.

Two layers, each refusing as early as it can:

- :func:`guarded_http_protocol` is uvicorn's httptools protocol with what uvicorn lacks:
  a cap on connections held at once (one more is closed on accept, before it costs
  more than a descriptor for a moment), a time-out on the request head (slowloris), and
  a cap on the bytes of the request line and headers (431). uvicorn's own
  ``timeout_keep_alive`` closes connections idle between requests.
- :class:`GuardMiddleware`, a pure ASGI middleware in front of FastAPI, checks the API
  token and the body's size *before* any route reads the body: a request without a
  valid token is 401 on its headers alone, and a body larger than its route accepts
  is 413 as soon as ``Content-Length`` says so, or as soon as the stream exceeds it.

Every refusal is counted in :class:`GuardStats` (``app.state.guard_stats``).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import fields
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.api import problems
from app.api.deps import token_ok
from app.api.limits import ApiLimits, GuardStats

log = logging.getLogger("dmq.api")


_STATUS_LINES = {
    408: b"HTTP/1.1 408 Request Timeout\r\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
}


def guarded_http_protocol(limits: ApiLimits, stats: GuardStats) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a connection cap, a head time-out and a head
    size cap (give it to ``uvicorn.Config(http=...)``)."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0
        _reading_head = True
        _refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            over = len(self.connections) >= limits.max_connections
            super().connection_made(transport)
            if over:
                # Closed before reading a byte: a flood of connections costs each one
                # a descriptor for a moment only.
                stats.http_connections_refused += 1
                self._refused = True
                transport.abort()
                return
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._reading_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._reading_head and self._head_bytes > limits.max_head:
                # httptools hands the head over piece by piece and uvicorn keeps every
                # piece: stop before it holds more than the cap.
                stats.http_headers_too_large += 1
                self._refuse(431, f"request line and headers exceed {limits.max_head} bytes")
            elif self._reading_head and self._head_bytes:
                # A head still incomplete after this read: its time-out runs from its
                # first piece (armed once). A head that came whole, the usual request,
                # costs no timer at all.
                self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self._reading_head = False
            self._cancel_head_timer()
            before = self.cycle
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is not before and cycle is not None:
                cycle.transport = _HeadWithBody(self.transport, self.loop)  # type: ignore[assignment]

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._reading_head = True
            self._head_bytes = 0

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(limits.header_timeout, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._reading_head and self._head_bytes and not self.transport.is_closing():
                stats.http_header_timeouts += 1
                self._refuse(408, f"the request head took over {limits.header_timeout:g} s")
            elif self._reading_head and not self.transport.is_closing():
                # Nothing sent at all, or nothing since the last response: close
                # quietly (uvicorn's keep-alive time-out usually comes first).
                stats.http_header_timeouts += 1
                self.transport.close()

        def _refuse(self, status: int, detail: str) -> None:
            self._refused = True
            self._cancel_head_timer()
            body = detail.encode()
            self.transport.write(
                _STATUS_LINES[status]
                + b"content-type: text/plain; charset=utf-8\r\n"
                + b"content-length: "
                + str(len(body)).encode()
                + b"\r\nconnection: close\r\n\r\n"
                + body
            )
            self.transport.close()

    return GuardedHttpToolsProtocol


class _HeadWithBody:
    """One response's transport: its head leaves with its body, in one write.

    uvicorn writes a response's status line and headers when the app starts the
    response, and the body when the app sends it: two ``send`` system calls, and two
    TCP segments, for a response that is nearly always started and finished in the same
    loop turn. The head is held until the body's first write and leaves with it; what
    is held at the end of the turn (a streamed response whose body comes later, a
    ``100 Continue``) leaves then, so no client waits longer for anything. Everything
    but ``write`` and ``close`` is the connection's own transport.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif self._loop is not None:
            # Only the response's first write is held (one loop callback per response).
            self._held = bytes(data)
            self._loop.call_soon(self._release)
            self._loop = None  # type: ignore[assignment]
        else:
            self._transport.write(data)

    def _release(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        self._release()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


#: Paths open without a token: the documentation pages' static assets (Swagger UI and
#: ReDoc's own scripts, nothing of this gateway's), and the console's page and files
#: (the page asks for the token and sends it with every API call).
_OPEN_PREFIXES = ("/docs-assets/", "/console/")
_OPEN_PATHS = frozenset({"/"})
#: Routes whose bodies go to the bus (one message, or a batch of them): they take
#: ``max_message_body`` bytes, the rest ``max_body``.
_MESSAGE_ROUTE = re.compile(r"/v1/peers/[^/]+/(broadcast|send)(/batch)?")
#: Methods whose requests carry no body a route reads.
_BODYLESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


class GuardMiddleware:
    """Authenticate, and bound the body, before the application reads a byte of it."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        tokens: tuple[str, ...],
        public_health: bool,
        limits: ApiLimits,
        stats: GuardStats,
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.public_health = public_health
        self.limits = limits
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if self.tokens and not self._open(path) and not token_ok(self.tokens, _bearer(scope)):
            self.stats.http_unauthorized += 1
            has_header = any(name == b"authorization" for name, _ in scope["headers"])
            detail = (
                "the API token is not valid"
                if has_header
                else "this gateway needs an API token: send 'Authorization: Bearer <token>'"
            )
            await self._problem(scope, receive, send, 401, detail, {"WWW-Authenticate": "Bearer"})
            return
        if scope["method"] in _BODYLESS:
            await self.app(scope, receive, send)
            return
        limit = (
            self.limits.max_message_body if _MESSAGE_ROUTE.fullmatch(path) else self.limits.max_body
        )
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            self.stats.http_bodies_too_large += 1
            await self._problem(scope, receive, send, 413, _too_large(declared, limit))
            return
        await self._bounded(scope, receive, send, limit)

    def _open(self, path: str) -> bool:
        if path.startswith(_OPEN_PREFIXES) or path in _OPEN_PATHS:
            return True
        return self.public_health and path == "/v1/health"

    async def _bounded(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Run the app with a body stream that stops at ``limit`` bytes: past it the
        client gets 413 and the app sees the client gone."""
        received = 0
        refused = False
        started = False

        async def bounded_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    self.stats.http_bodies_too_large += 1
                    if not started:
                        await self._problem(
                            scope, receive, send, 413, _too_large(received, limit, streamed=True)
                        )
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 is the answer
            started = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # The route saw the client "gone" (Starlette's ClientDisconnect) after the
            # 413 went out: that is the refusal working, not an error to log.
            log.debug("a route stopped reading a body over its limit", exc_info=True)

    async def _problem(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        status: int,
        detail: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        response = problems.problem(Request(scope), status, detail, headers=headers)
        # The rest of the body is not read: the connection can't carry another request.
        response.headers["connection"] = "close"
        await response(scope, receive, send)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isascii() and text.isdigit() else None
    return None


def _too_large(size: int, limit: int, *, streamed: bool = False) -> str:
    said = "the body exceeds" if streamed else f"a body of {size} bytes exceeds"
    return f"{said} the {limit} bytes this route accepts"


def stats_dict(stats: GuardStats) -> dict[str, Any]:
    """The counters by name (for logs and tests)."""
    return {item.name: getattr(stats, item.name) for item in fields(stats)}
