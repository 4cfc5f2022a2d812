"""What ``dmq-gateway subscribe`` prints for each frame and each way it can end.

In-process, frame by frame: the ``subscribed`` header, message lines with offsets, gap
lines, and the resume command after each close code. (Against a real gateway, in
``tests/api/test_cli_client.py``.)
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close

from app.client import (
    DEFAULT_URL,
    Gateway,
    Position,
    close_error,
    guess_content_type,
    show_frame,
)

URL = "http://10.0.0.9:8000"


def show(
    frames: list[dict[str, Any]],
    position: Position,
    capsys: pytest.CaptureFixture[str],
    *,
    as_json: bool = False,
) -> tuple[int, list[str]]:
    gateway = Gateway(URL, None, as_json=as_json)
    messages = sum(show_frame(json.dumps(frame), gateway, position) for frame in frames)
    return messages, capsys.readouterr().out.splitlines()


def message(offset: int, epoch: str = "e1", body: str = "hi") -> dict[str, Any]:
    return {
        "type": "message",
        "offset": offset,
        "epoch": epoch,
        "id": f"m{offset}",
        "peer": "htable",
        "from": "sip:10.0.0.6:5060",
        "content_type": "application/json",
        "body": body,
    }


def test_the_subscribed_frame_heads_the_output(capsys: pytest.CaptureFixture[str]) -> None:
    position = Position("htable")
    subscribed = {"type": "subscribed", "peer": "htable", "epoch": "e1", "offset": 9, "since": 7}
    count, lines = show([subscribed, message(8), message(9)], position, capsys)
    assert count == 2
    assert lines == [
        "subscribed to htable, epoch e1, from offset 7, replaying up to offset 9",
        "#8 from sip:10.0.0.6:5060 (application/json): hi",
        "#9 from sip:10.0.0.6:5060 (application/json): hi",
    ]
    assert (position.epoch, position.offset) == ("e1", 9)


def test_live_subscribed_frame_and_no_message(capsys: pytest.CaptureFixture[str]) -> None:
    position = Position("htable")
    subscribed = {"type": "subscribed", "peer": "htable", "epoch": "e1", "offset": 4, "since": 4}
    assert show([subscribed], position, capsys) == (
        0,
        ["subscribed to htable, epoch e1, from offset 4"],
    )
    # Nothing received yet: resuming starts where the subscription did.
    assert position.resume_command(Gateway(DEFAULT_URL, None), as_json=False) == (
        "to resume: dmq-gateway subscribe htable --since 4 --epoch e1"
    )


def test_without_a_subscribed_frame_the_first_message_tells_the_epoch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    position = Position("htable")
    count, lines = show([message(3)], position, capsys)
    assert (count, lines[0]) == (1, "subscribed to htable, epoch e1")
    assert (position.epoch, position.offset) == ("e1", 3)


def test_json_prints_every_frame_as_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    position = Position("htable")
    subscribed = {"type": "subscribed", "peer": "htable", "epoch": "e1", "offset": 0, "since": 0}
    frames = [subscribed, message(1)]
    count, lines = show(frames, position, capsys, as_json=True)
    assert count == 1
    assert [json.loads(line) for line in lines] == frames
    assert position.resume_command(Gateway(URL, None), as_json=True) == (
        f"to resume: dmq-gateway subscribe htable --since 1 --epoch e1 --url {URL} --json"
    )


def test_gap_lines(capsys: pytest.CaptureFixture[str]) -> None:
    position = Position("htable", epoch="old", offset=40)
    held = {
        "type": "gap",
        "reason": "messages no longer held in the peer's history",
        "epoch": "e1",
        "from": 3,
        "to": 5,
    }
    restarted = {
        "type": "gap",
        "reason": "epoch changed (the gateway restarted); history restarts",
        "epoch": "e2",
        "client_epoch": "old",
        "from": None,
        "to": 2,
    }
    count, lines = show([held], Position("htable", epoch="e1", offset=2), capsys)
    assert (count, lines) == (
        0,
        ["gap: messages no longer held in the peer's history (offsets 3..5 of epoch e1 are lost)"],
    )
    count, lines = show([restarted], position, capsys)
    assert lines == [
        "gap: epoch changed (the gateway restarted); history restarts (epoch old is gone, "
        "this is epoch e2; offsets 1..2 are no longer held)"
    ]
    # Offsets of the old epoch mean nothing now: a resume starts the new one over.
    assert (position.epoch, position.offset) == ("e2", 0)


@pytest.mark.parametrize(
    ("close", "error"),
    [
        (Close(1012, ""), f"the gateway at {URL} stopped (1012, service restart)"),
        (Close(1001, "bye"), f"the gateway at {URL} stopped (1001, bye)"),
        (Close(4004, "peer 'htable' was unregistered"), "peer 'htable' was unregistered"),
        (
            Close(4008, "fell 1000 messages behind; resume with since=12"),
            "the gateway cut this subscriber off: fell 1000 messages behind; resume with since=12",
        ),
        (Close(1011, "boom"), "the gateway closed the subscription (1011: boom)"),
    ],
)
def test_each_close_says_why_and_how_to_resume(close: Close, error: str) -> None:
    position = Position("htable", epoch="e1", offset=12, confirmed=True)
    closed = (
        ConnectionClosedOK(close, None)
        if close.code == 1001
        else ConnectionClosedError(close, None)
    )
    failure = close_error(closed, position, Gateway(URL, None))
    assert failure.message == error
    assert (
        failure.note == f"to resume: dmq-gateway subscribe htable --since 12 --epoch e1 --url {URL}"
    )


def test_a_cut_off_subscriber_resumes_where_the_gateway_says() -> None:
    position = Position("htable", epoch="e1", confirmed=True)  # not a message seen yet
    closed = ConnectionClosedError(Close(4008, "too slow; resume with since=31"), None)
    failure = close_error(closed, position, Gateway(DEFAULT_URL, None))
    assert failure.note == "to resume: dmq-gateway subscribe htable --since 31 --epoch e1"


def test_no_resume_for_a_peer_never_subscribed_to() -> None:
    closed = ConnectionClosedError(Close(4004, "no peer 'x' is registered"), None)
    failure = close_error(closed, Position("x", offset=0), Gateway(URL, None))
    assert (failure.message, failure.note) == ("no peer 'x' is registered", None)


def test_the_resume_command_quotes_what_a_shell_would_split() -> None:
    position = Position("it's", epoch="e1", offset=2)
    assert position.resume_command(Gateway(DEFAULT_URL, None), as_json=False) == (
        "to resume: dmq-gateway subscribe 'it'\"'\"'s' --since 2 --epoch e1"
    )


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"action": 2, "htname": "ht"}', "application/json"),
        (b"[1, 2]", "application/json"),
        (b"2", "application/json"),
        (b"k=v", "text/plain; charset=utf-8"),
        (b"caf\xc3\xa9", "text/plain; charset=utf-8"),
        (b"", "text/plain; charset=utf-8"),
        (b"\x00\xff binary", "application/octet-stream"),
    ],
)
def test_content_type_without_content_type(body: bytes, content_type: str) -> None:
    assert guess_content_type(body) == content_type
