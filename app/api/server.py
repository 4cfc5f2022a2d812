"""Runs a gateway: the DMQ node and its HTTP API under uvicorn, until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import resource
import socket
import time
from collections.abc import Callable
from typing import cast

import uvicorn
from fastapi import FastAPI

from app.api.app import create_app
from app.api.guard import guarded_http_protocol
from app.api.limits import GuardStats, ServeLimits
from app.api.routes.fastpath import MessageFront
from app.api.routes.subscribe import SubscribeFastPath
from app.api.wsproto import CoalescingWebSocketProtocol
from app.dmq.errors import ConfigError
from app.dmq.sip import SipUri
from app.gateway.config import GatewayConfig
from app.transport import tls

log = logging.getLogger("dmq")


def run(settings: GatewayConfig, limits: ServeLimits | None = None) -> None:
    """Run the gateway in a new event loop (uvloop when installed) until it stops."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(serve(settings, limits))


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def serve(settings: GatewayConfig, limits: ServeLimits | None = None) -> None:
    """Run the node and its HTTP API until SIGINT/SIGTERM, then leave the bus gracefully."""
    limits = limits or ServeLimits()
    api = limits.api
    app = create_app(settings, limits)
    stats: GuardStats = app.state.guard_stats
    install_token_redaction()
    _raise_descriptor_limit(api.max_connections + limits.transport.max_connections)
    # Bind (or test) every port before anything starts, so that a port in use stops
    # the gateway with one sentence instead of a traceback from inside the lifespan.
    http_socket = _listen_socket(settings.http_host, settings.http_port, "--http")
    _check_sip_ports(settings.node.server_address)
    config = HardenedConfig(
        MessageFront(SubscribeFastPath(app), app),
        host=settings.http_host,
        port=settings.http_port,
        loop="none",
        # uvicorn's "websockets-sansio", writing the frames of one loop turn at once.
        ws=CoalescingWebSocketProtocol,
        # permessage-deflate keeps two zlib contexts per connection (about 45 KB) and
        # costs a third of the CPU per delivered frame: off unless asked for.
        ws_per_message_deflate=settings.ws_deflate,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=3,
        # Bounds (see app.api.guard): connections held at once, the request head's
        # size and time, idle keep-alive connections, WebSocket frames.
        http=guarded_http_protocol(api, stats),
        limit_concurrency=api.max_connections + 1,
        # uvicorn hands it to call_later, which takes fractions of a second too.
        timeout_keep_alive=cast(int, api.keep_alive_timeout),
        h11_max_incomplete_event_size=api.max_head,
        ws_max_size=api.ws_max_frame,
        # HTTPS and WSS through uvicorn's own TLS (--http-tls-cert, --http-tls-key,
        # and client certificates with --http-tls-ca).
        **(limits.http_tls.uvicorn_options() if limits.http_tls is not None else {}),
    )
    server = GatewayServer(config, app)
    started = time.monotonic()
    await server.serve(sockets=[http_socket])
    if server.started:
        log.info("stopped after %.0f s", time.monotonic() - started)
    elif not server.should_exit:
        raise ConfigError(
            f"--server-address {settings.node.server_address}: the node could not start "
            "(see the log above)"
        )


class HardenedConfig(uvicorn.Config):
    """uvicorn's configuration, with the API's HTTPS context held to the bus's TLS
    defaults (:func:`app.transport.tls.harden`: TLS 1.2 at least, no compression, no
    renegotiation). uvicorn builds the context from file names and offers no minimum
    version of its own; it is set here, once the context exists, on any uvicorn."""

    def load(self) -> None:
        super().load()
        context = getattr(self, "ssl", None)
        if context is not None:
            tls.harden(context)


#: ``token=VALUE`` in a logged URL (a WebSocket's query string).
_TOKEN_IN_URL = re.compile(r"(?i)((?:^|[?&;\s])(?:access_)?token=)[^&\s\"']*")


class RedactTokens(logging.Filter):
    """Masks ``token=...`` in the lines of uvicorn's loggers: its WebSocket lines
    (``"WebSocket /v1/peers/p/subscribe?token=..." [accepted]``) carry the query string."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:
            return True
        if "token=" in text.lower():
            record.msg = _TOKEN_IN_URL.sub(r"\1***", text)
            record.args = None
        return True


def install_token_redaction() -> None:
    """No API token reaches the log through uvicorn's lines (its access log is off)."""
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())


#: Seconds the subscriptions get to close themselves when the gateway stops.
STOP_GRACE = 0.5


class GatewayServer(uvicorn.Server):
    """uvicorn, telling the gateway the moment a stop begins.

    uvicorn waits for the requests in flight (up to ``timeout_graceful_shutdown``)
    before it runs the application's shutdown, and a ``?wait=true`` broadcast can wait
    for Timer F: so the gateway is told first, answers those requests 503 and closes its
    subscriptions with 1012, and the wait for requests in flight is short.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.gateway_app = app

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.config.host, self.config.port
            shown = f"[{host}]" if ":" in host else host
            log.info("API on http://%s:%d (docs at /docs)", shown, port)
            freeze_startup_objects()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        gateway = getattr(self.gateway_app.state, "gateway", None)
        if gateway is not None:
            gateway.begin_stop()
            # Let the subscriptions send their own close (1012 with since=N) and the
            # answered requests go out before uvicorn closes the connections.
            await gateway.subscriptions_ended(STOP_GRACE)
            await asyncio.sleep(0.01)
        await super().shutdown(sockets)


def freeze_startup_objects() -> None:
    """Move everything alive after start-up (modules, the app, its routes, the node:
    some 70 000 objects) out of the cyclic collector's reach.

    They live as long as the process, yet every full (generation 2) collection would
    walk them again, a pause of tens of milliseconds in the middle of the traffic that
    frees nothing. Garbage from start-up is collected first, so none is kept forever.
    """
    gc.collect()
    gc.freeze()


#: Descriptors kept for what is not a connection (sockets, state files, DNS, logs).
DESCRIPTOR_MARGIN = 256


def _raise_descriptor_limit(connections: int) -> None:
    """Make room for every connection the caps allow: the soft descriptor limit is
    often 1024, below the caps' defaults, while the hard one is far higher. When even
    the hard limit is too low, say so: the caps would not protect the descriptors."""
    needed = connections + DESCRIPTOR_MARGIN
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the descriptor limit: %s", exc)
        return
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "the descriptor limit (%d) is below what --http-max-connections and "
            "--tcp-max-connections allow (%d, plus %d): lower them, or raise the limit",
            soft,
            connections,
            DESCRIPTOR_MARGIN,
        )


def _listen_socket(host: str, port: int, flag: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP stated explicitly: asyncio's default loop turns Nagle off on an
    # accepted socket only when its proto says TCP, and an accepted socket inherits
    # the listener's 0. With Nagle on, a response written in two pieces (head, then
    # body) waits for the client's delayed ACK, some 40 ms. TCP_NODELAY on the listener
    # is inherited by every accepted socket (Linux), on any event loop.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{flag} {host}:{port}: cannot listen ({exc.strerror})") from None
    return sock


def _check_sip_ports(address: SipUri) -> None:
    """The node listens on UDP and TCP at its server address: both must be free."""
    try:
        host = socket.getaddrinfo(address.host, None)[0][4][0]
    except OSError as exc:
        raise ConfigError(f"--server-address {address}: cannot resolve ({exc})") from None
    family = socket.AF_INET6 if ":" in str(host) else socket.AF_INET
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(family, kind) as probe:
            if kind == socket.SOCK_STREAM:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, address.effective_port))
            except OSError as exc:
                proto = "udp" if kind == socket.SOCK_DGRAM else "tcp"
                raise ConfigError(
                    f"--server-address {address}: cannot listen on {proto} port "
                    f"{address.effective_port} ({exc.strerror})"
                ) from None
