"""The one bounded cache of the core and its driver.

Several look-ups on the hot path are cached by keys that other nodes choose (source
hosts, Request-URIs, From URIs) or that API clients choose (peer ids), so every such
cache must be bounded, or a stream of distinct keys grows it without end. Emptying a
cache when it is full (as was once done) makes every hot key miss at once; this one
forgets only its oldest entry.

It is an :class:`~collections.OrderedDict` so that a hit is the C-level ``get``, with
no Python frame in between; only a miss pays for :meth:`put`. Eviction is by age of
insertion rather than of use: moving each hit to the end would cost every hit, and a
hot key that is evicted comes back on its next miss.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(OrderedDict[K, V]):
    """A mapping that keeps at most ``maxsize`` entries, forgetting the oldest first."""

    __slots__ = ("maxsize",)

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, not {maxsize}")
        super().__init__()
        self.maxsize = maxsize

    def put(self, key: K, value: V) -> V:
        """Store ``value`` under ``key`` and return it, dropping the oldest entry when
        the cache is over its size."""
        self[key] = value
        if len(self) > self.maxsize:
            self.popitem(last=False)
        return value
