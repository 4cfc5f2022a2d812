"""ChangeStream: offsets, resume with since/epoch, gap frames, bounded queues.

The rules are the peers' subscribe path's (app.gateway.hub.Hub.subscribe); these tests
pin each case on the stream itself, frames decoded as a client reads them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.gateway.hub import Ending
from app.kamailio.frames import ChangeFrame
from app.kamailio.stream import ChangeStream, ChangeSubscription


def frames(subscription: ChangeSubscription) -> list[dict[str, Any]]:
    """Every frame the client would get now: the first frames, then the queue."""
    first = [json.loads(text) for text in subscription.first_frames]
    queued = [json.loads(text) for _, text in subscription.subscriber.frames]
    return first + queued


def publish(stream: ChangeStream, count: int) -> None:
    for n in range(count):
        stream.publish("set", f"k{n}", {"value": n, "type": "int", "expires": None}, "sip:x:1")


def test_live_subscription_starts_after_the_latest_change() -> None:
    stream = ChangeStream("htable/ht", clock=lambda: 100.0)
    publish(stream, 3)
    subscription = stream.subscribe(None, None)
    publish(stream, 1)
    got = frames(subscription)
    assert got[0] == {
        "type": "subscribed",
        "peer": "htable/ht",
        "epoch": stream.epoch,
        "offset": 3,
        "since": 3,
    }
    assert got[1] == {
        "type": "change",
        "offset": 4,
        "epoch": stream.epoch,
        "stream": "htable/ht",
        "event": "set",
        "key": "k0",
        "data": {"value": 0, "type": "int", "expires": None},
        "from": "sip:x:1",
        "at": 100.0,
    }
    assert len(got) == 2
    # The frame is what the documented model makes of it, byte for byte.
    text = subscription.subscriber.frames[0][1]
    assert ChangeFrame.model_validate_json(text).model_dump_json(by_alias=True) == text


def test_resume_replays_what_came_after_since_then_goes_live() -> None:
    stream = ChangeStream("s")
    publish(stream, 5)
    subscription = stream.subscribe(2, stream.epoch)
    publish(stream, 1)
    got = frames(subscription)
    assert got[0]["since"] == 2
    assert [f["offset"] for f in got[1:]] == [3, 4, 5, 6]


def test_resume_past_what_is_held_gets_a_gap_then_what_is_held() -> None:
    stream = ChangeStream("s", capacity=3)
    publish(stream, 10)  # 8, 9, 10 held
    got = frames(stream.subscribe(2, stream.epoch))
    assert got[1] == {
        "type": "gap",
        "reason": "changes no longer held by the stream",
        "epoch": stream.epoch,
        "from": 3,
        "to": 7,
    }
    assert [f["offset"] for f in got[2:]] == [8, 9, 10]


@pytest.mark.parametrize("case", ["other epoch", "beyond the latest"])
def test_another_epoch_restarts_the_stream_after_a_gap(case: str) -> None:
    stream = ChangeStream("s")
    publish(stream, 2)
    since, epoch = (1, "0badc0de") if case == "other epoch" else (50, None)
    got = frames(stream.subscribe(since, epoch))
    assert got[0]["since"] == 0
    assert got[1]["type"] == "gap" and got[1]["from"] is None and got[1]["to"] == 0
    assert got[1]["client_epoch"] == epoch
    assert [f["offset"] for f in got[2:]] == [1, 2]


def test_a_slow_subscriber_is_cut_off_and_the_others_are_not() -> None:
    stream = ChangeStream("s", queue_limit=3)
    cut: list[str] = []
    slow = stream.subscribe(None, None).subscriber
    slow.on_overflow = lambda: cut.append("cut")
    fast = stream.subscribe(None, None).subscriber
    for n in range(4):
        stream.publish("set", str(n))
        if fast.frames:
            fast.frames.popleft()  # fast reads each frame as it comes
    assert slow.ending is Ending.OVERFLOW and cut == ["cut"]
    assert fast.ending is None and stream.overflows == 1
    assert slow not in stream.subscribers and fast in stream.subscribers


def test_a_replay_larger_than_the_queue_limit_is_not_an_overflow() -> None:
    stream = ChangeStream("s", queue_limit=2)
    publish(stream, 10)
    subscription = stream.subscribe(0, stream.epoch)
    stream.publish("set", "live")
    assert subscription.subscriber.ending is None
    assert len(subscription.subscriber.frames) == 11


def test_end_all_ends_every_subscription() -> None:
    stream = ChangeStream("s")
    subscribers = [stream.subscribe(None, None).subscriber for _ in range(3)]
    stream.end_all(Ending.STOPPING)
    assert all(s.ending is Ending.STOPPING for s in subscribers)
    assert not stream.subscribers


class Ticking:
    """A clock that moves 0.25 s at every reading: each change has its own time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 0.25
        return self.now


def publish_mixed(stream: ChangeStream, count: int) -> None:
    """Changes of every shape a mirror publishes: str and int values, none, a delete,
    no sender, non-ASCII text."""
    for n in range(count):
        if n % 4 == 3:
            stream.publish("delete", f"k{n}", None, None)
        else:
            value: str | int = n if n % 2 else f"v{n}-é"
            kind = "int" if isinstance(value, int) else "str"
            stream.publish(
                "set", f"k{n}", {"value": value, "type": kind, "expires": None}, "sip:x:1"
            )


def test_a_late_subscriber_gets_the_frames_a_live_one_got() -> None:
    """Nobody subscribes while the first changes come, so they are rendered only when
    a client resumes: its frames are byte for byte those a client subscribed all
    along got (the time in each is that of publication, not of the resume)."""
    live_stream = ChangeStream("htable/ht", clock=Ticking())
    lazy_stream = ChangeStream("htable/ht", clock=Ticking())
    lazy_stream.epoch = live_stream.epoch
    live = live_stream.subscribe(None, None)
    publish_mixed(live_stream, 12)
    publish_mixed(lazy_stream, 12)
    late = lazy_stream.subscribe(0, lazy_stream.epoch)
    assert list(late.subscriber.frames) == list(live.subscriber.frames)
    assert [f["at"] for f in frames(late)[1:]] == [1000.25 + 0.25 * n for n in range(12)]
    # Later changes go to the resumed client as they come, rendered once for all.
    publish_mixed(live_stream, 3)
    publish_mixed(lazy_stream, 3)
    assert list(late.subscriber.frames) == list(live.subscriber.frames)


def test_resumes_after_a_mix_of_rendered_and_held_changes() -> None:
    """Changes published while someone listened and while nobody did, resumed from
    several offsets by several clients: each gets every change after its offset once,
    in order, identical to the eager stream's frames."""
    eager = ChangeStream("s", clock=Ticking(), lazy=False)
    lazy = ChangeStream("s", clock=Ticking())
    lazy.epoch = eager.epoch
    for stream in (eager, lazy):
        publish_mixed(stream, 5)
        listener = stream.subscribe(None, None).subscriber
        publish_mixed(stream, 5)
        listener.end(Ending.STOPPING)
        publish_mixed(stream, 5)
    for since in (0, 3, 7, 12, 15):
        want = list(eager.subscribe(since, eager.epoch).subscriber.frames)
        got = list(lazy.subscribe(since, lazy.epoch).subscriber.frames)
        assert got == want
        assert [offset for offset, _ in got] == list(range(since + 1, 16))


def test_nothing_is_rendered_while_nobody_subscribes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The JSON of a change is written only when someone reads it: with no subscriber
    a bus costs no frame per change; a resume renders each held change once."""
    import app.kamailio.stream as stream_module

    dumped: list[str] = []
    real = stream_module.json.dumps

    def counting(*args: Any, **kwargs: Any) -> str:
        text = real(*args, **kwargs)
        dumped.append(text)
        return text

    monkeypatch.setattr(stream_module.json, "dumps", counting)
    stream = ChangeStream("s")
    publish(stream, 50)
    assert dumped == []
    stream.subscribe(40, stream.epoch)
    assert len(dumped) == 10
    stream.subscribe(40, stream.epoch)  # rendered already: not again
    assert len(dumped) == 10
    stream.subscribe(0, stream.epoch)
    assert len(dumped) == 50
