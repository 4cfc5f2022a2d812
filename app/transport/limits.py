"""The driver's bounds on what the network may make it hold, and a log that is rate-limited
per source.

Every resource an outside party can make the driver spend is bounded here: TCP
connections (in all, and from one source address), the bytes of one message's header
section and of one message, the time a connection may sit idle or take to deliver a
message it started, the bytes queued for a peer that does not read, and the host name
look-ups in flight. Each refusal is counted in :class:`~app.transport.server.TransportStats`
and logged through :class:`RateLimitedLog`, at most once per source and interval.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from app.dmq.cache import BoundedCache
from app.dmq.errors import ConfigError

#: The largest message taken from a source outside the trusted networks: it can only
#: be answered 403, so there is no reason to buffer a large body for it.
UNTRUSTED_MAX_MESSAGE = 65_535

#: Sources whose last log line is remembered (the rest are forgotten oldest first).
LOG_SOURCES = 4096


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """Bounds of :class:`~app.transport.server.DmqServer`; the defaults are those of
    ``dmq-gateway serve``."""

    #: Inbound TCP connections held at once; one more is closed as soon as it is accepted.
    max_connections: int = 256
    #: Inbound TCP connections held at once from one source address.
    max_connections_per_source: int = 32
    #: Seconds a TCP connection may go without receiving a byte before it is closed.
    idle_timeout: float = 120.0
    #: Seconds a message may take to arrive in full once its first byte has.
    message_timeout: float = 10.0
    #: Largest SIP header section (start line and headers) accepted on a stream.
    max_head: int = 16_384
    #: Bytes queued for a peer above which its connection stops being read (its
    #: requests wait in the kernel until it reads our responses).
    write_high_water: int = 262_144
    #: Bytes of incomplete messages held by all TCP connections together; the
    #: connection whose bytes go over it is closed.
    max_buffered: int = 67_108_864
    #: Host name look-ups in flight at once; more are treated as failed for now.
    max_dns_lookups: int = 64
    #: Seconds one host name look-up may take before it counts as failed.
    dns_timeout: float = 5.0
    #: Seconds a failed look-up is remembered: the name is not asked about again
    #: meanwhile (a node list naming a host that does not resolve comes with every ping).
    dns_negative_ttl: float = 30.0
    #: Seconds between two log lines of one kind about one source.
    log_interval: float = 10.0

    def __post_init__(self) -> None:
        for name in (
            "max_connections",
            "max_connections_per_source",
            "max_head",
            "write_high_water",
            "max_buffered",
            "max_dns_lookups",
        ):
            if getattr(self, name) < 1:
                raise ConfigError("must be at least 1", field=name, value=getattr(self, name))
        for name in (
            "idle_timeout",
            "message_timeout",
            "dns_timeout",
            "dns_negative_ttl",
            "log_interval",
        ):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError("must be a positive number of seconds", field=name, value=value)


class RateLimitedLog:
    """Log lines about a source, at most one per source and kind per ``interval``.

    A source that misbehaves thousands of times a second costs one line per interval;
    the next line says how many were left out. Memory is bounded: the last
    :data:`LOG_SOURCES` (source, kind) pairs are remembered.
    """

    def __init__(self, logger: logging.Logger, interval: float, clock: Callable[[], float]) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        #: (source, kind) -> (time of the last line, lines left out since).
        self._last: BoundedCache[tuple[str, str], tuple[float, int]] = BoundedCache(LOG_SOURCES)
        #: Lines left out in all, for the metrics.
        self.suppressed = 0

    def log(self, level: int, source: str, kind: str, message: str, *args: object) -> bool:
        """Log ``message % args`` unless a line of this kind about ``source`` was
        logged within the interval; True when it was logged."""
        now = self._clock()
        key = (source, kind)
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            self.suppressed += 1
            return False
        left_out = last[1] if last is not None else 0
        self._last.put(key, (now, 0))
        if left_out:
            message += " (%d more like it from this source left out of the log)"
            args = (*args, left_out)
        self.logger.log(level, message, *args)
        return True
