"""The bounds of ``dmq-gateway serve`` beyond the node's own settings, and the API's
refusal counters: plain values, importable without uvicorn or FastAPI.

:class:`ServeLimits` gathers the driver's :class:`~app.transport.limits.TransportLimits`
and the API's :class:`ApiLimits`; the settings model builds it from the options, and
:func:`app.api.app.create_app` and :func:`app.api.server.serve` apply it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field, fields
from typing import Any

from app.dmq.errors import ConfigError
from app.transport.limits import TransportLimits

#: The smallest byte budget of a WebSocket subscriber: room for a few frames at least.
MIN_WS_QUEUE_BYTES = 1024


@dataclass(frozen=True, slots=True)
class ApiLimits:
    """Bounds of the HTTP and WebSocket API; the defaults are those of ``serve``."""

    #: HTTP and WebSocket connections held at once; one more is closed on accept.
    max_connections: int = 4096
    #: Seconds a client has to send a request's line and headers, from the connection
    #: (or the previous response) on.
    header_timeout: float = 10.0
    #: Seconds a connection may stay idle between two requests.
    keep_alive_timeout: float = 5.0
    #: Largest request line plus headers, in bytes; more is 431.
    max_head: int = 16_384
    #: Largest body of a JSON request (register a peer, add a node); more is 413.
    max_body: int = 65_536
    #: Largest body of a broadcast or send; more is 413 (the KDMQ message must fit the
    #: transport, which the node checks exactly).
    max_message_body: int = 1_048_576
    #: Largest WebSocket frame (or message) a client may send; more closes with 1009.
    ws_max_frame: int = 65_536
    #: Frames per second a WebSocket client may send (a burst of as many is allowed);
    #: more closes the connection with 1008.
    ws_frames_per_second: float = 100.0
    #: Bytes of frames queued for one WebSocket subscriber (a replay page, or the live
    #: backlog of a client that reads slowly); a live backlog over it closes with 4008.
    ws_queue_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not value > 0:
                raise ConfigError("must be positive", field=item.name, value=value)
        if self.ws_queue_bytes < MIN_WS_QUEUE_BYTES:
            raise ConfigError(
                f"must be at least {MIN_WS_QUEUE_BYTES} bytes",
                field="ws_queue_bytes",
                value=self.ws_queue_bytes,
            )


@dataclass(slots=True)
class GuardStats:
    """Refusals of the API's bounds, for the metrics."""

    #: Connections closed on accept: ``max_connections`` were open.
    http_connections_refused: int = 0
    #: Connections closed because the request head took over ``header_timeout``.
    http_header_timeouts: int = 0
    #: Requests refused 431: the request line and headers exceeded ``max_head``.
    http_headers_too_large: int = 0
    #: Requests refused 401 before their body was read.
    http_unauthorized: int = 0
    #: Requests refused 413 (by Content-Length, or as the body streamed in).
    http_bodies_too_large: int = 0
    #: WebSocket connections closed for sending frames faster than allowed.
    ws_rate_limited: int = 0


@dataclass(frozen=True, slots=True)
class HttpTls:
    """The API's HTTPS (and WSS): file paths handed to uvicorn's own TLS support."""

    #: PEM certificate chain the API presents.
    cert: str
    #: PEM private key of ``cert``.
    key: str
    #: PEM CA bundle whose client certificates are required; ``None``: none asked.
    ca: str | None = None

    def uvicorn_options(self) -> dict[str, Any]:
        """The keyword arguments of ``uvicorn.Config`` that turn its TLS on."""
        options: dict[str, Any] = {"ssl_certfile": self.cert, "ssl_keyfile": self.key}
        if self.ca is not None:
            options["ssl_ca_certs"] = self.ca
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        return options


@dataclass(frozen=True, slots=True)
class ServeLimits:
    """Every bound of a gateway process: the SIP driver's and the API's, and how the
    API is reached (HTTPS when ``http_tls`` is set)."""

    transport: TransportLimits = field(default_factory=TransportLimits)
    api: ApiLimits = field(default_factory=ApiLimits)
    http_tls: HttpTls | None = None
