"""Timers for the sans-IO core: deadlines in, callbacks out, no clock of its own.

The core is given ``now`` by whoever drives it and asks this queue for the next
deadline; the driver keeps a single loop timer armed at that instant (the aioquic
shape). A callback receives the ``now`` of the :meth:`TimerQueue.run_due` that fires
it as its first argument: time reaches the core only as ``now`` arguments, never
from state kept aside (a deadline is when a timer was due, not what time it is).

Cancelling is O(1): a cancelled entry stays in the heap and is skipped when it
reaches the top, which is cheaper than removing it for the many SIP timers that are
cancelled long before they would fire (Timer E and F on every answered request).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any


class TimerHandle:
    """One scheduled callback; :meth:`cancel` makes it a no-op."""

    __slots__ = ("args", "callback", "deadline")

    def __init__(self, deadline: float, callback: Callable[..., None], args: tuple[Any, ...]):
        self.deadline = deadline
        self.callback: Callable[..., None] | None = callback
        self.args = args

    def cancel(self) -> None:
        self.callback = None
        self.args = ()

    @property
    def cancelled(self) -> bool:
        return self.callback is None


class TimerQueue:
    """A heap of :class:`TimerHandle` ordered by deadline, then by scheduling order."""

    __slots__ = ("_counter", "_heap")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._counter = itertools.count()

    def call_at(self, deadline: float, callback: Callable[..., None], *args: Any) -> TimerHandle:
        """Run ``callback(now, *args)`` from the first :meth:`run_due` whose ``now`` is
        at or past ``deadline``."""
        handle = TimerHandle(deadline, callback, args)
        heapq.heappush(self._heap, (deadline, next(self._counter), handle))
        return handle

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or ``None`` when nothing is scheduled."""
        heap = self._heap
        while heap and heap[0][2].callback is None:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def run_due(self, now: float) -> int:
        """Run every callback whose deadline is at or before ``now``; return how many."""
        heap = self._heap
        ran = 0
        while heap and heap[0][0] <= now:
            _, _, handle = heapq.heappop(heap)
            callback = handle.callback
            if callback is None:
                continue
            args = handle.args
            handle.cancel()
            callback(now, *args)
            ran += 1
        return ran

    def __len__(self) -> int:
        return sum(1 for _, _, handle in self._heap if handle.callback is not None)
