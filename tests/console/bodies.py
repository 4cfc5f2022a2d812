"""KDMQ bodies as Kamailio 5.6's modules send them, for the console's tests and
screenshots: made from the captured ones in ``tests/kamailio/captures``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.kamailio.captured import dialog_body

CAPTURES = Path(__file__).resolve().parents[1] / "kamailio" / "captures"


def dialog_call() -> tuple[bytes, ...]:
    """A call set up on a Kamailio node now: created, early, confirmed (peer
    ``dialog``), its start time moved to now (see :mod:`tests.kamailio.captured`)."""
    return tuple(
        dialog_body(name)
        for name in ("02-update-new-dialog.json", "03-state-early.json", "04-state-confirmed.json")
    )


def htable_set(table: str, key: str, value: str) -> bytes:
    """An htable SET of a string value (action 2), as sht_dmq sends it."""
    return json.dumps(
        {"action": 2, "htname": table, "cname": key, "type": 2, "strval": value, "mode": 1},
        separators=(",", ":"),
    ).encode()


def registration(aor: str, contact: str, user_agent: str = "lab-phone/1.0") -> bytes:
    """A captured usrloc update for a new contact (peer ``usrloc``), with its AOR,
    contact, record id and user agent changed and its expiry five minutes from now."""
    body = json.loads((CAPTURES / "usrloc" / "02-update-new-contact.json").read_bytes())
    body.update(
        aor=aor,
        c=contact,
        ruid=f"uloc-{aor}",
        user_agent=user_agent,
        expires=int(time.time()) + 300,
    )
    return json.dumps(body).encode()
