"""A subscriber's replay comes in pages bounded in frames and bytes, one page queued at
a time, and live messages that arrive meanwhile come once, in order."""

from __future__ import annotations

import json

from app.gateway.hub import Ending, PeerChannel, Subscriber, render_frame
from app.gateway.models import PeerSettings

BODY = b"b" * 100


def _channel(history: int, messages: int) -> PeerChannel:
    channel = PeerChannel("paged", PeerSettings(history=history))
    for _ in range(messages):
        channel.append("sip:127.0.0.1:5", "text/plain", BODY)
    return channel


def _drain(subscriber: Subscriber, *, largest_queue: list[int]) -> list[dict[str, object]]:
    """Take every frame, as the WebSocket endpoint does; note the bytes queued."""
    taken = []
    frames = subscriber.frames
    while frames:
        largest_queue.append(frames.size)
        _, frame = frames.popleft()
        taken.append(json.loads(frame))
    return taken


def test_a_replay_larger_than_the_budget_is_queued_page_by_page() -> None:
    channel = _channel(history=1000, messages=50)
    frame_size = len(render_frame(channel.history[0]))
    subscriber = Subscriber(channel, limit=1000, max_bytes=5 * frame_size)
    channel.subscribers.add(subscriber)
    subscriber.replay(0)
    assert len(subscriber.frames) == 5
    assert subscriber.frames.size <= 5 * frame_size

    queued: list[int] = []
    first = json.loads(subscriber.frames.popleft()[1])
    # Messages that arrive while the replay is paged are reached through the history.
    for _ in range(3):
        channel.append("sip:127.0.0.1:5", "text/plain", BODY)
    rest = _drain(subscriber, largest_queue=queued)
    offsets = [first["offset"]] + [frame["offset"] for frame in rest]
    assert offsets == list(range(1, 54))
    assert max(queued) <= 5 * frame_size + 100
    # Then it is live: the next message is queued as it arrives.
    assert subscriber.replay_next is None
    channel.append("sip:127.0.0.1:5", "text/plain", BODY)
    assert [offset for offset, _ in subscriber.frames] == [54]


def test_a_page_never_holds_more_frames_than_the_queue_limit() -> None:
    channel = _channel(history=1000, messages=30)
    subscriber = Subscriber(channel, limit=4, max_bytes=1 << 20)
    subscriber.replay(10)
    assert [offset for offset, _ in subscriber.frames] == [11, 12, 13, 14]


def test_history_trimmed_while_a_replay_is_paged_becomes_a_gap_frame() -> None:
    channel = _channel(history=20, messages=20)
    frame_size = len(render_frame(channel.history[0]))
    subscriber = Subscriber(channel, limit=1000, max_bytes=2 * frame_size)
    channel.subscribers.add(subscriber)
    subscriber.replay(0)
    # 30 more arrive before the client reads: offsets 1-30 leave the history.
    for _ in range(30):
        channel.append("sip:127.0.0.1:5", "text/plain", BODY)
    frames = _drain(subscriber, largest_queue=[])
    assert [frame["offset"] for frame in frames[:2]] == [1, 2]
    gap = frames[2]
    assert (gap["type"], gap["from"], gap["to"]) == ("gap", 3, 30)
    assert [frame["offset"] for frame in frames[3:]] == list(range(31, 51))


def test_a_live_backlog_over_the_byte_budget_is_cut_off() -> None:
    channel = _channel(history=1000, messages=0)
    subscriber = Subscriber(channel, limit=1000, max_bytes=1000)
    channel.subscribers.add(subscriber)
    for _ in range(10):
        channel.append("sip:127.0.0.1:5", "text/plain", BODY)
    assert subscriber.ending is Ending.OVERFLOW
    assert channel.overflows == 1
    assert len(subscriber.frames) == 0


def test_a_burst_in_one_turn_is_not_a_slow_client_but_a_backlog_left_after_it_is() -> None:
    """One turn of the event loop may queue more frames than the limit (a reorderer
    releasing what a hole held back, bundles of a hundred): the endpoint has had no
    chance at them yet. What it leaves unsent into a later turn is what counts."""
    import asyncio

    async def run() -> tuple[Ending | None, int, Ending | None]:
        channel = _channel(history=1000, messages=0)
        subscriber = Subscriber(channel, limit=10, max_bytes=1 << 20)
        channel.subscribers.add(subscriber)
        for _ in range(50):  # one turn: five times the limit
            channel.append("sip:127.0.0.1:5", "text/plain", BODY)
        after_burst = subscriber.ending
        queued = len(subscriber.frames)
        await asyncio.sleep(0)  # the next turn; the endpoint took none of them
        channel.append("sip:127.0.0.1:5", "text/plain", BODY)
        return after_burst, queued, subscriber.ending

    after_burst, queued, after_next_turn = asyncio.run(run())
    assert (after_burst, queued) == (None, 50)
    assert after_next_turn is Ending.OVERFLOW


def test_a_burst_the_endpoint_drained_leaves_the_subscriber_live() -> None:
    import asyncio

    async def run() -> tuple[Ending | None, list[int]]:
        channel = _channel(history=1000, messages=0)
        subscriber = Subscriber(channel, limit=10, max_bytes=1 << 20)
        channel.subscribers.add(subscriber)
        for _ in range(50):
            channel.append("sip:127.0.0.1:5", "text/plain", BODY)
        await asyncio.sleep(0)
        taken = [json.loads(frame)["offset"] for _, frame in list(subscriber.frames)]
        subscriber.frames.clear()  # what the endpoint does, frame by frame
        for _ in range(5):
            channel.append("sip:127.0.0.1:5", "text/plain", BODY)
        taken += [offset for offset, _ in subscriber.frames]
        return subscriber.ending, taken

    ending, taken = asyncio.run(run())
    assert ending is None
    assert taken == list(range(1, 56))
