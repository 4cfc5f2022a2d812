"""Captured Kamailio 5.6 bodies, made current for tests that run them through a live
mirror.

A dialog body carries absolute Unix times (``start_ts`` of a confirmed dialog,
``init_ts`` of a sync update), and the dialog mirror expires a dialog at ``start_ts``
plus its ``lifetime`` (12 h in the captures), as Kamailio does. Sent as captured, the
call would be over twelve hours after the capture was made, and every test that
expects it to be up would fail from then on. :func:`dialog_body` gives the capture with
those times moved to now and every other byte as captured; the codec's own tests read
the files as they are.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

CAPTURES = Path(__file__).parent / "captures"

#: An absolute time field of a dialog body that is set (0 means "not yet" there).
_ABSOLUTE_TIME = re.compile(rb'"(start_ts|init_ts)":([1-9][0-9]*)')


def redated(body: bytes, now: float | None = None) -> bytes:
    """``body`` with its ``start_ts`` and ``init_ts`` (where set) at ``now``."""
    stamp = b"%d" % int(time.time() if now is None else now)
    return _ABSOLUTE_TIME.sub(lambda match: b'"' + match[1] + b'":' + stamp, body)


def dialog_body(name: str, now: float | None = None) -> bytes:
    """The captured dialog body ``name`` (a file of ``captures/dialog``), stripped of
    its line end, with its absolute times at ``now``."""
    return redated((CAPTURES / "dialog" / name).read_bytes().strip(), now)
