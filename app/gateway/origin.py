"""Origin stamps: who sent a KDMQ message first, in which life, and its place in line.

Every KDMQ request a gateway originates carries one header::

    X-DMQ-Origin: <sip:10.0.0.5:5060>;epoch=3f9a1c2e;seq=42
    X-DMQ-Origin: <sip:10.0.0.5:5060>;epoch=3f9a1c2e;seq=7;to=sip:10.0.0.6:5060

``<...>`` is the originating gateway's server address, ``epoch`` its *origin epoch*
(drawn once and kept in the state dir, so it survives restarts) and ``seq`` counts the
messages that origin broadcast to one peer, from 1. A send to one node counts apart,
per peer and node, and says so with ``to`` (the node as the sender named it): were it
counted with the broadcasts, every other node would see a hole for each send it was
never meant to get. The receiver uses the three to deliver
each origin's messages in order, once, and to name what was lost (:mod:`app.gateway.reorder`).

The header comes from the wire: :func:`parse_origin` never raises, and anything it
cannot read is treated as *unstamped* (delivered as it arrives, like Kamailio's
messages), which is safer than refusing a message another node already committed to.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from app.dmq.peers import ORIGIN_HEADER

__all__ = ["ORIGIN_HEADER", "OriginStamp", "build_origin", "parse_origin"]

#: Longest header value read; a stamp is well under 200 characters.
MAX_STAMP = 512

_EPOCH = re.compile(r"[0-9A-Za-z]{1,32}")
#: The sequence number fits SQLite's signed 64-bit integer.
MAX_SEQ = 2**63 - 1


class OriginStamp(NamedTuple):
    """One parsed ``X-DMQ-Origin`` header."""

    #: The originating gateway's server address, as it wrote it (``sip:host:port``).
    origin: str
    epoch: str
    seq: int
    #: The one node a send was addressed to; "" for a broadcast.
    to: str = ""

    def header(self) -> str:
        """The header value."""
        to = f";to={self.to}" if self.to else ""
        return f"<{self.origin}>;epoch={self.epoch};seq={self.seq}{to}"


def build_origin(origin: str, epoch: str, seq: int, to: str = "") -> str:
    """The ``X-DMQ-Origin`` value for message ``seq`` of ``origin`` in ``epoch``.

    Raises ValueError for values that :func:`parse_origin` would not read back, so a
    gateway never sends a stamp its peers would ignore.

    A gateway stamps every message it originates with the same origin and epoch (and
    per send the same few nodes): whether those read back is decided once per
    ``(origin, epoch, to)`` (:func:`_stamp_parts`), and a stamp is then two string
    joins, the seq only checked for its range and for the header's length cap.
    """
    plain = type(seq) is int and type(origin) is str and type(epoch) is str and type(to) is str
    parts = _stamp_parts(origin, epoch, to) if plain else None
    if parts is not None:
        head, tail, room = parts
        text = str(seq)
        if 1 <= seq <= MAX_SEQ and len(text) <= room:
            return f"{head}{text}{tail}"
    stamp = OriginStamp(origin, epoch, seq, to)
    raise ValueError(
        f"origin stamp {stamp.header()} is not valid: the origin is a sip: URI "
        "without '<', '>', ',' or spaces (and to one without ';' either), the epoch "
        "1-32 letters or digits, "
        f"the seq 1..{MAX_SEQ}"
    )


@functools.lru_cache(maxsize=256)
def _stamp_parts(origin: str, epoch: str, to: str) -> tuple[str, str, int] | None:
    """The header around the seq, and how many digits the seq may have, or None when
    no stamp of these three reads back.

    The seq is the one part that changes, and it cannot change how the rest is read
    (its value is digits only, and ``to`` may hold no ``;``): a stamp of these three
    reads back for every seq in range that keeps it within :data:`MAX_STAMP`, exactly
    when it reads back for seq 1 (the shortest).
    """
    first = OriginStamp(origin, epoch, 1, to)
    value = first.header()
    if parse_origin(value) != first:
        return None
    head = f"<{origin}>;epoch={epoch};seq="
    tail = f";to={to}" if to else ""
    return head, tail, MAX_STAMP - len(head) - len(tail)


def parse_origin(value: str | None) -> OriginStamp | None:
    """Read a header value; None (unstamped) for anything that is not a valid stamp."""
    if not value or len(value) > MAX_STAMP:
        return None
    value = value.strip()
    if not value.startswith("<"):
        return None
    end = value.find(">")
    if end < 0:
        return None
    origin = value[1:end]
    if not _is_uri(origin, params=True):
        return None
    epoch: str | None = None
    seq: int | None = None
    to: str | None = None
    for param in value[end + 1 :].split(";"):
        param = param.strip()
        if not param:
            continue
        name, sep, text = param.partition("=")
        name = name.strip().lower()
        text = text.strip()
        if not sep:
            continue
        if name == "epoch":
            if epoch is not None or not _EPOCH.fullmatch(text):
                return None
            epoch = text
        elif name == "seq":
            if seq is not None or not text.isascii() or not text.isdigit() or len(text) > 19:
                return None
            seq = int(text)
            if not 1 <= seq <= MAX_SEQ:
                return None
        elif name == "to":
            if to is not None or not _is_uri(text):
                return None
            to = text
    if epoch is None or seq is None:
        return None
    return OriginStamp(origin, epoch, seq, to or "")


def _is_uri(text: str, *, params: bool = False) -> bool:
    """A sip: URI that fits the header: inside ``<>`` it may carry ``;`` parameters
    (``;transport=tcp``), as a parameter value it may not."""
    forbidden = "<>, \t\r\n" if params else "<>;, \t\r\n"
    return (
        text.startswith("sip:")
        and 5 <= len(text) <= 256
        and not any(c in text for c in forbidden)
        and text.isprintable()
    )
