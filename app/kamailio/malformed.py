"""Bodies from the bus a mirror could not read: counted, logged once, answered 400.

A Kamailio module answers ``400 Bad Request`` to a body it cannot parse (bad JSON, a
field it does not know, a value of the wrong type) and goes on. A mirror does the
same: the replica is left as it was, the message is counted per sender and *kind*
(a short, fixed word: ``json``, ``field``, ``type``, ``action``...) for ``/metrics``,
and logged once per (sender, kind) at warning level, so that a misbehaving node
cannot flood the log; later ones of the same pair are logged at debug level.
"""

from __future__ import annotations

import logging
from collections import Counter

from app.dmq.peers import PeerReply

log = logging.getLogger("dmq.kamailio")

#: The reply a Kamailio module gives to a body it cannot read.
BAD_REQUEST = PeerReply(400, "Bad Request")

#: Distinct (sender, kind) pairs remembered; beyond it every sender is counted under
#: "(other)" so that a flood of forged senders cannot grow the table.
MAX_SENDERS = 1024


class MalformedBodies:
    """Per-sender counts of unreadable bodies, for one mirror (peer id)."""

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        #: (sender URI, kind) -> bodies refused.
        self.counts: Counter[tuple[str, str]] = Counter()

    def refuse(self, sender: str, kind: str, detail: str) -> PeerReply:
        """Count and log one unreadable body; return the 400 to answer it with."""
        key = (sender, kind)
        if key not in self.counts and len(self.counts) >= MAX_SENDERS:
            key = ("(other)", kind)
        first = key not in self.counts
        self.counts[key] += 1
        level = logging.WARNING if first else logging.DEBUG
        log.log(
            level,
            "%s: unreadable body from %s (%s): %s%s",
            self.peer_id,
            sender,
            kind,
            detail,
            "; later ones of this kind from this node are counted, not logged" if first else "",
        )
        return BAD_REQUEST

    @property
    def total(self) -> int:
        return sum(self.counts.values())
