"""Ordered, exactly-once, gap-aware delivery of stamped messages (sans-IO).

A *stream* is what one origin, in one origin epoch, sends to one peer: messages stamped
``seq`` 1, 2, 3... (:mod:`app.gateway.origin`). Over UDP with retransmissions, and with
the sender's store-and-forward outbox resending after a node comes back, its messages
can arrive out of order, twice, or long after the SIP transaction that carried the
first copy is gone. :class:`Reorderer` turns that into what a subscriber wants:

* a message with the next expected ``seq`` is delivered at once, followed by any
  held messages it makes contiguous;
* a message that arrives early is *held* (the caller stores it before answering 200);
* a ``seq`` already delivered or held is a duplicate: answered, never delivered again;
* when the oldest held message has waited ``max_wait`` seconds, or a stream holds more
  than ``max_held``, the missing ``seq`` s are given up for good: a :class:`Gap` names
  them, and delivery goes on from the lowest held message.

A stream the receiver has never seen starts at ``seq`` 1 when that is what arrives;
otherwise (this node joined, or registered the peer, after the origin had already sent
to it) its first messages are held for ``join_wait`` (at most ``max_wait``) and
delivery starts at the lowest ``seq`` that arrived, without a gap: the receiver cannot
know which earlier messages were ever meant for it. ``join_wait`` is short (it covers
the retransmissions of a first message lost on its way, not an outbox's resend after a
partition) because a peer registered on a receiver after its origin had sent a single
message would otherwise deliver nothing for the whole ``max_wait`` (minutes at the
default timers). A new origin epoch (the origin lost its state dir) retires the
old epoch's stream: what it still held is released, with gaps, before the new one
starts.

Time enters only as ``now`` (the caller's clock), and nothing here does I/O: the hub
persists what the actions say and arms one timer at :meth:`Reorderer.next_deadline`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")

#: The reorderer's own default wait (the gateway derives its ``--reorder-wait`` from
#: Timer F instead: :data:`WAIT_PER_TIMER_F`).
DEFAULT_MAX_WAIT = 2.0
#: How long a stream first seen at a seq above 1 waits for the seqs below it: the first
#: two retransmissions of a lost request at the default T1 (0.5 s, then 1 s more).
DEFAULT_JOIN_WAIT = 2.0
#: ``--reorder-wait`` when not set: this many times the node's Timer F. A missing
#: message is most often still on its way: retransmitted until Timer F, then resent
#: from the sender's outbox once the node answers a ping again. Measured under 20% and
#: 40% UDP loss (bench/results/reorder-wait.json), holes filled within 2 Timer F with
#: the lab's timers (Timer F 2 s: the longest between 4 and 8 s at 40% loss) and
#: within 0.5 Timer F with the default ones (Timer F 32 s: the longest between 8 and
#: 16 s at 20% loss); a wait of 4 Timer F covers both with room, whereas the former
#: fixed 2 s gave up messages that then arrived (17 of 209 holes at the default timers).
WAIT_PER_TIMER_F = 4.0
#: Default of ``--reorder-limit``: early messages one stream may hold. A hole holds
#: back what its origin sends until it fills, so the count needed is the origin's rate
#: times the fill time: the measured peak was 23-31 at 100-200 messages/s with holes
#: under 1 s, but a stream of 2 000 messages/s needs 2 000 per second of hole. It
#: matches the sender's outbox bound (``outbox_max_messages``, 10 000): a receiver
#: holds as much as a sender may queue for it, at the cost of memory for that many
#: bodies per stream while a hole lasts.
DEFAULT_MAX_HELD = 10_000
#: Upper bounds (seconds) of the buckets of the hole-fill histogram (:attr:`Reorderer.fills`).
FILL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
#: Gaps remembered per stream, to tell a copy that arrives after its gap was declared.
LOST_KEPT = 16


class StreamKey(NamedTuple):
    peer_id: str
    origin: str
    epoch: str
    #: The node a stream of sends is addressed to; "" for the origin's broadcasts.
    to: str = ""


class Verdict(Enum):
    """What became of one offered message."""

    #: Delivered now (it is the first :class:`Delivery` of the actions).
    DELIVERED = "delivered"
    #: Held until the messages before it arrive (or are given up).
    HELD = "held"
    #: Already delivered or held: answer it, deliver nothing.
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class Delivery(Generic[T]):
    key: StreamKey
    seq: int
    item: T
    #: It had been held (the caller removes it from where held messages are stored).
    was_held: bool


@dataclass(frozen=True, slots=True)
class Gap:
    """``first``..``last`` (inclusive) of a stream will never be delivered."""

    key: StreamKey
    first: int
    last: int
    reason: str


@dataclass(frozen=True, slots=True)
class Retired:
    """A stream ended (its origin started a new epoch): forget its state."""

    key: StreamKey


Action = Delivery[T] | Gap | Retired


@dataclass(slots=True)
class _Stream(Generic[T]):
    #: The next seq to deliver; None until the stream's start is known.
    next: int | None
    #: seq -> (item, when it arrived).
    held: dict[int, tuple[T, float]] = field(default_factory=dict)
    #: Unordered streams: seqs seen above ``next``.
    seen: set[int] = field(default_factory=set)
    #: When the current hole began: the arrival of the first message held behind it.
    hole_since: float | None = None
    #: The latest gaps declared, ``(first, last)``.
    lost: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=LOST_KEPT))


class Reorderer(Generic[T]):
    """Per-stream reordering with bounded waiting; see the module's docstring."""

    def __init__(
        self,
        max_wait: float = DEFAULT_MAX_WAIT,
        max_held: int = DEFAULT_MAX_HELD,
        join_wait: float = DEFAULT_JOIN_WAIT,
    ):
        if max_wait < 0:
            raise ValueError(f"max_wait {max_wait}: must be at least 0 seconds")
        if max_held < 1:
            raise ValueError(f"max_held {max_held}: must be at least 1")
        if join_wait < 0:
            raise ValueError(f"join_wait {join_wait}: must be at least 0 seconds")
        self.max_wait = max_wait
        self.max_held = max_held
        #: How long a stream whose start is unknown holds its first messages.
        self.join_wait = min(join_wait, max_wait)
        self._streams: dict[StreamKey, _Stream[T]] = {}
        #: (peer_id, origin, to) -> the epoch whose stream is current.
        self._current: dict[tuple[str, str, str], str] = {}
        self.duplicates = 0
        self.gaps = 0
        #: How long holes took to fill: the time from the first message held behind a
        #: missing seq to that seq's arrival, counted per bucket of :data:`FILL_BUCKETS`
        #: (the last count: beyond the last bound), with their sum. What a reorder wait
        #: must cover so that no message still on its way is declared lost.
        self.fills = [0] * (len(FILL_BUCKETS) + 1)
        self.fill_sum = 0.0
        #: Copies of messages already declared lost that arrived afterwards: each one
        #: is a message a longer reorder wait would have delivered.
        self.late = 0
        #: The most messages one stream has held at once (what ``max_held`` must cover).
        self.held_peak = 0

    # ------------------------------------------------------------------ state

    def restore(self, key: StreamKey, next_seq: int) -> None:
        """Resume a stream persisted before a restart (next ``seq`` to deliver)."""
        self._stream(key).next = next_seq

    def restore_unordered(self, key: StreamKey, seen: list[int]) -> None:
        """Resume an unordered stream's deduplication: the ``seq`` s seen above its
        watermark (the watermark itself comes back through :meth:`restore`)."""
        stream = self._stream(key)
        if stream.next is None:
            stream.next = 1
        stream.seen.update(seq for seq in seen if seq >= stream.next)

    def restore_held(self, key: StreamKey, seq: int, item: T, arrived: float) -> None:
        """Hold again a message that was held when the process stopped."""
        stream = self._stream(key)
        stream.held[seq] = (item, arrived)
        if stream.hole_since is None or arrived < stream.hole_since:
            stream.hole_since = arrived

    def next_seq(self, key: StreamKey) -> int | None:
        stream = self._streams.get(key)
        return None if stream is None else stream.next

    def held(self) -> int:
        return sum(len(s.held) for s in self._streams.values())

    def forget_peer(self, peer_id: str) -> None:
        """The peer was unregistered: its streams go with it."""
        for key in [k for k in self._streams if k.peer_id == peer_id]:
            del self._streams[key]
        for pair in [p for p in self._current if p[0] == peer_id]:
            del self._current[pair]

    def _stream(self, key: StreamKey) -> _Stream[T]:
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(None)
            self._current[(key.peer_id, key.origin, key.to)] = key.epoch
        return stream

    # ------------------------------------------------------------------ input

    def offer(
        self, key: StreamKey, seq: int, item: T, now: float
    ) -> tuple[Verdict, list[Action[T]]]:
        """One stamped message arrived; return its verdict and what to do now."""
        actions: list[Action[T]] = []
        stream = self._streams.get(key)
        if stream is None:
            current = self._current.get((key.peer_id, key.origin, key.to))
            if current is not None and current != key.epoch:
                self._retire(key._replace(epoch=current), actions)
            stream = self._stream(key)
        if (stream.next is not None and seq < stream.next) or seq in stream.held:
            self.duplicates += 1
            if any(first <= seq <= last for first, last in stream.lost):
                self.late += 1
            return Verdict.DUPLICATE, actions
        if stream.next is None and seq == 1:
            stream.next = 1
        if seq == stream.next:
            stream.next = seq + 1
            actions.append(Delivery(key, seq, item, was_held=False))
            if stream.held:
                if stream.hole_since is not None:
                    self._filled(now - stream.hole_since)
                self._drain(key, stream, actions)
                self._hole_moved(stream)
            return Verdict.DELIVERED, actions
        if not stream.held:
            stream.hole_since = now
        stream.held[seq] = (item, now)
        if len(stream.held) > self.held_peak:
            self.held_peak = len(stream.held)
        if len(stream.held) > self.max_held:
            self._release(key, stream, actions, "more messages held than --reorder-limit")
        return Verdict.HELD, actions

    def offer_unordered(self, key: StreamKey, seq: int) -> bool:
        """Deduplicate without ordering (``reply: subscriber`` peers); True if new.

        Seen ``seq`` s above the stream's watermark are kept in a set; past ``max_held``
        of them the watermark moves up to the lowest, so the memory stays bounded and
        only a copy older than that could come twice.
        """
        stream = self._stream(key)
        if stream.next is None:
            stream.next = 1
        seen = stream.seen
        if seq < stream.next or seq in seen:
            self.duplicates += 1
            return False
        seen.add(seq)
        if len(seen) > self.max_held:
            stream.next = min(seen)
        while stream.next in seen:
            seen.discard(stream.next)
            stream.next += 1
        return True

    def expire(self, now: float) -> list[Action[T]]:
        """Give up on what has waited ``max_wait``; return what to do now."""
        actions: list[Action[T]] = []
        for key, stream in list(self._streams.items()):
            while (
                stream.held and min(a for _, a in stream.held.values()) + self._wait(stream) <= now
            ):
                reason = f"not received within --reorder-wait ({self.max_wait:g} s)"
                self._release(key, stream, actions, reason)
        return actions

    def _wait(self, stream: _Stream[T]) -> float:
        """How long the stream's held messages wait: ``join_wait`` while its start is
        unknown (no gap is declared then, see the module's docstring)."""
        return self.join_wait if stream.next is None else self.max_wait

    def next_deadline(self) -> float | None:
        """When :meth:`expire` has something to do, or None."""
        deadline: float | None = None
        for stream in self._streams.values():
            if stream.held:
                oldest = min(a for _, a in stream.held.values()) + self._wait(stream)
                if deadline is None or oldest < deadline:
                    deadline = oldest
        return deadline

    # ------------------------------------------------------------------ internals

    def _filled(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.fill_sum += seconds
        for index, bound in enumerate(FILL_BUCKETS):
            if seconds <= bound:
                self.fills[index] += 1
                return
        self.fills[-1] += 1

    @staticmethod
    def _hole_moved(stream: _Stream[T]) -> None:
        """After a drain: the next hole, if any, began when its first message came."""
        held = stream.held
        stream.hole_since = min(a for _, a in held.values()) if held else None

    def _drain(self, key: StreamKey, stream: _Stream[T], actions: list[Action[T]]) -> None:
        held = stream.held
        assert stream.next is not None
        while stream.next in held:
            item, _ = held.pop(stream.next)
            actions.append(Delivery(key, stream.next, item, was_held=True))
            stream.next += 1

    def _release(
        self, key: StreamKey, stream: _Stream[T], actions: list[Action[T]], reason: str
    ) -> None:
        """Skip to the lowest held seq (a gap for what is skipped), deliver from there."""
        lowest = min(stream.held)
        if stream.next is not None and lowest > stream.next:
            self.gaps += 1
            actions.append(Gap(key, stream.next, lowest - 1, reason))
            stream.lost.append((stream.next, lowest - 1))
        stream.next = lowest
        self._drain(key, stream, actions)
        self._hole_moved(stream)

    def _retire(self, key: StreamKey, actions: list[Action[T]]) -> None:
        stream = self._streams.pop(key, None)
        if stream is None:
            return
        while stream.held:
            self._release(key, stream, actions, "the origin started a new epoch")
        actions.append(Retired(key))
