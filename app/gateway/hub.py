"""The gateway's peers: history, subscribers and replies, on top of a DmqServer.

Theory of operation
-------------------
Each registered peer is a :class:`PeerChannel`. A KDMQ request for it becomes a
:class:`HistoryEntry` with the next *offset* of the channel's *epoch* (a random tag
drawn when the channel is created in this process: offsets are only comparable within
one epoch, which is how a client learns that a restart lost the history it knew).

* ``reply: auto`` - the entry is stored, fanned out, and the node answers 200 at once.
* ``reply: subscriber`` - with no subscriber the node answers 480 and stores nothing;
  otherwise the entry is stored and fanned out, the handler defers the answer, and the
  first subscriber that answers with the entry's id decides the SIP reply. The core
  alone times the wait: it answers 408 at the peer's ``reply_timeout`` and refuses a
  reply that comes later, which the subscriber is told (one timeout, one counter).

Fan-out serialises each message to its JSON text frame once and appends the same
string to every subscriber's queue, so delivering to 1 000 clients costs 1 000 appends.
A queue holds at most ``queue_limit`` frames: a subscriber that falls that far behind is
cut off (:attr:`Ending.OVERFLOW`), counted, and can resume with
``since``. Nothing accepted is dropped silently: an entry is in the history (bounded by
``history``), and a client that resumes past what is still held is told so with a
``gap`` frame.

Subscribing with ``since`` replays, from the history, every entry after that offset and
then goes live; the replay and the registration happen in one synchronous step, so no
message can fall between them or come twice. A ``since`` beyond the peer's latest
offset can only come from another epoch (a client that resumes across a restart without
naming its epoch): it gets a gap and the whole history, never silence.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from app.dmq.errors import ReplyNotPendingError
from app.dmq.peers import PeerMessage, PeerReply
from app.gateway.config import DEFAULT_QUEUE_LIMIT
from app.gateway.errors import PeerNotRegisteredError
from app.gateway.frames import GapFrame, MessageFrame, SubscribedFrame
from app.gateway.models import PeerSettings, ReplyMode
from app.gateway.store import PeerStore
from app.transport.server import DmqServer

log = logging.getLogger("dmq.gateway")

#: Message ids remembered per subscriber-mode peer, so that a reply that comes after
#: its message was answered is told so rather than called unknown.
PENDING_IDS_KEPT = 4096


class Ending(Enum):
    """Why the gateway ended a subscription (the API turns each into a close code)."""

    OVERFLOW = "overflow"
    PEER_REMOVED = "peer removed"
    STOPPING = "stopping"


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
        fields: dict[str, object] = {
            "type": "message",
            "offset": self.offset,
            "epoch": self.epoch,
            "id": self.id,
            "peer": self.peer_id,
            "from": str(message.sender),
            "content_type": message.content_type,
        }
        try:
            fields["body"] = message.body.decode("utf-8")
        except UnicodeDecodeError:
            fields["body"] = base64.b64encode(message.body).decode("ascii")
            fields["encoding"] = "base64"
        return MessageFrame.model_validate(fields).text()


class Subscriber:
    """One WebSocket client of a peer: a bounded queue of frames to send."""

    __slots__ = (
        "channel",
        "ending",
        "frames",
        "limit",
        "on_overflow",
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
        #: Set once when the gateway ends the subscription; nothing is queued after.
        self.ending: Ending | None = None
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

    def end(self, why: Ending) -> None:
        if self.ending is None:
            self.ending = why
        self.wakeup.set()

    def push(self, frame: str, offset: int) -> None:
        if self.ending is not None:
            return
        # (len(frames) first: it bounds the live backlog and is all a subscriber that
        # did not resume needs.)
        if len(self.frames) >= self.limit and self.live_backlog() >= self.limit:
            self.frames.clear()
            self.channel.overflows += 1
            log.warning(
                "peer %s: a subscriber fell %d messages behind and is cut off",
                self.channel.peer_id,
                self.limit,
            )
            self.end(Ending.OVERFLOW)
            if self.on_overflow is not None:
                self.on_overflow()
        else:
            self.frames.append((offset, frame))
            self.wakeup.set()


@dataclass(slots=True)
class Subscription:
    """What :meth:`Hub.subscribe` hands the WebSocket endpoint: the frames to send
    before the queue (``subscribed``, then a ``gap`` when some is missing)."""

    subscriber: Subscriber
    first_frames: list[str]


@dataclass(slots=True, eq=False)
class PeerChannel:
    peer_id: str
    settings: PeerSettings
    epoch: str = field(default_factory=lambda: secrets.token_hex(4))
    offset: int = 0
    history: deque[HistoryEntry] = field(default_factory=deque)
    subscribers: set[Subscriber] = field(default_factory=set)
    #: Subscriber mode: message id -> the core's id of the message, for the replies.
    pending: OrderedDict[str, int] = field(default_factory=OrderedDict)
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
    """All peers of one gateway: their histories, subscribers and replies."""

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

    # ------------------------------------------------------------------ registry

    def load(self) -> int:
        """Register every peer the store remembers; return how many.

        A stored peer the node now refuses (a reply timeout beyond a shorter Timer F)
        is logged and left out, rather than stopping the gateway.
        """
        if self.store is None:
            return 0
        loaded = 0
        for peer_id, settings in self.store.load().items():
            try:
                self.register(peer_id, settings, persist=False)
            except Exception as exc:
                log.error("stored peer %s is not registered again: %s", peer_id, exc)
            else:
                loaded += 1
        return loaded

    def channel(self, peer_id: str) -> PeerChannel:
        channel = self.channels.get(peer_id)
        if channel is None:
            raise PeerNotRegisteredError(f"no peer {peer_id!r} is registered")
        return channel

    def register(
        self,
        peer_id: str,
        settings: PeerSettings,
        *,
        persist: bool = True,
        ephemeral: bool = False,
    ) -> tuple[PeerChannel, bool]:
        """Register or update a peer; return it and whether it is new.

        The core validates the peer id and the reply timeout (its errors say why and
        carry their HTTP status); nothing changes when it refuses.
        """
        channel = self.channels.get(peer_id)
        created = channel is None
        # Only a subscriber-mode handler defers its answer, so only there does the
        # reply timeout matter (and must fit within Timer F).
        reply_timeout = settings.reply_timeout if settings.reply is ReplyMode.SUBSCRIBER else None
        if channel is None:
            channel = PeerChannel(peer_id, settings, ephemeral=ephemeral)
            self.server.register_peer(
                peer_id,
                self._handler(channel),
                description=settings.description,
                reply_timeout=reply_timeout,
            )
            self.channels[peer_id] = channel
        else:
            self.server.update_peer(
                peer_id, description=settings.description, reply_timeout=reply_timeout
            )
            channel.settings = settings
            channel.ephemeral = channel.ephemeral and ephemeral
            while len(channel.history) > settings.history:
                channel.history.popleft()
        if persist and not channel.ephemeral:
            self._save()
        return channel, created

    def unregister(self, peer_id: str) -> None:
        """Unregister a peer: the core answers every reply still pending, and the
        subscribers are let go."""
        channel = self.channel(peer_id)
        del self.channels[peer_id]
        self.server.unregister_peer(peer_id)
        for subscriber in list(channel.subscribers):
            subscriber.end(Ending.PEER_REMOVED)
        self._save()

    def _save(self) -> None:
        if self.store is not None:
            self.store.save({p: c.settings for p, c in self.channels.items() if not c.ephemeral})

    # ------------------------------------------------------------------ incoming

    def _handler(self, channel: PeerChannel) -> Callable[[PeerMessage], PeerReply | None]:
        def handler(message: PeerMessage) -> PeerReply | None:
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
                return _NO_SUBSCRIBER
            entry = channel.append(message)
            pending = channel.pending
            pending[entry.id] = message.id
            if len(pending) > PENDING_IDS_KEPT:
                pending.popitem(last=False)
            return None  # a subscriber answers, through reply(); the core times it

        return handler

    def reply(self, peer_id: str, message_id: str, reply: PeerReply) -> None:
        """A subscriber answered message ``message_id`` of a peer.

        Raises :class:`~app.dmq.errors.ReplyNotPendingError` (saying what happened)
        when the message was already answered or is not known.
        """
        channel = self.channel(peer_id)
        core_id = channel.pending.get(message_id)
        if core_id is None:
            raise ReplyNotPendingError(
                f"message {message_id!r} of peer {peer_id!r} is not waiting for a reply "
                "(not a message of this epoch in subscriber mode, or long answered)"
            )
        self.server.reply(core_id, reply)

    # ------------------------------------------------------------------ subscribers

    def subscribe(self, peer_id: str, since: int | None, epoch: str | None) -> Subscription:
        """Register a subscriber; queue what it missed first (no await: no gap).

        ``epoch`` goes with ``since`` (the API refuses it alone).
        """
        channel = self.channel(peer_id)
        subscriber = Subscriber(channel, self.queue_limit)
        history = channel.history
        oldest = history[0].offset if history else channel.offset + 1
        gap: GapFrame | None = None
        start = channel.offset
        if since is not None:
            start = since
            if (epoch is not None and epoch != channel.epoch) or since > channel.offset:
                # Offsets of another epoch mean nothing here: replay the whole history.
                if epoch is not None and epoch != channel.epoch:
                    reason = "epoch changed (the gateway restarted); history restarts"
                else:
                    reason = (
                        f"since={since} is beyond the latest offset {channel.offset} of "
                        f"epoch {channel.epoch}: it belongs to another epoch (the gateway "
                        "restarted); history restarts"
                    )
                gap = GapFrame.model_validate(
                    {
                        "type": "gap",
                        "reason": reason,
                        "epoch": channel.epoch,
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
                        "reason": "messages no longer held in the peer's history",
                        "epoch": channel.epoch,
                        "from": since + 1,
                        "to": oldest - 1,
                    }
                )
            # Replay does not count against the live queue limit.
            for entry in history:
                if entry.offset > start:
                    subscriber.frames.append((entry.offset, entry.frame))
            if subscriber.frames:
                subscriber.replay_end = subscriber.frames[-1][0]
                subscriber.wakeup.set()
        subscriber.sent_offset = start
        channel.subscribers.add(subscriber)
        first = SubscribedFrame(
            type="subscribed", peer=peer_id, epoch=channel.epoch, offset=channel.offset, since=start
        )
        frames = [first.text()] if gap is None else [first.text(), gap.text()]
        return Subscription(subscriber, frames)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        subscriber.channel.subscribers.discard(subscriber)

    def end_subscriptions(self, why: Ending) -> None:
        for channel in self.channels.values():
            for subscriber in list(channel.subscribers):
                subscriber.end(why)


_OK = PeerReply()
_NO_SUBSCRIBER = PeerReply(480, "Temporarily Unavailable")
