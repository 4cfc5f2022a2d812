"""The gateway's peers: history, subscribers and replies, on top of a DmqServer.

Theory of operation
-------------------
Each registered peer is a :class:`PeerChannel`. A KDMQ request for it becomes a
:data:`HistoryEntry` with the next *offset* of the channel's *epoch* (a random tag
drawn when the peer is registered: offsets are only comparable within one epoch, which
is how a client learns that the history it knew is gone). With the sqlite history
store the epoch, the offsets and the history are kept in the state dir
(:mod:`app.gateway.store`) and a restart changes none of them; with the memory store
(or no state dir) every start draws a new epoch.

Stamped messages (``X-DMQ-Origin``, :mod:`app.gateway.origin`) go through the
:class:`~app.gateway.reorder.Reorderer` first:

* ``reply: auto`` - each origin's messages reach the history in sequence order, once;
  an early one is stored as *held* (so it too is safe before its 200) until the ones
  before it arrive or a reorder bound gives them up, which writes a *gap entry* into
  the history (a ``gap`` frame with ``origin``, live and on resume). A copy of a
  message already delivered or held is answered 200 and not delivered again. One
  loop timer (:meth:`Hub._arm`) releases what waited too long.
* ``reply: subscriber`` - delivered at once, deduplicated only: the subscriber's reply
  is the SIP reply and holding a message back would eat into its ``reply_timeout``. A
  repeated copy (the sender never got the first answer) is answered 200 without asking
  the subscriber again. The deduplication state (a watermark and the seqs seen above
  it, at most ``--reorder-limit`` per stream) is kept in the store with the message,
  so that a copy resent after a restart is recognised too.

Unstamped messages (Kamailio's) are delivered as they come, as before.

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
import contextlib
import json
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from itertools import islice
from typing import Any, Final, NamedTuple, TypeVar

from app.dmq.errors import NodeStoppedError, ReplyNotPendingError
from app.dmq.node import ExtraHeaders
from app.dmq.peers import ORIGIN_HEADER, PeerHandler, PeerInit, PeerMessage, PeerReply
from app.dmq.sip import SipUri
from app.gateway import bundle
from app.gateway.config import DEFAULT_QUEUE_LIMIT
from app.gateway.errors import PeerNotRegisteredError
from app.gateway.frames import GapFrame, SubscribedFrame
from app.gateway.models import PeerSettings, ReplyMode
from app.gateway.origin import MAX_SEQ, OriginStamp, build_origin, parse_origin
from app.gateway.reorder import (
    DEFAULT_MAX_HELD,
    DEFAULT_MAX_WAIT,
    Action,
    Delivery,
    Reorderer,
    Retired,
    StreamKey,
    Verdict,
)
from app.gateway.store import HeldRow, HistoryStore, StateStore
from app.transport.server import DmqServer

log = logging.getLogger("dmq.gateway")

#: Message ids remembered per subscriber-mode peer, so that a reply that comes after
#: its message was answered is told so rather than called unknown.
PENDING_IDS_KEPT = 4096

#: Sender URIs whose text is kept (a bus has a few nodes; more only clears it).
MAX_SENDER_TEXTS = 1024

#: History rows trimmed from the store in one statement (not one per message).
TRIM_BATCH = 256
#: Bytes of frames one subscriber may have queued: a replay page, or the live backlog.
DEFAULT_QUEUE_BYTES = 4 * 1024 * 1024


class Ending(Enum):
    """Why the gateway ended a subscription (the API turns each into a close code)."""

    OVERFLOW = "overflow"
    PEER_REMOVED = "peer removed"
    STOPPING = "stopping"


#: One entry of a peer's history: ``(offset, at, peer_id, epoch, sender, content_type,
#: body, gap)``; ``at`` is the Unix time it was stored (for ``history_max_age``), and
#: ``gap`` is set on a gap entry naming what an origin's stream lost for good.
#:
#: A plain tuple of strings, numbers and bytes on purpose: the cyclic collector stops
#: tracking such a tuple, whereas an object per message (a history holds thousands per
#: peer) would be walked by every full collection, a pause that grows with the
#: history and frees nothing. Its JSON frame is rendered when it is sent (once for all
#: live subscribers), so a message nobody is subscribed to costs no serialisation.
HistoryEntry = tuple[int, float, str, str, str, "str | None", bytes, "dict[str, Any] | None"]

_OFFSET: Final = 0
_AT: Final = 1
_BODY: Final = 6


def message_id(epoch: str, offset: int) -> str:
    """The id a message frame carries, and a subscriber's reply names."""
    return f"{epoch}-{offset}"


def render_frame(entry: HistoryEntry) -> str:
    """The JSON text frame of a history entry."""
    offset, _, peer_id, epoch, sender, content_type, body, gap = entry
    if gap is not None:
        return GapFrame.model_validate(
            {"type": "gap", "epoch": epoch, "offset": offset, **gap}
        ).text()
    # Written directly: validating a model per message was a sixth of a receiving
    # gateway's CPU. The text is the model's own (tests/bundle/test_frames.py checks it
    # against MessageFrame for any input), which still documents the frame.
    try:
        text = body.decode("utf-8")
        encoding = ""
    except UnicodeDecodeError:
        text = base64.b64encode(body).decode("ascii")
        encoding = ',"encoding":"base64"'
    return (
        f'{{"type":"message","offset":{offset},"epoch":{_json(epoch)},'
        f'"id":{_json(f"{epoch}-{offset}")},"peer":{_json(peer_id)},'
        f'"from":{_json(sender)},'
        f'"content_type":{"null" if content_type is None else _json(content_type)},'
        f'"body":{_json(text)}{encoding}}}'
    )


#: A JSON string as pydantic writes it: UTF-8 kept, control characters escaped.
_json = json.JSONEncoder(ensure_ascii=False).encode


class _FrameQueue(deque[tuple[int, str]]):
    """A subscriber's frames, which counts their bytes and fetches the next page of a
    replay when the WebSocket endpoint takes the last frame queued."""

    def __init__(self, subscriber: Subscriber) -> None:
        super().__init__()
        self.subscriber = subscriber
        #: Characters of the frames queued (a frame is ASCII-safe JSON text mostly:
        #: characters stand for its bytes).
        self.size = 0
        #: Of which replayed frames.
        self.replay_size = 0

    def append(self, item: tuple[int, str], /) -> None:
        super().append(item)
        self.size += len(item[1])

    def append_replayed(self, item: tuple[int, str]) -> None:
        self.append(item)
        self.replay_size += len(item[1])

    def popleft(self) -> tuple[int, str]:
        item = super().popleft()
        self.size -= len(item[1])
        subscriber = self.subscriber
        if item[0] <= subscriber.replay_end:
            self.replay_size -= len(item[1])
        if not self and subscriber.replay_next is not None and subscriber.ending is None:
            subscriber.next_page()
        return item

    def clear(self) -> None:
        super().clear()
        self.size = self.replay_size = 0


class Subscriber:
    """One WebSocket client of a peer: a bounded queue of frames to send.

    The queue is bounded in frames (``limit``: what is still unsent from earlier turns
    of the event loop, so that one turn's burst is not taken for a slow client) and in
    bytes (``max_bytes``, always), replay included: a replay larger than either is
    queued one page at a time, the next page when the client has taken the last frame
    of the previous one, so that subscribers
    that resume from far back and do not read hold one page each, not the history.
    While a replay is paged, live messages are not queued: they are in the history,
    and the pages reach them; then the subscriber goes live.
    """

    __slots__ = (
        "carried",
        "channel",
        "ending",
        "frames",
        "limit",
        "max_bytes",
        "on_overflow",
        "replay_end",
        "replay_next",
        "sent_offset",
        "turn_open",
        "wakeup",
    )

    def __init__(
        self, channel: PeerChannel, limit: int, max_bytes: int = DEFAULT_QUEUE_BYTES
    ) -> None:
        self.channel = channel
        #: (offset, JSON text frame) waiting to be sent.
        self.frames = _FrameQueue(self)
        self.limit = limit
        self.max_bytes = max_bytes
        self.wakeup = asyncio.Event()
        #: Set once when the gateway ends the subscription; nothing is queued after.
        self.ending: Ending | None = None
        #: Offset of the last message handed to the WebSocket (what to resume after).
        self.sent_offset = 0
        #: Offset of the last replayed frame (0: no replay). Replayed frames sit at the
        #: front of ``frames`` with consecutive offsets, and do not count against ``limit``.
        self.replay_end = 0
        #: While a replay is paged: the offset the next page starts after (None: live).
        self.replay_next: int | None = None
        #: Called once when the queue overflows, so that the WebSocket endpoint can stop
        #: a send that is stuck behind a full TCP buffer.
        self.on_overflow: Callable[[], None] | None = None
        #: The live backlog the endpoint had not sent when this turn of the event loop
        #: first queued a frame, and whether that turn is still running (see push).
        self.carried = 0
        self.turn_open = False

    def live_backlog(self) -> int:
        """Frames waiting to be sent, not counting replayed ones still queued."""
        frames = self.frames
        backlog = len(frames)
        if backlog and frames[0][0] <= self.replay_end:
            backlog -= self.replay_end - frames[0][0] + 1
        return backlog

    def replay(self, after: int) -> None:
        """Queue the history after offset ``after``: its first page now, the others as
        the client reads."""
        self.replay_next = after
        self.next_page()

    def next_page(self) -> None:
        """Queue the next page of the replay: at most ``limit`` frames and ``max_bytes``
        (at least one frame); a gap frame first if the history was trimmed past where
        the previous page ended. The last page makes the subscriber live."""
        after = self.replay_next
        if after is None:
            return
        channel = self.channel
        history = channel.history
        frames = self.frames
        oldest = history[0][_OFFSET] if history else channel.offset + 1
        if after + 1 < oldest:
            gap = GapFrame.model_validate(
                {
                    "type": "gap",
                    "reason": "messages no longer held in the peer's history",
                    "epoch": channel.epoch,
                    "from": after + 1,
                    "to": oldest - 1,
                }
            )
            frames.append_replayed((oldest - 1, gap.text()))
            after = oldest - 1
        # History offsets are consecutive: the page starts at a known index.
        start = after + 1 - oldest
        size = 0
        count = 0
        for entry in islice(history, max(start, 0), None):
            offset = entry[_OFFSET]
            if offset <= after:
                continue
            # Rendered for this page only: holding the frames of a whole replayed
            # history would hold them all.
            frame = render_frame(entry)
            if count and (count >= self.limit or size + len(frame) > self.max_bytes):
                break
            frames.append_replayed((offset, frame))
            size += len(frame)
            count += 1
            after = offset
        if frames:
            self.replay_end = frames[-1][0]
            self.wakeup.set()
        self.replay_next = None if after >= channel.offset else after

    def end(self, why: Ending) -> None:
        if self.ending is None:
            self.ending = why
        self.wakeup.set()

    def _end_turn(self) -> None:
        self.turn_open = False

    def push(self, frame: str, offset: int) -> None:
        if self.ending is not None or self.replay_next is not None:
            # (While a replay is paged, its pages will reach this message.)
            return
        frames = self.frames
        live_bytes = frames.size - frames.replay_size
        # Behind means frames the endpoint had a turn to send and did not: the backlog
        # carried into this turn of the event loop. The frames queued in one turn are a
        # burst the endpoint has not had a chance at yet (a bundle of a hundred, or a
        # reorderer releasing what a hole held back); the byte budget bounds them.
        if not self.turn_open:
            self.carried = self.live_backlog() if len(frames) >= self.limit else 0
            try:
                asyncio.get_running_loop().call_soon(self._end_turn)
                self.turn_open = True
            except RuntimeError:  # no loop (a unit test): every push is a turn
                pass
        if self.carried >= self.limit or (live_bytes and live_bytes + len(frame) > self.max_bytes):
            frames.clear()
            self.channel.overflows += 1
            log.warning(
                "peer %s: a subscriber fell %d messages or %d bytes behind and is cut off",
                self.channel.peer_id,
                self.limit,
                self.max_bytes,
            )
            self.end(Ending.OVERFLOW)
            if self.on_overflow is not None:
                self.on_overflow()
        else:
            frames.append((offset, frame))
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
    #: Subscriber mode: message id -> the core's id of the message, for the replies
    #: (for an entry of a bundle: the bundle's wait, and the entry's index).
    pending: OrderedDict[str, int | tuple[_BundleReplies, int]] = field(default_factory=OrderedDict)
    received: int = 0
    overflows: int = 0
    registered_at: float = field(default_factory=time.time)
    #: Registered with --peer at start rather than through the API: not persisted.
    ephemeral: bool = False
    #: Where its history is kept (None: in memory only).
    store: StateStore | None = None
    #: Highest offset trimmed from the store (the store is trimmed in batches).
    trimmed: int = 0
    #: Bytes of the bodies in ``history`` (for ``history_bytes``).
    history_bytes: int = 0

    def append(
        self,
        sender: str,
        content_type: str | None,
        body: bytes,
        gap: dict[str, Any] | None = None,
        stream: tuple[StreamKey, int] | None = None,
    ) -> HistoryEntry:
        """Add a message (or a gap entry) to the history and fan it out.

        With a store, the entry is handed to it here (buffered, and written as one page
        with the rest of the transaction); the caller commits before the node answers
        200. ``stream``: the ordered stream and seq the message was delivered
        as; the row records them, which is how the store knows each stream's next seq
        without a second write per message.
        """
        self.offset += 1
        if gap is None:
            self.received += 1
        now = time.time()
        entry: HistoryEntry = (
            self.offset,
            now,
            self.peer_id,
            self.epoch,
            sender,
            content_type,
            body,
            gap,
        )
        if self.store is not None:
            self.store.append(
                self.peer_id,
                self.epoch,
                self.offset,
                now,
                sender,
                content_type,
                body,
                gap,
                None if stream is None else (*stream[0], stream[1]),
            )
        self.history.append(entry)
        self.history_bytes += len(body)
        self.retain(now)
        if self.subscribers:
            frame = render_frame(entry)
            for subscriber in self.subscribers:
                subscriber.push(frame, self.offset)
        return entry

    def retain(self, now: float, *, flush: bool = False) -> None:
        """Apply ``history``, ``history_max_age`` and ``history_bytes``: in memory at
        once, in the store once a batch has built up (or with ``flush``). The byte
        bound keeps the newest entry however large, so that it can still be replayed
        to a subscriber that was one message behind."""
        history = self.history
        settings = self.settings
        limit = settings.history
        max_age = settings.history_max_age
        max_bytes = settings.history_bytes
        oldest = now - max_age if max_age > 0 else 0.0
        while history and (
            len(history) > limit
            or history[0][_AT] < oldest
            or (self.history_bytes > max_bytes and len(history) > 1)
        ):
            self.history_bytes -= len(history.popleft()[_BODY])
        if self.store is None:
            return
        dropped = history[0][_OFFSET] - 1 if history else self.offset
        if dropped > self.trimmed and (flush or dropped - self.trimmed >= TRIM_BATCH):
            self.store.trim(self.peer_id, self.epoch, dropped)
            self.trimmed = dropped


class Hub:
    """All peers of one gateway: their histories, subscribers and replies."""

    def __init__(
        self,
        server: DmqServer,
        store: StateStore | None = None,
        *,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        history_store: HistoryStore = HistoryStore.SQLITE,
        reorder_wait: float = DEFAULT_MAX_WAIT,
        reorder_limit: int = DEFAULT_MAX_HELD,
    ) -> None:
        self.server = server
        self.store = store
        #: Keeps histories and reorder state (else only the registry and our stamps).
        self.durable = store is not None and history_store is HistoryStore.SQLITE
        self.queue_limit = queue_limit
        #: Bytes of frames a subscriber may have queued, replay pages included.
        self.queue_bytes = DEFAULT_QUEUE_BYTES
        self.channels: dict[str, PeerChannel] = {}
        self.reorderer: Reorderer[_Held] = Reorderer(reorder_wait, reorder_limit)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.duplicates = 0
        #: Our own origin stamps: the epoch and the last seq per peer.
        self.origin = str(server.node.nodes.local.uri)
        self.origin_epoch = secrets.token_hex(4)
        self._origin_seq: dict[str, int] = {}
        #: Group commit: core ids of the messages written in the open store
        #: transaction, answered 200 once it is committed (:meth:`flush`).
        self._batch: list[int] = []
        self._batch_open = False
        #: Our stamps of the open batch, the last seq per stream, written with it; their
        #: messages wait in the node (output held) until that commit, and the requests
        #: that sent them on ``_stamp_waiters``.
        self._stamps: dict[str, int] = {}
        self._stamp_waiters: list[asyncio.Future[None]] = []
        #: Seqs a failed commit left unwritten: every stamp commits on its own (and
        #: fails its request) until they are written.
        self._stamps_unsaved: dict[str, int] = {}
        #: While True, the end-of-turn commit waits (:meth:`hold_commits`), and
        #: ``_flush_deferred`` says one is due when they are released.
        self._commits_held = False
        self._flush_deferred = False
        #: Holds for a checkpoint's last pass, and those that ended before it did.
        self.checkpoint_holds = 0
        self.checkpoint_holds_cut = 0
        #: Batches committed, and messages answered through them (metrics, tests).
        self.batches = 0
        self.batched = 0
        #: Taps by peer id: typed mirrors of Kamailio's own peers (htable, usrloc,
        #: dialog), which see every message of their peer id beside any raw peer.
        self.taps: dict[str, _Tap] = {}
        #: Bundles sent (by the gateway) and received, for /metrics.
        self.bundle_stats = bundle.BundleStats()
        #: Sender URI -> its text (see _sender_text).
        self._senders: dict[SipUri, str] = {}

    # ------------------------------------------------------------------ registry

    def load(self) -> int:
        """Register every peer the store remembers, with its history and the receiver's
        stream state; return how many.

        A stored peer the node now refuses (a reply timeout beyond a shorter Timer F)
        is logged and left out, rather than stopping the gateway.
        """
        store = self.store
        if store is None:
            return 0
        self.origin_epoch = store.origin_epoch()
        self._origin_seq = store.load_origin_seqs()
        loaded = 0
        for peer_id, stored in store.load_peers().items():
            try:
                channel, _ = self.register(peer_id, stored.settings, persist=False)
            except Exception as exc:
                log.error("stored peer %s is not registered again: %s", peer_id, exc)
                continue
            loaded += 1
            if not self.durable:
                continue
            channel.epoch = stored.epoch
            channel.trimmed = stored.trimmed
            rows = store.load_history(
                peer_id, stored.epoch, stored.settings.history, after=stored.trimmed
            )
            channel.history.extend(
                (r.offset, r.at, peer_id, r.epoch, r.sender, r.content_type, r.body, r.gap)
                for r in rows
            )
            channel.history_bytes = sum(len(r.body) for r in rows)
            channel.offset = max(store.latest_offset(peer_id, stored.epoch), stored.trimmed)
            channel.retain(time.time(), flush=True)
        if self.durable:
            for stream, next_seq in store.load_streams():
                if stream[0] in self.channels:
                    self.reorderer.restore(StreamKey(*stream), next_seq)
            for stream, seqs in store.load_seen().items():
                if stream[0] in self.channels:
                    self.reorderer.restore_unordered(StreamKey(*stream), seqs)
            for row in store.load_held():
                if row.peer_id in self.channels:
                    key = StreamKey(row.peer_id, row.origin, row.origin_epoch, row.to)
                    held = _Held(row.sender, row.content_type, row.body)
                    self.reorderer.restore_held(key, row.seq, held, row.arrived)
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
        self.flush()
        channel = self.channels.get(peer_id)
        created = channel is None
        # Only a subscriber-mode handler defers its answer, so only there does the
        # reply timeout matter (and must fit within Timer F).
        reply_timeout = settings.reply_timeout if settings.reply is ReplyMode.SUBSCRIBER else None
        if channel is None:
            channel = PeerChannel(peer_id, settings, ephemeral=ephemeral)
            if self.durable and not ephemeral:
                channel.store = self.store
            tap = self.taps.get(peer_id)
            self.server.register_peer(
                peer_id,
                self._handler(channel),
                init=tap.init if tap is not None else None,
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
            if self.durable and not channel.ephemeral:
                channel.store = self.store
            channel.retain(time.time(), flush=True)
        if persist and not channel.ephemeral and self.store is not None:
            self.store.save_peer(peer_id, settings, channel.epoch)
        return channel, created

    def unregister(self, peer_id: str) -> None:
        """Unregister a peer: the core answers every reply still pending, and the
        subscribers are let go; its history and stream state go too."""
        self.flush()
        channel = self.channel(peer_id)
        del self.channels[peer_id]
        self.server.unregister_peer(peer_id)
        tap = self.taps.get(peer_id)
        if tap is not None:  # the typed mirror answers its peer id alone again
            self.server.register_peer(
                peer_id, self._tap_alone(tap.handler), init=tap.init, description=tap.description
            )
        self.reorderer.forget_peer(peer_id)
        for subscriber in list(channel.subscribers):
            subscriber.end(Ending.PEER_REMOVED)
        if self.store is not None and not channel.ephemeral:
            self.store.delete_peer(peer_id)

    def attach_tap(
        self,
        peer_id: str,
        handler: PeerHandler,
        *,
        init: PeerInit | None = None,
        description: str = "",
    ) -> None:
        """Let ``handler`` see every message of ``peer_id``, whether or not a raw peer
        of that id is registered.

        With no raw peer the tap is the peer: its reply is the SIP reply (a typed
        mirror answers as Kamailio would, 400 to a body it cannot read). With a raw
        peer, the tap sees each message first and the raw peer answers it, so a raw
        subscriber still gets every body exactly as sent. ``init`` runs once the node
        first reaches another node (a mirror asks one node for a sync then).
        """
        if peer_id in self.taps:
            raise ValueError(f"peer {peer_id!r} already has a tap")
        self.taps[peer_id] = _Tap(handler, init, description)
        if peer_id not in self.channels:
            self.server.register_peer(
                peer_id, self._tap_alone(handler), init=init, description=description
            )

    # ------------------------------------------------------------------ our stamps

    def stamped(self, peer_id: str, to: str, start: Callable[[ExtraHeaders], _R]) -> _R:
        """Call ``start`` with the ``X-DMQ-Origin`` header of the next message we
        originate for a peer (a broadcast, or with ``to`` a send to that node).

        The seq is committed before the message leaves, so a restart never reuses one,
        even after a ``kill -9`` right after the send; a send the node refuses uses up
        no seq (so it leaves no hole a receiver would wait for).

        On the loop, the message joins the turn's group commit: the node's output is
        held, ``start`` builds the message (and the node refuses it or not) at once, and
        :meth:`flush` writes the turn's last seq per stream in one transaction, then lets
        the held messages go, in order. :meth:`committed` waits for that. Without a loop
        (or after a failed commit) the seq is committed on its own before ``start``.
        """
        return self.stamped_run(
            peer_id, to, 1, lambda seq: start(((ORIGIN_HEADER, self.origin_value(seq, to)),))
        )

    def origin_value(self, seq: int, to: str = "", count: int = 1) -> str:
        """Our ``X-DMQ-Origin`` value for ``seq`` (with ``count`` > 1: a bundle's,
        covering seqs ``seq .. seq + count - 1``)."""
        value = build_origin(self.origin, self.origin_epoch, seq, to)
        return value if count == 1 else bundle.with_count(value, count)

    def stamped_run(self, peer_id: str, to: str, count: int, start: Callable[[int], _R]) -> _R:
        """Like :meth:`stamped` for ``count`` consecutive messages: ``start`` gets the
        first of their seqs and sends them all (singly, bundled, or both), before
        anything else is stamped for the stream. A ``start`` that raises uses up none
        of them, so it must raise before it sends any (the caller checks first)."""
        stream = f"{peer_id}>{to}" if to else peer_id
        previous = self._origin_seq.get(stream, 0)
        seq = previous + count
        store = self.store
        if store is None:
            result = start(previous + 1)
        elif not self._stamps_unsaved and self._open_batch():
            self.server.hold_output()
            result = start(previous + 1)  # a refusal raises here: the seqs are not used
            self._stamps[stream] = seq
        else:
            self.flush()  # (the open batch goes in the same commit's stead)
            unsaved = self._stamps_unsaved
            with store.transaction():
                store.save_origin_seqs({**unsaved, stream: seq}.items())
            unsaved.clear()
            try:
                result = start(previous + 1)
            except BaseException:
                store.save_origin_seqs(((stream, previous),))
                raise
        self._origin_seq[stream] = seq
        return result

    def committed(self) -> asyncio.Future[None] | None:
        """What a request that stamped a message waits on before it answers, so that
        an answer still means the message has left: the open batch's commit, or
        ``None`` when nothing waits for one. One future per caller: a cancelled
        request cancels its own alone."""
        if not self._stamps:
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stamp_waiters.append(future)
        return future

    # ------------------------------------------------------------------ incoming

    def _handler(self, channel: PeerChannel) -> Callable[[PeerMessage], PeerReply | None]:
        taps = self.taps

        def handler(message: PeerMessage) -> PeerReply | None:
            if message.content_type == bundle.CONTENT_TYPE:
                return self._on_bundle(channel, message)
            if taps:
                tap = taps.get(channel.peer_id)
                if tap is not None:
                    try:
                        tap.handler(message)  # the raw peer's answer is the reply
                    except Exception:
                        log.exception("tap of peer %s failed", channel.peer_id)
            stamp = parse_origin(message.origin)
            if channel.settings.reply is ReplyMode.AUTO:
                # With a durable history the 200 waits for the batch's commit.
                batched = channel.store is not None and self._open_batch()
                if stamp is None:
                    if batched or channel.store is None:
                        # One buffered row written with the batch, or a history kept
                        # in memory only: no store transaction of its own.
                        channel.append(
                            self._sender_text(message.sender), message.content_type, message.body
                        )
                    else:
                        self._commit(
                            lambda: channel.append(
                                str(message.sender), message.content_type, message.body
                            ),
                            one_statement=True,
                        )
                else:
                    self._offer(
                        channel,
                        StreamKey(channel.peer_id, stamp.origin, stamp.epoch, stamp.to),
                        stamp.seq,
                        str(message.sender),
                        message.content_type,
                        message.body,
                    )
                if not channel.subscribers and log.isEnabledFor(logging.INFO):
                    log.info(
                        "%s from %s (%s, %d bytes): %s",
                        channel.peer_id,
                        message.sender,
                        message.content_type,
                        len(message.body),
                        message.body[:256].decode("utf-8", "replace"),
                    )
                if batched:
                    self._batch.append(message.id)
                    return None  # answered by flush(), once committed
                return _OK
            if not channel.subscribers:
                return _NO_SUBSCRIBER
            seen: tuple[StreamKey, int, int | None] | None = None
            if stamp is not None:
                key = StreamKey(channel.peer_id, stamp.origin, stamp.epoch, stamp.to)
                reorderer = self.reorderer
                before = reorderer.next_seq(key)
                if not reorderer.offer_unordered(key, stamp.seq):
                    self.duplicates += 1
                    return _OK  # delivered to a subscriber before: not asked again
                after = reorderer.next_seq(key)
                seen = (key, stamp.seq, after if after != before else None)
            store = self.store if self.durable else None

            def write() -> HistoryEntry:
                entry = channel.append(str(message.sender), message.content_type, message.body)
                if seen is not None and store is not None:
                    # Kept with the message, so a copy resent after a restart is
                    # recognised too.
                    store.mark_seen(*seen)
                return entry

            entry = self._commit(write)
            pending = channel.pending
            pending[message_id(channel.epoch, entry[_OFFSET])] = message.id
            if len(pending) > PENDING_IDS_KEPT:
                pending.popitem(last=False)
            return None  # a subscriber answers, through reply(); the core times it

        return handler

    def _sender_text(self, uri: SipUri) -> str:
        """A sender URI as history entries name it, written once per sending node
        rather than once per message."""
        text = self._senders.get(uri)
        if text is None:
            if len(self._senders) >= MAX_SENDER_TEXTS:
                self._senders.clear()
            text = self._senders[uri] = str(uri)
        return text

    # ------------------------------------------------------------------ bundles

    def _unbundle(self, message: PeerMessage) -> tuple[OriginStamp, list[bundle.Entry]] | PeerReply:
        """A bundle's stamp (its first entry's) and entries, or the 400 that says why
        it cannot be read."""
        stamp = parse_origin(message.origin)
        count = bundle.stamp_count(message.origin)
        if stamp is None or count is None:
            self.bundle_stats.malformed += 1
            return PeerReply(400, "Bad Request (a bundle needs an X-DMQ-Origin stamp with count)")
        if stamp.seq + count - 1 > MAX_SEQ:
            self.bundle_stats.malformed += 1
            return PeerReply(400, "Bad Request (bundle seqs beyond the largest seq)")
        try:
            entries = bundle.decode(message.body, count, max_body=self.server.node.max_body_size)
        except bundle.BundleError as exc:
            self.bundle_stats.malformed += 1
            return PeerReply(400, f"Bad Request ({exc})")
        self.bundle_stats.received(count)
        return stamp, entries

    def _tap_alone(self, handler: PeerHandler) -> PeerHandler:
        """A typed mirror that is its peer id's only handler: a bundle is handed to it
        one entry at a time, and answered with the first refusal (its reason naming
        the entry), else 200. The entries before a refused one were taken; those after
        it are not offered (the sender learns the bundle failed at that entry)."""

        def tap(message: PeerMessage) -> PeerReply | None:
            if message.content_type != bundle.CONTENT_TYPE:
                return handler(message)
            unpacked = self._unbundle(message)
            if isinstance(unpacked, PeerReply):
                return unpacked
            for index, entry in enumerate(_as_messages(message, *unpacked)):
                reply = handler(entry)
                if reply is not None and not 200 <= reply.code < 300:
                    return _entry_refused(index, reply)
            return _OK

        return tap

    def _on_bundle(self, channel: PeerChannel, message: PeerMessage) -> PeerReply | None:
        """A bundle for a raw peer: each entry is handled exactly as the single stamped
        message it stands for (taps, the reorderer, the history and subscribers, in
        this turn's page), and the bundle is answered once, after the commit, like
        one message. A bundle that cannot be read is refused whole (400), before
        anything of it is delivered."""
        unpacked = self._unbundle(message)
        if isinstance(unpacked, PeerReply):
            return unpacked
        stamp, entries = unpacked
        tap = self.taps.get(channel.peer_id) if self.taps else None
        if tap is not None:
            for single in _as_messages(message, stamp, entries):
                try:
                    tap.handler(single)  # the raw peer's answer is the reply
                except Exception:
                    log.exception("tap of peer %s failed", channel.peer_id)
        sender = str(message.sender)
        if channel.settings.reply is ReplyMode.AUTO:
            batched = channel.store is not None and self._open_batch()
            key = StreamKey(channel.peer_id, stamp.origin, stamp.epoch, stamp.to)
            seq = stamp.seq
            for entry in entries:
                self._offer(channel, key, seq, sender, entry.content_type, entry.body)
                seq += 1
            if not channel.subscribers and log.isEnabledFor(logging.INFO):
                log.info(
                    "%s from %s: a bundle of %d messages (%d bytes)",
                    channel.peer_id,
                    sender,
                    len(entries),
                    len(message.body),
                )
            if batched:
                self._batch.append(message.id)
                return None  # answered by flush(), once committed
            return _OK
        if not channel.subscribers:
            return _NO_SUBSCRIBER
        # Subscriber mode: every new entry waits for its subscriber's reply; the
        # bundle is answered when all have (the core times the whole bundle).
        key = StreamKey(channel.peer_id, stamp.origin, stamp.epoch, stamp.to)
        reorderer = self.reorderer
        store = self.store if self.durable else None
        waiting = _BundleReplies(message.id)
        new: list[tuple[int, bundle.Entry, tuple[StreamKey, int, int | None]]] = []
        for index, entry in enumerate(entries):
            seq = stamp.seq + index
            before = reorderer.next_seq(key)
            if not reorderer.offer_unordered(key, seq):
                self.duplicates += 1
                continue  # delivered to a subscriber before: not asked again
            after = reorderer.next_seq(key)
            new.append((index, entry, (key, seq, after if after != before else None)))
        if not new:
            return _OK

        def write() -> list[HistoryEntry]:
            written = []
            for _, entry, seen in new:
                written.append(channel.append(sender, entry.content_type, entry.body))
                if store is not None:
                    store.mark_seen(*seen)
            return written

        written = self._commit(write)
        waiting.left = len(written)
        pending = channel.pending
        for (index, _, _), row in zip(new, written, strict=True):
            pending[message_id(channel.epoch, row[_OFFSET])] = (waiting, index)
        while len(pending) > PENDING_IDS_KEPT:
            pending.popitem(last=False)
        return None

    def _commit(self, write: Callable[[], _R], *, one_statement: bool = False) -> _R:
        """Run ``write`` in one store transaction (committed before the 200): the open
        batch's when there is one, else a transaction of its own. In a batch, a write
        of several statements runs in a savepoint, so that one that fails halfway is
        undone alone; ``one_statement`` (a write that cannot fail halfway: history
        entries only, which the store buffers until the commit) spares the two
        statements a savepoint costs."""
        if not self.durable:
            return write()
        assert self.store is not None
        if self._batch_open:
            if one_statement:
                return write()
            with self.store.savepoint():
                return write()
        with self.store.transaction():
            return write()

    def _open_batch(self) -> bool:
        """Make sure a store transaction is open for this loop turn's messages and
        that :meth:`flush` will run once the turn's callbacks are done; False when
        there is no loop to defer to (the caller then commits on its own)."""
        if self._batch_open:
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        assert self.store is not None
        self.store.begin()
        self._batch_open = True
        loop.call_soon(self._flush_turn)
        return True

    def _flush_turn(self) -> None:
        """The end-of-turn commit of the batch, put off while commits are held."""
        if self._commits_held:
            self._flush_deferred = True
            return
        self.flush()

    def hold_commits(self) -> None:
        """Keep the open batch open past its turn, until :meth:`release_commits`.

        The WAL checkpoint's last pass runs meanwhile: a pass completes, and the WAL
        starts over instead of growing, only when no frame is committed while it runs.
        Messages keep arriving and join the batch (their rows are buffered, so the
        transaction reads nothing before its commit); their 200s wait for the release.
        Whatever commits outside a batch (the registry, :meth:`flush` called directly)
        is not held: it only makes that pass fall short."""
        self._commits_held = True
        self.checkpoint_holds += 1

    @property
    def awaiting_commit(self) -> int:
        """KDMQ messages of the open batch, not answered until it commits."""
        return len(self._batch)

    def release_commits(self) -> None:
        """End :meth:`hold_commits`: the batch that waited commits now."""
        self._commits_held = False
        if self._flush_deferred:
            self._flush_deferred = False
            self.flush()

    def flush(self) -> None:
        """Commit the open batch, then answer each of its messages: 200, or 500 when
        the commit failed (nothing is answered 200 before it is in the store). Our
        stamps of the turn are written in the same commit, and only then do their
        held messages leave and their requests go on.

        Runs from ``call_soon`` after the loop turn in which the batch opened, and
        before anything that must not wait for the batch (our own stamps, the peer
        registry, stopping)."""
        if not self._batch_open:
            return
        ids, self._batch = self._batch, []
        stamps, self._stamps = self._stamps, {}
        self._batch_open = False
        store = self.store
        assert store is not None
        reply = _OK
        try:
            if stamps:
                store.save_origin_seqs(stamps.items())
            store.commit()
        except Exception:
            log.exception(
                "the state store could not commit %d messages and %d origin seqs",
                len(ids),
                len(stamps),
            )
            try:
                store.rollback()
            except Exception:
                log.exception("the state store could not roll back")
            reply = _NOT_STORED
            if stamps:
                self._save_stamps_alone(stamps)
        if self.server.output_held:
            # The held messages leave now, in the order they were sent.
            self.server.release_output()
        if self._stamp_waiters:
            waiters, self._stamp_waiters = self._stamp_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        self.batches += 1
        self.batched += len(ids)
        # All answered in one pass, sent together; one answered meanwhile (its peer
        # unregistered) is skipped, and none is when the node has stopped.
        with contextlib.suppress(NodeStoppedError):
            self.server.reply_many(ids, reply)

    def _save_stamps_alone(self, stamps: dict[str, int]) -> None:
        """After a failed batch commit, try our seqs again on their own (what failed
        may have been a received message's rows). When that fails too the held
        messages still leave (their requests were answered, and the node has them in
        flight), the seqs are kept to be written before the next stamp, and each
        stamp commits alone, refusing its request, until they are."""
        assert self.store is not None
        try:
            with self.store.transaction():
                self.store.save_origin_seqs(stamps.items())
        except Exception:
            log.exception(
                "the origin seqs of %d streams could not be committed; every send "
                "commits its own until they are",
                len(stamps),
            )
            self._stamps_unsaved.update(stamps)

    def _offer(
        self,
        channel: PeerChannel,
        key: StreamKey,
        seq: int,
        sender: str,
        content_type: str | None,
        body: bytes,
    ) -> None:
        now = time.time()
        held = _Held(sender, content_type, body)
        verdict, actions = self.reorderer.offer(key, seq, held, now)
        if verdict is Verdict.DUPLICATE:
            self.duplicates += 1
        store = self.store if self.durable else None

        def write() -> None:
            if verdict is Verdict.HELD and store is not None:
                store.hold(
                    HeldRow(
                        key.peer_id,
                        key.origin,
                        key.epoch,
                        key.to,
                        seq,
                        now,
                        held.sender,
                        held.content_type,
                        held.body,
                    )
                )
            self._apply(actions)

        if verdict is not Verdict.DUPLICATE or actions:
            # Delivering in order only appends history rows, which cannot fail halfway:
            # no savepoint is needed for them.
            simple = verdict is not Verdict.HELD and all(
                type(action) is Delivery and not action.was_held for action in actions
            )
            self._commit(write, one_statement=simple)
        if verdict is Verdict.HELD:
            self._arm()

    def _apply(self, actions: list[Action[_Held]]) -> None:
        """Carry out what the reorderer decided (inside the caller's transaction)."""
        store = self.store if self.durable else None
        for action in actions:
            if isinstance(action, Retired):
                if store is not None:
                    store.forget_stream(action.key)
                continue
            channel = self.channels.get(action.key.peer_id)
            if channel is None:
                continue
            if isinstance(action, Delivery):
                item = action.item
                channel.append(
                    item.sender, item.content_type, item.body, stream=(action.key, action.seq)
                )
                if action.was_held and store is not None:
                    store.unhold(action.key, action.seq)
            else:
                log.warning(
                    "peer %s: messages %d..%d from %s (epoch %s) are lost: %s",
                    action.key.peer_id,
                    action.first,
                    action.last,
                    action.key.origin,
                    action.key.epoch,
                    action.reason,
                )
                channel.append(
                    action.key.origin,
                    None,
                    b"",
                    gap={
                        "reason": action.reason,
                        "origin": action.key.origin,
                        "origin_epoch": action.key.epoch,
                        "from": action.first,
                        "to": action.last,
                    },
                )

    def _arm(self) -> None:
        """Keep the one loop timer at the reorderer's next deadline."""
        deadline = self.reorderer.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, deadline - time.time()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        actions = self.reorderer.expire(time.time())
        if actions:
            self._commit(lambda: self._apply(actions))
        self._arm()

    def start_timer(self) -> None:
        """Arm the timer for messages held before a restart (call on the loop)."""
        self._arm()

    def stop_timer(self) -> None:
        self.flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None

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
        if isinstance(core_id, int):
            self.server.reply(core_id, reply)
            return
        waiting, index = core_id
        if not waiting.answer(index, reply):
            raise ReplyNotPendingError(
                f"message {message_id!r} of peer {peer_id!r} was answered already"
            )
        if waiting.left == 0:
            self.server.reply(waiting.core_id, waiting.reply())

    # ------------------------------------------------------------------ subscribers

    def subscribe(
        self, peer_id: str, since: int | None, epoch: str | None, queue_bytes: int | None = None
    ) -> Subscription:
        """Register a subscriber; queue what it missed first (no await: no gap).

        ``epoch`` goes with ``since`` (the API refuses it alone). ``queue_bytes``: the
        subscriber's budget in bytes (the hub's ``queue_bytes`` when None).
        """
        channel = self.channel(peer_id)
        channel.retain(time.time())
        subscriber = Subscriber(
            channel, self.queue_limit, self.queue_bytes if queue_bytes is None else queue_bytes
        )
        history = channel.history
        oldest = history[0][_OFFSET] if history else channel.offset + 1
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
            # Replayed in pages bounded like the live queue, as the client reads.
            # (From the oldest entry held: the gap frame above told what is missing.)
            if start < channel.offset:
                subscriber.replay(max(start, oldest - 1))
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


class _Tap(NamedTuple):
    """A typed mirror's hooks on one peer id (:meth:`Hub.attach_tap`)."""

    handler: PeerHandler
    init: PeerInit | None
    description: str


class _Held(NamedTuple):
    """A stamped message as the reorderer holds it until its turn."""

    sender: str
    content_type: str | None
    body: bytes


class _BundleReplies:
    """The subscribers' replies to the entries of one bundle (subscriber mode): the
    bundle is answered once all are in, with the first refusal (by entry index, its
    reason naming the entry), else the first entry's reply."""

    __slots__ = ("core_id", "left", "replies")

    def __init__(self, core_id: int) -> None:
        self.core_id = core_id
        self.left = 0
        self.replies: dict[int, PeerReply] = {}

    def answer(self, index: int, reply: PeerReply) -> bool:
        """Record one entry's reply; False when that entry was answered already."""
        if index in self.replies:
            return False
        self.replies[index] = reply
        self.left -= 1
        return True

    def reply(self) -> PeerReply:
        for index in sorted(self.replies):
            reply = self.replies[index]
            if not 200 <= reply.code < 300:
                return _entry_refused(index, reply)
        return self.replies[min(self.replies)]


def _as_messages(
    message: PeerMessage, stamp: OriginStamp, entries: list[bundle.Entry]
) -> list[PeerMessage]:
    """A bundle's entries as the single messages they stand for (entry *i* stamped
    ``seq + i``), for the handlers that take messages (taps)."""
    return [
        message._replace(
            body=entry.body,
            content_type=entry.content_type,
            origin=stamp._replace(seq=stamp.seq + index).header(),
        )
        for index, entry in enumerate(entries)
    ]


def _entry_refused(index: int, reply: PeerReply) -> PeerReply:
    """A bundle's answer when entry ``index`` was refused with ``reply``."""
    return PeerReply(
        reply.code,
        f"{reply.reason} (bundle entry {index})",
        reply.content_type,
        reply.body,
    )


_R = TypeVar("_R")

_OK = PeerReply()
_NO_SUBSCRIBER = PeerReply(480, "Temporarily Unavailable")
_NOT_STORED = PeerReply(500, "Server Internal Error")
