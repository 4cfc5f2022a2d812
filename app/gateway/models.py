"""The gateway's domain models that more than one layer uses (kept apart to avoid
import cycles between the hub, the peer store and the API)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


class ReplyMode(StrEnum):
    AUTO = "auto"
    SUBSCRIBER = "subscriber"


@dataclass(slots=True)
class PeerSettings:
    """How a peer behaves; what ``PUT /v1/peers/{peer_id}`` sets and the store keeps."""

    description: str = ""
    reply: ReplyMode = ReplyMode.AUTO
    #: Seconds to wait for a subscriber's reply (subscriber mode).
    reply_timeout: float = 5.0
    #: Messages kept for replay.
    history: int = 1000

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["reply"] = self.reply.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PeerSettings:
        return cls(
            description=str(data.get("description", "")),
            reply=ReplyMode(data.get("reply", "auto")),
            reply_timeout=float(data.get("reply_timeout", 5.0)),
            history=int(data.get("history", 1000)),
        )
