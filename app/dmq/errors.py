"""Errors the DMQ core raises to its caller.

Two families, as in h11:

* :class:`DmqUsageError` and its subclasses are *local* errors: the code driving the
  node asked for something impossible (send to a node that is not in the list, register
  the reserved notification peer, a body too large for the transport). They are raised
  to the caller, whose job is to turn them into a clear answer (the HTTP API makes them
  4xx problems).
* What a *remote* node sends wrong never raises: a malformed SIP message becomes a
  :class:`~app.dmq.sip.SipParseError` inside the core, which answers it (400, 403, 404,
  405, 413, 505) or drops and counts it, and the node carries on.

Bad configuration raises :class:`ConfigError` with one sentence naming the option.
"""

from __future__ import annotations


class DmqError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(DmqError, ValueError):
    """A setting is invalid.

    ``field`` names the setting as the code knows it (``ping_interval``, ``t1``) and
    ``reason`` says why in one sentence; the command line turns the field into the
    option a user typed (``--ping-interval``). Without a field, the message stands alone.
    """

    def __init__(self, reason: str, *, field: str | None = None, value: object = None):
        self.reason = reason
        self.field = field
        self.value = value
        if field is None:
            super().__init__(reason)
        elif value is None:
            super().__init__(f"{field}: {reason}")
        else:
            shown = repr(value) if isinstance(value, str) else str(value)
            super().__init__(f"{field} {shown}: {reason}")


class DmqUsageError(DmqError):
    """The caller asked the node for something it cannot do.

    ``status_hint`` is the HTTP status that fits when the request came from an API
    client (the way h11 gives each protocol error a status hint); the core itself
    never speaks HTTP.
    """

    status_hint = 400


class UnknownNodeError(DmqUsageError, LookupError):
    """The node named is not in the node list."""

    status_hint = 404


class UnknownPeerError(DmqUsageError, LookupError):
    """No peer is registered under that peer id."""

    status_hint = 404


class InvalidPeerIdError(DmqUsageError):
    """A peer id must be a SIP user name (1-128 unreserved characters)."""

    status_hint = 422


class ReservedPeerError(DmqUsageError):
    """The notification channel belongs to membership and can't be used as a peer."""

    status_hint = 409


class InvalidReplyTimeoutError(DmqUsageError):
    """A peer's reply timeout the node cannot honour (not positive, or longer than
    Timer F, after which the sender has given up)."""

    status_hint = 422


class ReplyNotPendingError(DmqUsageError):
    """A reply for a message that no longer waits for one: already answered (a 408
    after its reply timeout, a 404 when its peer was unregistered...) or never known."""

    status_hint = 409


class InvalidHeaderError(DmqUsageError):
    """An extra header for a KDMQ request that cannot go on the wire as given: a name
    that is not a SIP token, a header the node writes itself, or a value that is not a
    single line of text."""

    status_hint = 422


class NodeListFullError(DmqUsageError):
    """The node list holds ``max_nodes`` nodes already."""

    status_hint = 507


class MessageTooLargeError(DmqUsageError):
    """The message would not fit the transport (a UDP datagram, or the TCP limit)."""

    status_hint = 413


class NodeStoppedError(DmqUsageError):
    """The node has left the bus (or is leaving it) and sends nothing more."""

    status_hint = 503
