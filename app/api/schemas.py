"""Request and response models of API version 1 (the WebSocket frames are the
gateway's own, in :mod:`app.gateway.frames`).

Request models are strict: a number must be a number (``false`` is not 0), unknown
fields are refused, so a typo is a 422 that names it rather than a silent default.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.gateway.frames import ErrorFrame, GapFrame, MessageFrame, ReplyFrame, SubscribedFrame
from app.gateway.models import DEFAULT_HISTORY_BYTES, ReplyMode

#: The WebSocket frames, for clients of the API that import them from here.
__all__ = ["ErrorFrame", "GapFrame", "MessageFrame", "ReplyFrame", "SubscribedFrame"]


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class OutModel(BaseModel):
    """A response, read from the gateway's own records."""

    model_config = ConfigDict(from_attributes=True)


class Problem(BaseModel):
    """An RFC 9457 problem detail."""

    type: str = Field("about:blank", description="URI reference identifying the problem type")
    title: str = Field(description="short summary of the problem type")
    status: int = Field(description="HTTP status code")
    detail: str = Field(description="what was wrong with this request")
    instance: str | None = Field(None, description="the request path")
    errors: list[dict[str, object]] | None = Field(
        None, description="for validation errors: each field and what is wrong with it"
    )


class Health(OutModel):
    node: str = Field(description="this node's SIP URI (its server address)")
    status: Literal["active", "stopping"]
    uptime: float = Field(description="seconds since the node started")
    active_nodes: int = Field(description="other nodes of the bus this node holds as active")
    version: str


class NodeOut(OutModel):
    uri: str
    host: str
    port: int
    transport: str
    status: Literal["active", "not_active", "disabled"]
    local: bool
    last_reply: float | None = Field(
        description="Unix time of the node's last reply to us, or null if it never replied"
    )
    failures: int = Field(description="consecutive pings it failed to answer")


class NodeIn(StrictModel):
    uri: Annotated[str, Field(min_length=5, max_length=512, examples=["sip:127.0.0.1:5062"])]


class PeerIn(StrictModel):
    description: Annotated[str, Field(max_length=1024)] = ""
    reply: Literal["auto", "subscriber"] = Field(
        "auto",
        description="auto: the node answers 200 once the message is in the peer's history; "
        "subscriber: a WebSocket subscriber's reply frame becomes the SIP reply",
    )
    reply_timeout: Annotated[float, Field(gt=0)] = Field(
        5.0,
        description="reply=subscriber: seconds to wait for a subscriber's reply before the "
        "node answers 408; at most the node's Timer F (after which the sending node has "
        "given up), or the request is refused with 422 saying so",
    )
    history: Annotated[int, Field(ge=0, le=1_000_000)] = Field(
        1000, description="messages kept for subscribers that resume with ?since="
    )
    history_max_age: Annotated[float, Field(ge=0, le=10 * 365 * 86400)] = Field(
        0,
        description="seconds a message is kept for subscribers that resume (0: no age "
        "limit; history still bounds the count)",
    )
    history_bytes: Annotated[int, Field(ge=0, le=1 << 40)] = Field(
        DEFAULT_HISTORY_BYTES,
        description="bytes of message bodies kept for subscribers that resume: the oldest "
        "entries are trimmed once the sum passes it (the newest message is kept however "
        "large); a client resuming from a trimmed entry gets a gap frame",
    )


class PeerOut(OutModel):
    peer_id: str
    description: str
    reply: ReplyMode
    reply_timeout: float
    history: int
    history_max_age: float
    history_bytes: int
    epoch: str = Field(description="history epoch; offsets are comparable only within it")
    offset: int = Field(
        description="offset of the latest history entry (0: none yet); with the sqlite "
        "history store, epoch and offset survive restarts"
    )
    history_size: int = Field(description="messages held in history now")
    subscribers: int
    received: int = Field(description="messages received since the gateway started")
    persistent: bool = Field(description="kept across restarts (false for --peer peers)")


class NodeResultOut(OutModel):
    node: str
    code: int | None = Field(description="final SIP status code, or null on timeout")
    reason: str | None
    content_type: str | None = None
    body: str | None = Field(None, description="the reply body (base64 if not UTF-8)")
    encoding: Literal["base64"] | None = None
    timeout: bool = Field(description="no final answer in time (Timer F or ?timeout=)")
    outcome: Literal["delivered", "queued", "dropped"] | None = Field(
        None,
        description="delivered: the node answered (see code); queued: no answer yet, the "
        "message waits in the node's outbox and is resent, in order, when the node answers "
        "again (it is not lost; the receiver delivers it once); dropped: it will never be "
        "delivered (reason says why: the node was removed, an outbox bound, the gateway "
        "stopped); null: no result within ?timeout=, still in flight",
    )


class SendAccepted(OutModel):
    id: str = Field(description="message id")
    peer: str
    targets: int = Field(description="how many nodes the message is sent to")
    nodes: list[str]


class SendResults(OutModel):
    id: str
    peer: str
    targets: int
    results: list[NodeResultOut]


class BatchMessageIn(StrictModel):
    """One message of a batch."""

    body: str = Field(description="the KDMQ body: text, or base64 with encoding")
    content_type: Annotated[str, Field(max_length=256, pattern=r"^[^\r\n]*$")] | None = Field(
        None, description="the KDMQ Content-Type (default application/json)"
    )
    encoding: Literal["base64"] | None = Field(None, description="body is base64 (binary)")


class BatchAccepted(OutModel):
    """wait=false: every message of the batch was accepted and is being sent, in order."""

    peer: str
    targets: int = Field(description="how many nodes each message is sent to")
    nodes: list[str] = Field(description="the nodes each message is sent to")
    ids: list[str] = Field(description="one message id per message, in the batch's order")


class BatchResults(OutModel):
    """wait=true: one result per message, in the batch's order, each with one result
    per node."""

    peer: str
    results: list[SendResults]
