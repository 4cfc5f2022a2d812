"""A mirror's change stream: bounded in memory, with an epoch and offsets, resumable.

Each mirror publishes what changes in its replica (an htable key set or deleted, a
contact registered...) to a :class:`ChangeStream`; WebSocket clients subscribe to it
(:func:`app.kamailio.ws.serve_changes`) with the same semantics as a peer's
``subscribe`` path:

* offsets count the changes of one stream within one *epoch*, a random tag drawn when
  the stream is made: a replica lives in memory and is rebuilt by a sync at every
  start, so every start is a new epoch (there is nothing to resume across a restart);
* ``since=N`` (with ``epoch=E``) replays every change after ``N`` still held, then goes
  live, in one synchronous step: nothing falls between the replay and the live part,
  nothing comes twice;
* a resume past what is held (older changes were let go: the stream keeps the last
  ``capacity``), from another epoch, or beyond the latest offset gets a ``gap`` frame
  right after ``subscribed`` and then every change held, never a silent hole;
* a subscriber that falls ``queue_limit`` frames behind is cut off
  (:attr:`Ending.OVERFLOW`) and resumes with ``since``; one slow client never slows the
  mirror or the others.

Frames are rendered to JSON text once, and the same string is queued for every
subscriber: when the change is published if anyone subscribes then, else (a *lazy*
stream, the default) only when a resuming client first asks for it. A bus with
nobody watching a stream then pays for no JSON per change; the frame is the same
either way (its ``at`` is the time of publication). A lazy stream holds the change's
parts until then, so its ``data`` should be flat (values that are not containers,
as htable and usrloc changes are): nested containers would keep up to ``capacity``
changes in the cyclic collector's sight. A stream whose data nests (dialogs) is made
with ``lazy=False``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.gateway.hub import Ending
from app.kamailio.frames import GapFrame, SubscribedFrame

#: Changes a stream keeps for resuming clients.
DEFAULT_CAPACITY = 10_000
#: Frames a subscriber may fall behind before it is cut off.
DEFAULT_QUEUE_LIMIT = 1000

#: A change held but not rendered yet: event, key, data, sender, time of publication.
_Parts = tuple[str, str | None, dict[str, Any] | None, str | None, float]


class ChangeSubscriber:
    """One client of a stream: a bounded queue of frames and an event to wake its sender."""

    __slots__ = ("ending", "frames", "limit", "on_overflow", "sent_offset", "stream", "wakeup")

    def __init__(self, stream: ChangeStream, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.frames: deque[tuple[int, str]] = deque()
        self.wakeup = asyncio.Event()
        #: Why the stream ended this subscription, once it did.
        self.ending: Ending | None = None
        #: The offset of the last change frame handed to the client (the endpoint
        #: sets it as it sends): a cut-off client resumes after it.
        self.sent_offset = 0
        #: Called when the subscriber is cut off (the endpoint stops its sender).
        self.on_overflow: Callable[[], None] | None = None

    def push(self, offset: int, frame: str) -> None:
        if self.ending is not None:
            return
        if len(self.frames) >= self.limit:
            self.stream.overflows += 1
            self.end(Ending.OVERFLOW)
            if self.on_overflow is not None:
                self.on_overflow()
            return
        self.frames.append((offset, frame))
        self.wakeup.set()

    def end(self, why: Ending) -> None:
        """Stop the subscription; the endpoint closes the WebSocket saying why."""
        if self.ending is None:
            self.ending = why
            self.frames.clear()
            self.stream.subscribers.discard(self)
        self.wakeup.set()


@dataclass(slots=True)
class ChangeSubscription:
    """What :meth:`ChangeStream.subscribe` gives the endpoint: the frames to send before
    the subscriber's queue (``subscribed``, then a ``gap`` when some is missing)."""

    subscriber: ChangeSubscriber
    first_frames: list[str]


class ChangeStream:
    """The changes of one mirror (or one of its tables), for WebSocket subscribers."""

    def __init__(
        self,
        name: str,
        *,
        capacity: int = DEFAULT_CAPACITY,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        clock: Callable[[], float] = time.time,
        lazy: bool = True,
    ) -> None:
        if capacity < 1 or queue_limit < 1:
            raise ValueError("a change stream keeps at least one change and one frame")
        self.name = name
        self.epoch = secrets.token_hex(4)
        #: The offset of the latest change (0: none yet).
        self.offset = 0
        self.queue_limit = queue_limit
        #: (offset, frame), or (offset, parts) for a change not rendered yet.
        self._held: deque[tuple[int, str | _Parts]] = deque(maxlen=capacity)
        self.lazy = lazy
        self.subscribers: set[ChangeSubscriber] = set()
        self._clock = clock
        #: Subscribers cut off for reading too slowly (metrics).
        self.overflows = 0

    @property
    def held(self) -> int:
        """How many changes are held for resuming clients."""
        return len(self._held)

    def publish(
        self,
        event: str,
        key: str | None,
        data: dict[str, Any] | None = None,
        sender: str | None = None,
    ) -> int:
        """Append one change; queue it for every subscriber; return its offset.

        ``data`` belongs to the stream from now on: the caller must not change it."""
        self.offset += 1
        offset = self.offset
        at = self._clock()
        if self.subscribers or not self.lazy:
            frame = self._render(offset, event, key, data, sender, at)
            self._held.append((offset, frame))
            for subscriber in tuple(self.subscribers):
                subscriber.push(offset, frame)
        else:
            self._held.append((offset, (event, key, data, sender, at)))
        return offset

    def _render(
        self,
        offset: int,
        event: str,
        key: str | None,
        data: dict[str, Any] | None,
        sender: str | None,
        at: float,
    ) -> str:
        # The fields of ChangeFrame, in its order, dumped as pydantic would (a sync
        # publishes thousands of changes at once: a model per change cost half of it).
        return json.dumps(
            {
                "type": "change",
                "offset": offset,
                "epoch": self.epoch,
                "stream": self.name,
                "event": event,
                "key": key,
                "data": data,
                "from": sender,
                "at": round(at, 3),
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )

    def _rendered_after(self, start: int) -> list[tuple[int, str]]:
        """Every held change after offset ``start`` as (offset, frame), rendering
        those not rendered yet, once: the held ones are replaced by their frames."""
        out: list[tuple[int, str]] = []
        held = self._held
        pending = False
        for offset, item in held:
            if offset > start:
                if isinstance(item, str):
                    out.append((offset, item))
                else:
                    out.append((offset, self._render(offset, *item)))
                    pending = True
        if pending:
            rendered = dict(out)
            self._held = deque(
                ((offset, rendered.get(offset, item)) for offset, item in held),
                maxlen=held.maxlen,
            )
        return out

    def subscribe(self, since: int | None, epoch: str | None) -> ChangeSubscription:
        """Register a subscriber; queue what it missed first (no await: no gap).

        ``epoch`` goes with ``since`` (the endpoint refuses it alone). The rules are
        those of :meth:`app.gateway.hub.Hub.subscribe`.
        """
        subscriber = ChangeSubscriber(self, self.queue_limit)
        held = self._held
        oldest = held[0][0] if held else self.offset + 1
        gap: GapFrame | None = None
        start = self.offset
        if since is not None:
            start = since
            if (epoch is not None and epoch != self.epoch) or since > self.offset:
                if epoch is not None and epoch != self.epoch:
                    reason = "epoch changed (the gateway restarted); the stream restarts"
                else:
                    reason = (
                        f"since={since} is beyond the latest offset {self.offset} of "
                        f"epoch {self.epoch}: it belongs to another epoch (the gateway "
                        "restarted); the stream restarts"
                    )
                gap = GapFrame.model_validate(
                    {
                        "type": "gap",
                        "reason": reason,
                        "epoch": self.epoch,
                        "client_epoch": epoch,
                        "from": None,
                        "to": oldest - 1,
                    }
                )
                start = 0
            elif since + 1 < oldest:
                gap = GapFrame.model_validate(
                    {
                        "type": "gap",
                        "reason": "changes no longer held by the stream",
                        "epoch": self.epoch,
                        "from": since + 1,
                        "to": oldest - 1,
                    }
                )
            # Replay what is held after `start` (bounded by the stream's capacity).
            subscriber.frames.extend(self._rendered_after(start))
            if subscriber.frames:
                # The replay does not count against the live bound (it is bounded by
                # the stream's capacity already).
                subscriber.limit += len(subscriber.frames)
                subscriber.wakeup.set()
        subscriber.sent_offset = start
        self.subscribers.add(subscriber)
        first = SubscribedFrame(
            type="subscribed", peer=self.name, epoch=self.epoch, offset=self.offset, since=start
        )
        frames = [first.text()] if gap is None else [first.text(), gap.text()]
        return ChangeSubscription(subscriber, frames)

    def unsubscribe(self, subscriber: ChangeSubscriber) -> None:
        self.subscribers.discard(subscriber)

    def end_all(self, why: Ending) -> None:
        """End every subscription (the gateway is stopping)."""
        for subscriber in tuple(self.subscribers):
            subscriber.end(why)
