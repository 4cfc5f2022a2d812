"""Errors the gateway raises to the API and the command line.

Like the core's :class:`~app.dmq.errors.DmqUsageError`, each carries ``status_hint``,
the HTTP status that fits when the request came from an API client, so that one
exception handler turns every refusal into a problem document and no route needs a
``try``/``except`` of its own.
"""

from __future__ import annotations


class GatewayError(Exception):
    """The caller asked the gateway for something it cannot do."""

    status_hint = 400


class PeerNotRegisteredError(GatewayError, LookupError):
    """No peer is registered under that peer id on this gateway."""

    status_hint = 404


class InvalidNodeUriError(GatewayError):
    """A node URI that cannot name a node of the bus (syntax, transport, host)."""

    status_hint = 422


class LocalNodeError(GatewayError):
    """The node named is this gateway's own node, which it cannot add or remove."""

    status_hint = 409
