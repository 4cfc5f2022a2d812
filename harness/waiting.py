"""The one polling loop: wait for a condition about another process, or fail saying what."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Call ``condition`` every ``interval`` s until it returns something truthy; return it.

    Raises AssertionError naming ``what`` after ``timeout`` s, so a test that waits in
    vain fails with a sentence instead of hanging (and a benchmark stops with one).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
