"""The frames of a mirror's change stream (``GET /v1/htable/{table}/changes`` and the
other mirrors' ``.../changes``).

The stream opens with the peers' own ``subscribed`` frame (:class:`SubscribedFrame`,
``peer`` naming the stream, e.g. ``htable/ht``), then a resume ``gap`` frame
(:class:`GapFrame`) when the client asks for more than is held, then one
:class:`ChangeFrame` per change of the mirror. The offsets, the epoch and the resume
rules are those of ``GET /v1/peers/{peer_id}/subscribe``, so one client library reads
both.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from app.gateway.frames import ErrorFrame, GapFrame, SubscribedFrame, _Frame

__all__ = ["ChangeFrame", "ErrorFrame", "GapFrame", "SubscribedFrame"]


class ChangeFrame(_Frame):
    """Server -> client: one change of a mirror's state (an htable key set, deleted or
    expired; a registration; a dialog's state), in the order the mirror applied them."""

    type: Literal["change"]
    offset: int = Field(description="the change's offset in the stream (1, 2, ...)")
    epoch: str = Field(description="the stream's epoch; offsets count within it")
    stream: str = Field(description="the stream's name, e.g. htable/ht")
    event: str = Field(
        description="what happened: htable set, delete, expire, flush (a sync replaced "
        "the table); each mirror documents its events"
    )
    key: str | None = Field(
        description="what changed: the htable key, the contact's ruid, the dialog id; "
        "null for an event about the whole stream"
    )
    data: dict[str, Any] | None = Field(
        default=None,
        description="the new state (htable: value, type, expires), or null when it is gone",
    )
    from_: str | None = Field(
        default=None,
        alias="from",
        description="the SIP URI of the node whose message caused the change; null for "
        "a change the gateway made itself (a local expiry, its own PUT)",
    )
    at: float = Field(description="Unix time the mirror applied the change")
