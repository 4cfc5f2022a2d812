"""Timers for the sans-IO core: deadlines in, callbacks out, no clock of its own.

The core is given ``now`` by whoever drives it and asks this queue for the next
deadline; the driver keeps a single loop timer armed at that instant (the aioquic
shape). A callback receives the ``now`` of the :meth:`TimerQueue.run_due` that fires
it as its first argument: time reaches the core only as ``now`` arguments, never
from state kept aside (a deadline is when a timer was due, not what time it is).

Cancelling is O(1): a cancelled entry stays in the heap and is skipped when it
reaches the top, which is cheaper than removing it for the many SIP timers that are
cancelled long before they would fire (Timer E and F on every answered request). But a
cancelled Timer F would otherwise sit in the heap for its whole 32 s: at 1 000 requests
a second that is 32 000 dead handles, each an object the cyclic collector walks on
every full pass. So the queue counts its cancelled entries and, once they are more than
half of the heap, rebuilds it without them (amortised O(1) per cancel).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

#: Below this many entries the heap is never rebuilt: a few dead handles cost nothing.
PURGE_MIN = 64


class TimerHandle:
    """One scheduled callback; :meth:`cancel` makes it a no-op."""

    __slots__ = ("_queue", "args", "callback", "deadline")

    def __init__(
        self,
        deadline: float,
        callback: Callable[..., None],
        args: tuple[Any, ...],
        queue: TimerQueue | None = None,
    ):
        self.deadline = deadline
        self.callback: Callable[..., None] | None = callback
        self.args = args
        #: The queue whose heap holds it while it is live (told of a cancel).
        self._queue = queue

    def cancel(self) -> None:
        if self.callback is None:
            return
        self.callback = None
        self.args = ()
        queue = self._queue
        if queue is not None:
            self._queue = None
            queue._cancelled_one()

    @property
    def cancelled(self) -> bool:
        return self.callback is None


class TimerQueue:
    """A heap of :class:`TimerHandle` ordered by deadline, then by scheduling order."""

    __slots__ = ("_cancelled", "_counter", "_heap")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._counter = itertools.count()
        #: Cancelled handles still in the heap.
        self._cancelled = 0

    def call_at(self, deadline: float, callback: Callable[..., None], *args: Any) -> TimerHandle:
        """Run ``callback(now, *args)`` from the first :meth:`run_due` whose ``now`` is
        at or past ``deadline``."""
        handle = TimerHandle(deadline, callback, args, self)
        heapq.heappush(self._heap, (deadline, next(self._counter), handle))
        return handle

    def _cancelled_one(self) -> None:
        self._cancelled += 1
        heap = self._heap
        if self._cancelled * 2 > len(heap) and len(heap) >= PURGE_MIN:
            heap[:] = [entry for entry in heap if entry[2].callback is not None]
            heapq.heapify(heap)
            self._cancelled = 0

    def _pop(self) -> TimerHandle:
        handle = heapq.heappop(self._heap)[2]
        if handle.callback is None:
            self._cancelled -= 1
        return handle

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or ``None`` when nothing is scheduled."""
        heap = self._heap
        while heap and heap[0][2].callback is None:
            self._pop()
        return heap[0][0] if heap else None

    def run_due(self, now: float) -> int:
        """Run every callback whose deadline is at or before ``now``; return how many."""
        heap = self._heap
        ran = 0
        while heap and heap[0][0] <= now:
            handle = self._pop()
            callback = handle.callback
            if callback is None:
                continue
            args = handle.args
            # Out of the heap now: a cancel from here on is not counted.
            handle._queue = None
            handle.callback = None
            handle.args = ()
            callback(now, *args)
            ran += 1
        return ran

    def __len__(self) -> int:
        return len(self._heap) - self._cancelled

    @property
    def heap_size(self) -> int:
        """Entries in the heap, cancelled ones included (at most about twice the live
        ones, plus :data:`PURGE_MIN`)."""
        return len(self._heap)
