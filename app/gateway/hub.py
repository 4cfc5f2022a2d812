"""The gateway's peers: history, subscribers and replies, on top of a DmqServer.

Theory of operation
-------------------
Each registered peer is a :class:`PeerChannel`. A KDMQ request for it becomes a
:class:`HistoryEntry` with the next *offset* of the channel's *epoch* (a random tag
drawn when the channel is created in this process: offsets are only comparable within
one epoch, which is how a client learns that a restart lost the history it knew).

* ``reply: auto`` - the entry is stored, fanned out, and the node answers 200 at once.
* ``reply: subscriber`` - with no subscriber the node answers 480 and stores nothing;
  otherwise the entry is stored and fanned out, and the first subscriber that answers
  with the entry's id decides the SIP reply; none in ``reply_timeout`` means 408.

Fan-out serialises each message to its JSON text frame once and appends the same
string to every subscriber's queue, so delivering to 1 000 clients costs 1 000 appends.
A queue holds at most ``queue_limit`` frames: a subscriber that falls that far behind is
cut off (close code :data:`CLOSE_SLOW_CONSUMER`), counted, and can resume with
``since``. Nothing accepted is dropped silently: an entry is in the history (bounded by
``history``), and a client that resumes past what is still held is told so with a
``gap`` frame.

Subscribing with ``since`` replays, from the history, every entry after that offset and
then goes live; the replay and the registration happen in one synchronous step, so no
message can fall between them or come twice.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.dmq.errors import NodeStoppedError, ReplyNotPendingError
from app.dmq.events import Event, PeerReplyTimedOut
from app.dmq.peers import PeerMessage, PeerReply
from app.gateway.config import DEFAULT_QUEUE_LIMIT
from app.gateway.models import PeerSettings, ReplyMode
from app.gateway.store import PeerStore
from app.transport.server import DmqServer

log = logging.getLogger("dmq.gateway")

#: WebSocket close code for a subscriber whose send queue overflowed.
CLOSE_SLOW_CONSUMER = 4008
#: WebSocket close code when the peer is unregistered while subscribed.
CLOSE_PEER_REMOVED = 4004


class HistoryEntry:
    """One message in a peer's history; its JSON frame is built on first use and
    kept, so a message nobody is subscribed to costs no serialisation."""

    __slots__ = ("_frame", "epoch", "id", "message", "offset", "peer_id")

    def __init__(self, peer_id: str, epoch: str, offset: int, message: PeerMessage) -> None:
        self.peer_id = peer_id
        self.epoch = epoch
        self.offset = offset
        self.id = f"{epoch}-{offset}"
        self.message = message
        self._frame: str | None = None

    @property
    def frame(self) -> str:
        frame = self._frame
        if frame is None:
            frame = self._frame = self._render()
        return frame

    def _render(self) -> str:
        message = self.message
        data: dict[str, Any] = {
            "type": "message",
            "offset": self.offset,
            "epoch": self.epoch,
            "id": self.id,
            "peer": self.peer_id,
            "from": str(message.sender),
            "content_type": message.content_type,
        }
        try:
            data["body"] = message.body.decode("utf-8")
        except UnicodeDecodeError:
            data["body"] = base64.b64encode(message.body).decode("ascii")
            data["encoding"] = "base64"
        return json.dumps(data, separators=(",", ":"))


class Subscriber:
    """One WebSocket client of a peer: a bounded queue of frames to send."""

    __slots__ = (
        "channel",
        "closed",
        "frames",
        "limit",
        "on_overflow",
        "overflowed",
        "replay_end",
        "sent_offset",
        "wakeup",
    )

    def __init__(self, channel: PeerChannel, limit: int) -> None:
        self.channel = channel
        #: (offset, JSON text frame) waiting to be sent.
        self.frames: deque[tuple[int, str]] = deque()
        self.limit = limit
        self.wakeup = asyncio.Event()
        self.overflowed = False
        self.closed = False
        #: Offset of the last message handed to the WebSocket (what to resume after).
        self.sent_offset = 0
        #: Offset of the last replayed frame (0: no replay). Replayed frames sit at the
        #: front of ``frames`` with consecutive offsets, and do not count against ``limit``.
        self.replay_end = 0
        #: Called once when the queue overflows, so that the WebSocket endpoint can stop
        #: a send that is stuck behind a full TCP buffer.
        self.on_overflow: Callable[[], None] | None = None

    def live_backlog(self) -> int:
        """Frames waiting to be sent, not counting replayed ones still queued."""
        frames = self.frames
        backlog = len(frames)
        if backlog and frames[0][0] <= self.replay_end:
            backlog -= self.replay_end - frames[0][0] + 1
        return backlog

    def push(self, frame: str, offset: int) -> None:
        if self.overflowed or self.closed:
            return
        # (len(frames) first: it bounds the live backlog and is all a subscriber that
        # did not resume needs.)
        if len(self.frames) >= self.limit and self.live_backlog() >= self.limit:
            self.overflowed = True
            self.frames.clear()
            self.channel.overflows += 1
            self.channel.hub.overflows += 1
            log.warning(
                "peer %s: a subscriber fell %d messages behind and is cut off",
                self.channel.peer_id,
                self.limit,
            )
            if self.on_overflow is not None:
                self.on_overflow()
        else:
            self.frames.append((offset, frame))
        self.wakeup.set()


@dataclass(slots=True)
class Subscription:
    """What :meth:`Hub.subscribe` hands the WebSocket endpoint."""

    subscriber: Subscriber
    #: A ``gap`` frame to send first, when the client missed more than is held.
    gap: dict[str, Any] | None
    epoch: str
    offset: int


@dataclass(slots=True, eq=False)
class PeerChannel:
    peer_id: str
    settings: PeerSettings
    hub: Hub
    epoch: str = field(default_factory=lambda: secrets.token_hex(4))
    offset: int = 0
    history: deque[HistoryEntry] = field(default_factory=deque)
    subscribers: set[Subscriber] = field(default_factory=set)
    #: entry id -> the node's message id, for messages waiting for a subscriber's reply.
    waiting: dict[str, int] = field(default_factory=dict)
    received: int = 0
    overflows: int = 0
    registered_at: float = field(default_factory=time.time)
    #: Registered with --peer at start rather than through the API: not persisted.
    ephemeral: bool = False

    def append(self, message: PeerMessage) -> HistoryEntry:
        self.offset += 1
        self.received += 1
        entry = HistoryEntry(self.peer_id, self.epoch, self.offset, message)
        history = self.history
        history.append(entry)
        while len(history) > self.settings.history:
            history.popleft()
        if self.subscribers:
            frame = entry.frame
            for subscriber in self.subscribers:
                subscriber.push(frame, entry.offset)
        return entry


class Hub:
    """All peers of one gateway and the glue to the DMQ node."""

    def __init__(
        self,
        server: DmqServer,
        store: PeerStore | None = None,
        *,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
    ) -> None:
        self.server = server
        self.store = store
        self.queue_limit = queue_limit
        self.channels: dict[str, PeerChannel] = {}
        self.overflows = 0
        #: Tags message ids of this process, so ids from before a restart never clash.
        self.instance = secrets.token_hex(4)
        self.listeners: list[Callable[[str, PeerMessage], None]] = []
        server.event_listeners.append(self._on_event)

    @property
    def reply_timeouts(self) -> int:
        """Subscriber replies that did not come in time: the node times them out."""
        return self.server.node.stats.reply_timeouts

    def _on_event(self, event: Event) -> None:
        if isinstance(event, PeerReplyTimedOut):
            channel = self.channels.get(event.peer_id)
            if channel is not None:
                for entry_id, message_id in list(channel.waiting.items()):
                    if message_id == event.message_id:
                        del channel.waiting[entry_id]

    def _reply_timeout(self, settings: PeerSettings) -> float:
        # The node refuses a wait longer than Timer F (the sender gives up then).
        return min(settings.reply_timeout, self.server.config.timers.timer_f_value)

    # ------------------------------------------------------------------ registry

    def load(self) -> int:
        """Register every peer the store remembers; return how many."""
        if self.store is None:
            return 0
        peers = self.store.load()
        for peer_id, settings in peers.items():
            self.register(peer_id, settings, persist=False)
        return len(peers)

    def register(
        self,
        peer_id: str,
        settings: PeerSettings,
        *,
        persist: bool = True,
        ephemeral: bool = False,
    ) -> tuple[PeerChannel, bool]:
        """Register or update a peer; return it and whether it is new.

        Raises the core's ReservedPeerError for the notification channel and
        ValueError for an invalid peer id.
        """
        channel = self.channels.get(peer_id)
        created = channel is None
        if channel is None:
            channel = PeerChannel(peer_id, settings, self, ephemeral=ephemeral)
            self.server.register_peer(
                peer_id,
                self._handler(channel),
                description=settings.description,
                reply_timeout=self._reply_timeout(settings),
            )
            self.channels[peer_id] = channel
        else:
            channel.settings = settings
            channel.ephemeral = channel.ephemeral and ephemeral
            while len(channel.history) > settings.history:
                channel.history.popleft()
            self.server.update_peer(
                peer_id,
                description=settings.description,
                reply_timeout=self._reply_timeout(settings),
            )
        if persist and not channel.ephemeral:
            self._save()
        return channel, created

    def unregister(self, peer_id: str) -> bool:
        channel = self.channels.pop(peer_id, None)
        if channel is None:
            return False
        self.server.unregister_peer(peer_id)  # answers its waiting messages 404
        channel.waiting.clear()
        for subscriber in list(channel.subscribers):
            subscriber.closed = True
            subscriber.wakeup.set()
        self._save()
        return True

    def _save(self) -> None:
        if self.store is not None:
            self.store.save({p: c.settings for p, c in self.channels.items() if not c.ephemeral})

    # ------------------------------------------------------------------ incoming

    def _handler(self, channel: PeerChannel) -> Callable[[PeerMessage], PeerReply | None]:
        def handler(message: PeerMessage) -> PeerReply | None:
            for listener in self.listeners:
                listener(channel.peer_id, message)
            if channel.settings.reply is ReplyMode.AUTO:
                channel.append(message)
                if not channel.subscribers and log.isEnabledFor(logging.INFO):
                    log.info(
                        "%s from %s (%s, %d bytes): %s",
                        channel.peer_id,
                        message.sender,
                        message.content_type,
                        len(message.body),
                        message.body[:256].decode("utf-8", "replace"),
                    )
                return _OK
            if not channel.subscribers:
                return PeerReply(480, "Temporarily Unavailable")
            entry = channel.append(message)
            channel.waiting[entry.id] = message.id
            return None  # the node waits for Hub.reply, or answers 408 itself

        return handler

    def reply(self, peer_id: str, message_id: str, reply: PeerReply) -> bool:
        """A subscriber answered a message; False when nothing waits for that id."""
        channel = self.channels.get(peer_id)
        if channel is None:
            return False
        node_message_id = channel.waiting.pop(message_id, None)
        if node_message_id is None:
            return False
        try:
            self.server.reply(node_message_id, reply)
        except (ReplyNotPendingError, NodeStoppedError):
            return False
        return True

    # ------------------------------------------------------------------ subscribers

    def subscribe(self, peer_id: str, since: int | None, epoch: str | None) -> Subscription:
        """Register a subscriber; queue what it missed first (no await: no gap)."""
        channel = self.channels[peer_id]
        subscriber = Subscriber(channel, self.queue_limit)
        gap: dict[str, Any] | None = None
        if since is not None:
            history = channel.history
            oldest = history[0].offset if history else channel.offset + 1
            if epoch is not None and epoch != channel.epoch:
                # Another epoch: the offsets the client knows mean nothing here.
                gap = {
                    "type": "gap",
                    "reason": "epoch changed (the gateway restarted); history restarts",
                    "epoch": channel.epoch,
                    "client_epoch": epoch,
                    "from": None,
                    "to": oldest - 1,
                }
                start = 0
            else:
                start = since
                if since + 1 < oldest:
                    gap = {
                        "type": "gap",
                        "reason": "messages no longer held in the peer's history",
                        "epoch": channel.epoch,
                        "from": since + 1,
                        "to": oldest - 1,
                    }
            # Replay does not count against the live queue limit.
            subscriber.sent_offset = start
            for entry in history:
                if entry.offset > start:
                    subscriber.frames.append((entry.offset, entry.frame))
            if subscriber.frames:
                subscriber.replay_end = subscriber.frames[-1][0]
                subscriber.wakeup.set()
        else:
            subscriber.sent_offset = channel.offset
        channel.subscribers.add(subscriber)
        return Subscription(subscriber, gap, channel.epoch, channel.offset)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        subscriber.closed = True
        subscriber.channel.subscribers.discard(subscriber)

    @property
    def subscriber_count(self) -> int:
        return sum(len(c.subscribers) for c in self.channels.values())


_OK = PeerReply()
