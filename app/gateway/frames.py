"""The WebSocket frames of ``GET /v1/peers/{peer_id}/subscribe``.

The gateway builds every frame it sends from these models, and the AsyncAPI document
(``openapi/websocket.json``) is generated from the same models, so the two cannot
drift apart. Client frames are validated with them too.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Frame(BaseModel):
    def text(self) -> str:
        """The frame as one compact JSON text frame; optional fields that were not
        given are left out."""
        return self.model_dump_json(by_alias=True, exclude_unset=True)


class SubscribedFrame(_Frame):
    """Server -> client, always the first frame: where the stream starts."""

    type: Literal["subscribed"]
    peer: str
    epoch: str = Field(description="the peer's history epoch; offsets count within it")
    offset: int = Field(description="the peer's latest offset when the subscription began")
    since: int = Field(
        description="message frames that follow have offsets after this one: the client's "
        "since, or offset when the client did not resume (0 after a gap frame that "
        "restarts the history)"
    )


class MessageFrame(_Frame):
    """Server -> client: one KDMQ message that arrived for the peer."""

    type: Literal["message"]
    offset: int
    epoch: str
    id: str = Field(description="message id; a reply frame names it")
    peer: str
    from_: str = Field(alias="from", description="the sending node's SIP URI")
    content_type: str | None
    body: str = Field(description="the KDMQ body: its text, or base64 (see encoding)")
    encoding: Literal["base64"] | None = None


class GapFrame(_Frame):
    """Server -> client, in two cases.

    *Resume gap* (no ``origin``): right after ``subscribed`` on a resume, some of what
    the client asked for is not held (any more, or in this epoch); ``from`` and ``to``
    are offsets of the peer's history.

    *Origin gap* (``origin`` set): an entry of the peer's history, at its own
    ``offset``, sent live and replayed on resume like a message: messages ``from``..``to``
    (the origin's sequence numbers, inclusive) that gateway ``origin`` sent to this peer
    in its ``origin_epoch`` never arrived within the reorder bounds and never will be
    delivered; the messages after them follow.
    """

    type: Literal["gap"]
    reason: str
    epoch: str
    client_epoch: str | None = None
    from_: int | None = Field(
        alias="from",
        description="resume gap: first offset missed, if known; origin gap: first missing seq",
    )
    to: int = Field(
        description="resume gap: last offset missed (0: none of this epoch); origin gap: "
        "last missing seq"
    )
    offset: int | None = Field(
        default=None, description="origin gap: its offset in the peer's history"
    )
    origin: str | None = Field(
        default=None, description="origin gap: the SIP URI of the gateway whose messages are lost"
    )
    origin_epoch: str | None = Field(
        default=None, description="origin gap: that gateway's origin epoch"
    )


class ErrorFrame(_Frame):
    """Server -> client: a frame the client sent was refused, and why (a reply that
    is not well formed, or that comes after the message was answered)."""

    type: Literal["error"]
    error: str
    id: str | None = Field(default=None, description="the message id of the refused reply")


class ReplyFrame(BaseModel):
    """Client -> server (subscriber mode): the SIP reply to message ``id``."""

    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["reply"]
    id: str
    code: Annotated[int, Field(ge=200, le=699)] = 200
    reason: Annotated[str, Field(max_length=128, pattern=r"^[^\r\n]*$")] = "OK"
    content_type: Annotated[str, Field(max_length=256, pattern=r"^[^\r\n]*$")] | None = None
    body: str = ""
    encoding: Literal["base64"] | None = None


class PublishFrame(BaseModel):
    """Client -> server (``GET /v1/peers/{peer_id}/publish``): broadcast one message
    to the peer (or send it to the connection's ``node``)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["publish"]
    id: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        description="the client's id for this publish; its ack frame carries it back"
    )
    body: str = Field(description="the KDMQ body: text, or base64 with encoding")
    content_type: Annotated[str, Field(max_length=256, pattern=r"^[^\r\n]*$")] | None = None
    encoding: Literal["base64"] | None = None


class NodeResultFrame(BaseModel):
    """One node's answer to a published message (as in a broadcast with wait=true)."""

    node: str
    code: int | None = Field(description="final SIP status code, or null on timeout")
    reason: str | None
    content_type: str | None = None
    body: str | None = Field(None, description="the reply body (base64 if not UTF-8)")
    encoding: Literal["base64"] | None = None
    timeout: bool
    outcome: Literal["delivered", "queued", "dropped"] | None = None


class AckFrame(_Frame):
    """Server -> client (publish): a published message's fate, once every node has
    answered (or Timer F passed): the same per-node results as a broadcast with
    wait=true. Acks come in the order the publishes were sent."""

    type: Literal["ack"]
    id: str = Field(description="the client's id of the publish")
    message_id: str = Field(description="the gateway's message id")
    peer: str
    targets: int
    results: list[NodeResultFrame]


class PublishErrorFrame(_Frame):
    """Server -> client (publish): a publish frame was refused (not well formed, body
    not base64, too large, unknown peer...) and nothing was sent for it."""

    type: Literal["error"]
    error: str
    id: str | None = Field(default=None, description="the client's id of the refused publish")
    status: int = Field(description="the HTTP status the same refusal gets from POST broadcast")
