"""The client commands (``dmq-gateway nodes``, ``peers``, ``broadcast``, ``send``,
``subscribe``) against two real gateways on one bus: ``a`` has the peer, ``b`` sends."""

from __future__ import annotations

import base64
import json
import os
import queue
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import cli
from app.api.schemas import GapFrame, MessageFrame
from harness.gateway import Gateway, clean_env, gateway_command
from harness.ports import free_port

PEER = "htable"


@dataclass(frozen=True)
class Pair:
    a: Gateway
    b: Gateway


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    workdir = tmp_path_factory.mktemp("cli")
    a = Gateway("a", workdir)
    b = Gateway("b", workdir, notify=[a])
    try:
        a.start()
        response = httpx.put(f"{a.url}/v1/peers/{PEER}", json={"description": "cli test"})
        assert response.status_code == 201, response.text
        b.start()
        deadline = time.monotonic() + 10
        while httpx.get(f"{b.url}/v1/health").json()["active_nodes"] < 1:
            assert time.monotonic() < deadline, "b never saw a as active"
            time.sleep(0.05)
        yield Pair(a, b)
    finally:
        b.stop()
        a.stop()


@pytest.fixture(autouse=True)
def no_dmq_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DMQ_URL", "DMQ_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _interruptible() -> None:
    """In the child: Ctrl-C's default back. A shell runs a background job with SIGINT
    ignored, and an ignored signal stays ignored across exec, so a test suite started
    in the background would otherwise send SIGINT to a client that cannot hear it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def client_process(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*gateway_command(), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
        preexec_fn=_interruptible,
    )


def test_nodes_table_and_json(pair: Pair, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "nodes", "--url", pair.b.url)
    assert (code, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.split() == ["URI", "STATUS", "LOCAL", "LAST", "REPLY", "FAILURES"]
    assert rows[0].split()[:3] == [pair.b.uri, "active", "yes"]
    assert rows[1].split()[:3] == [pair.a.uri, "active", "no"]
    assert rows[1].endswith(" 0") and "ago)" in rows[1]
    # Aligned: every column starts at the same place on every line.
    assert len({line.index("active") for line in rows}) == 1
    code, out, _ = run(capsys, "nodes", "--url", pair.b.url, "--json")
    assert code == 0
    assert [node["uri"] for node in json.loads(out)] == [pair.b.uri, pair.a.uri]


def test_peers(
    pair: Pair, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DMQ_URL", pair.a.url)
    code, out, _ = run(capsys, "peers")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:2] == ["PEER", "REPLY"]
    assert row.split()[:2] == [PEER, "auto"] and row.endswith("cli test")
    code, out, _ = run(capsys, "peers", "--json")
    assert [peer["peer_id"] for peer in json.loads(out)] == [PEER]
    code, out, _ = run(capsys, "peers", "--url", pair.b.url)
    assert (code, out) == (0, "no peers registered\n")


def test_broadcast_reaches_a_subscriber(pair: Pair, capsys: pytest.CaptureFixture[str]) -> None:
    subscriber = client_process("subscribe", PEER, "--url", pair.a.url, "--count", "2")
    try:
        deadline = time.monotonic() + 10
        while httpx.get(f"{pair.a.url}/v1/peers/{PEER}").json()["subscribers"] < 1:
            assert subscriber.poll() is None, subscriber.communicate()
            assert time.monotonic() < deadline, "the subscriber never subscribed"
            time.sleep(0.05)
        code, out, err = run(
            capsys, "broadcast", PEER, "--url", pair.b.url, "--data", "k=v\nx", "--wait"
        )
        assert (code, err) == (0, ""), err
        header, row = out.splitlines()
        assert header.split() == ["NODE", "CODE", "REASON", "BODY"]
        assert row.split() == [pair.a.uri, "200", "OK"]
        code, out, err = run(capsys, "send", PEER, pair.a.uri, "--url", pair.b.url, "--data", "2")
        assert code == 0, err
        assert out.startswith("accepted ") and out.rstrip().endswith(f"sending to {pair.a.uri}")
        stdout, stderr = subscriber.communicate(timeout=15)
    finally:
        if subscriber.poll() is None:
            subscriber.kill()
            subscriber.wait(10)
    assert subscriber.returncode == 0, stderr
    header, first, second = stdout.splitlines()
    epoch = peer_state(pair.a)["epoch"]
    # With or without the gateway's subscribed frame, the epoch heads the output.
    assert header.startswith(f"subscribed to {PEER}, epoch {epoch}")
    # No --content-type: text that is not JSON goes as UTF-8 text, JSON as JSON.
    assert first.startswith("#")
    assert first.endswith(f" from {pair.b.uri} (text/plain; charset=utf-8): k=v\\nx")
    assert second.endswith(f" from {pair.b.uri} (application/json): 2")
    last = int(second.split()[0][1:])
    assert last == int(first.split()[0][1:]) + 1
    assert stderr.splitlines()[-1] == (
        f"to resume: dmq-gateway subscribe {PEER} --since {last} --epoch {epoch} --url {pair.a.url}"
    )


def peer_state(gateway: Gateway, peer: str = PEER) -> dict[str, Any]:
    state: dict[str, Any] = httpx.get(f"{gateway.url}/v1/peers/{peer}").json()
    return state


def frames_of(out: str) -> list[dict[str, Any]]:
    """The frames of ``subscribe --json``, checking the subscribed frame if it is there
    (the gateway sends it first on every subscription; an older one does not)."""
    frames = [json.loads(line) for line in out.splitlines()]
    if frames and frames[0]["type"] == "subscribed":
        subscribed = frames.pop(0)
        assert set(subscribed) >= {"peer", "epoch", "offset", "since"}
        assert all(frame["type"] != "subscribed" for frame in frames)
    return frames


def test_subscribe_json_replays_with_a_gap_frame(
    pair: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys, "send", PEER, pair.a.uri, "--url", pair.b.url, "--data", "r", "--wait"
    )
    assert code == 0, err
    offset = httpx.get(f"{pair.a.url}/v1/peers/{PEER}").json()["offset"]
    assert offset >= 1
    # Another epoch: the gateway says so with a gap frame, then replays its history.
    code, out, err = run(
        capsys,
        "subscribe",
        PEER,
        "--url",
        pair.a.url,
        "--since",
        "0",
        "--epoch",
        "elsewhere",
        "--count",
        str(offset),
        "--json",
    )
    assert code == 0, err
    gap, *messages = frames_of(out)
    assert GapFrame.model_validate(gap).client_epoch == "elsewhere"
    frames = [MessageFrame.model_validate(message) for message in messages]
    assert [frame.offset for frame in frames] == list(range(1, offset + 1))
    assert frames[-1].body == "r" and frames[-1].from_ == pair.b.uri


def test_failed_sends_exit_1(pair: Pair, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "broadcast", "nobody", "--url", pair.b.url, "--wait", "--data", "")
    assert code == 1
    assert out.splitlines()[1].split()[:2] == [pair.a.uri, "404"]
    assert err == "dmq-gateway: 1 of 1 nodes did not answer 2xx\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["send", PEER, "sip:127.0.0.1:9", "--data", "x"], "sip:127.0.0.1:9 is not a node"),
        (["send", PEER, "garbage", "--data", "x"], "uri: 'garbage' is not a sip: URI"),
        (["broadcast", "notification_peer", "--data", "x"], "is the notification channel"),
        (["broadcast", PEER, "--file", "/nonexistent/body"], "--file /nonexistent/body: "),
    ],
)
def test_errors_are_one_line(
    pair: Pair, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = run(capsys, *args, "--url", pair.b.url)
    assert (code, out) == (1, "")
    assert err.startswith("dmq-gateway: error: ") and err.count("\n") == 1
    assert message in err


def test_subscribe_to_an_unknown_peer(pair: Pair, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "subscribe", "nobody", "--url", pair.a.url)
    assert code == 1
    assert err.splitlines()[-1] == "dmq-gateway: error: no peer 'nobody' is registered"


@pytest.mark.parametrize("command", ["nodes", "peers", "subscribe x", "broadcast x --data y"])
def test_connection_refused_names_the_url(capsys: pytest.CaptureFixture[str], command: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(capsys, *command.split(), "--url", url)
    assert (code, out) == (1, "")
    assert err.startswith(f"dmq-gateway: error: cannot connect to the gateway at {url} ")
    assert "connection refused" in err and err.count("\n") == 1


def test_body_from_stdin_and_file(
    pair: Pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = tmp_path / "body.bin"
    body.write_bytes(b"\x00\xff binary")
    for extra, stdin in ((["--file", str(body)], ""), ([], "from stdin")):
        result = subprocess.run(
            [
                *gateway_command(),
                *("send", PEER, pair.a.uri, "--url", pair.b.url, "--wait"),
                *("--content-type", "application/octet-stream", *extra),
            ],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            env=clean_env(),
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[1].split()[:3] == [pair.a.uri, "200", "OK"]
    offset = httpx.get(f"{pair.a.url}/v1/peers/{PEER}").json()["offset"]
    since = str(offset - 2)
    args = ["subscribe", PEER, "--url", pair.a.url, "--since", since, "--count", "2", "--json"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    binary, text = (MessageFrame.model_validate(frame) for frame in frames_of(out))
    assert (binary.encoding, base64.b64decode(binary.body)) == ("base64", b"\x00\xff binary")
    assert (text.encoding, text.body) == (None, "from stdin")
    assert text.content_type == "application/octet-stream"
    code, out, err = run(capsys, *args[:-1])  # readable: binary bodies shown as base64
    assert code == 0, err
    header, binary_line, _ = out.splitlines()
    assert header.startswith(f"subscribed to {PEER}, epoch {text.epoch}")
    assert binary_line.endswith("<9 bytes, base64: AP8gYmluYXJ5>")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "broadcast", PEER, "--timeout", "3")
    assert code == 2 and "--timeout only applies with --wait" in err
    with pytest.raises(SystemExit) as exited:
        cli.main(["subscribe", PEER, "--count", "0"])
    assert exited.value.code == 2
    assert "'0' is not a whole number >= 1" in capsys.readouterr().err
    code, out, err = run(capsys, "subscribe", PEER, "--epoch", "3f2a")
    assert (code, out) == (2, "")
    assert err == (
        "dmq-gateway: error: --epoch 3f2a needs --since N: an epoch only says which history "
        "the offset N belongs to\n"
    )


# ---------------------------------------------------------------------- resuming


class StdoutLines:
    """A client process's standard output, one line at a time, each within a deadline."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self.lines: queue.Queue[str] = queue.Queue()
        stream = process.stdout
        threading.Thread(
            target=lambda: [self.lines.put(line) for line in stream], daemon=True
        ).start()

    def next(self, timeout: float = 15.0) -> str:
        try:
            return self.lines.get(timeout=timeout).rstrip("\n")
        except queue.Empty:
            raise AssertionError(f"no line on stdout within {timeout} s") from None


def resume_words(err: str) -> list[str]:
    """The command ``subscribe`` printed last to resume, as words without the program."""
    last = err.splitlines()[-1]
    assert last.startswith("to resume: dmq-gateway subscribe "), err
    return shlex.split(last.removeprefix("to resume: "))[1:]


def send_to_a(pair: Pair, capsys: pytest.CaptureFixture[str], body: str, peer: str = PEER) -> None:
    code, _, err = run(
        capsys, "send", peer, pair.a.uri, "--url", pair.b.url, "--data", body, "--wait"
    )
    assert code == 0, err


def test_the_resume_command_picks_up_after_the_last_message(
    pair: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    for body in ("one", "two", "three"):
        send_to_a(pair, capsys, body)
    state = peer_state(pair.a)
    offset, epoch = state["offset"], state["epoch"]
    since = str(offset - 3)
    code, out, err = run(
        capsys, "subscribe", PEER, "--url", pair.a.url, "--since", since, "--count", "1"
    )
    assert code == 0, err
    header, line = out.splitlines()
    assert header.startswith(f"subscribed to {PEER}, epoch {epoch}")
    assert line.startswith(f"#{offset - 2} from ") and line.endswith(": one")
    words = resume_words(err)
    assert words == [
        *("subscribe", PEER, "--since", str(offset - 2)),
        *("--epoch", epoch, "--url", pair.a.url),
    ]
    # The printed command, run as printed: the next message, no gap, no duplicate.
    code, out, err = run(capsys, *words, "--count", "2", "--json")
    assert code == 0, err
    frames = frames_of(out)
    assert [frame["type"] for frame in frames] == ["message", "message"]
    assert [(f["offset"], f["body"]) for f in frames] == [(offset - 1, "two"), (offset, "three")]
    assert resume_words(err) == [
        *("subscribe", PEER, "--since", str(offset), "--epoch", epoch),
        *("--url", pair.a.url, "--json"),
    ]


def test_ctrl_c_prints_the_resume_command(pair: Pair, capsys: pytest.CaptureFixture[str]) -> None:
    send_to_a(pair, capsys, "before ctrl-c")
    state = peer_state(pair.a)
    since = str(state["offset"] - 1)
    subscriber = client_process("subscribe", PEER, "--url", pair.a.url, "--since", since)
    try:
        lines = StdoutLines(subscriber)
        assert lines.next().startswith(f"subscribed to {PEER}, epoch {state['epoch']}")
        assert lines.next().endswith(": before ctrl-c")
        os.kill(subscriber.pid, signal.SIGINT)
        assert subscriber.wait(15) == 130
        assert subscriber.stderr is not None
        err = subscriber.stderr.read()
    finally:
        if subscriber.poll() is None:
            subscriber.kill()
            subscriber.wait(10)
    assert "Traceback" not in err
    assert resume_words(err) == [
        *("subscribe", PEER, "--since", str(state["offset"]), "--epoch", state["epoch"]),
        *("--url", pair.a.url),
    ]


def test_unregistering_the_peer_ends_the_subscription_with_a_resume_command(
    pair: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    peer = "short-lived"
    assert httpx.put(f"{pair.a.url}/v1/peers/{peer}", json={}).status_code == 201
    send_to_a(pair, capsys, "last words", peer=peer)
    subscriber = client_process("subscribe", peer, "--url", pair.a.url, "--since", "0")
    try:
        lines = StdoutLines(subscriber)
        epoch = peer_state(pair.a, peer)["epoch"]
        assert lines.next().startswith(f"subscribed to {peer}, epoch {epoch}")
        assert lines.next() == f"#1 from {pair.b.uri} (text/plain; charset=utf-8): last words"
        assert httpx.delete(f"{pair.a.url}/v1/peers/{peer}").status_code == 204
        assert subscriber.wait(15) == 1
        assert subscriber.stderr is not None
        err = subscriber.stderr.read()
    finally:
        if subscriber.poll() is None:
            subscriber.kill()
            subscriber.wait(10)
    assert err.splitlines()[-2] == f"dmq-gateway: error: peer {peer!r} was unregistered"
    assert resume_words(err) == [
        *("subscribe", peer, "--since", "1", "--epoch", epoch, "--url", pair.a.url)
    ]


def test_a_stopping_gateway_ends_the_subscription_with_a_resume_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its own two gateways: this one stops the gateway the client subscribed to."""
    c = Gateway("c", tmp_path)
    d = Gateway("d", tmp_path, notify=[c])
    subscriber: subprocess.Popen[str] | None = None
    try:
        c.start()
        assert httpx.put(f"{c.url}/v1/peers/{PEER}", json={}).status_code == 201
        d.start()
        subscriber = client_process("subscribe", PEER, "--url", c.url, "--json")
        deadline = time.monotonic() + 10
        while peer_state(c)["subscribers"] < 1:
            assert time.monotonic() < deadline, "the subscriber never subscribed"
            time.sleep(0.05)
        epoch = peer_state(c)["epoch"]
        lines = StdoutLines(subscriber)
        code, _, err = run(capsys, "send", PEER, c.uri, "--url", d.url, "--data", "{}", "--wait")
        assert code == 0, err
        frame = json.loads(lines.next())
        if frame["type"] == "subscribed":
            assert (frame["epoch"], frame["since"]) == (epoch, 0)
            frame = json.loads(lines.next())
        assert (frame["type"], frame["offset"], frame["body"]) == ("message", 1, "{}")
        assert frame["content_type"] == "application/json"
        c.stop()
        assert subscriber.wait(15) == 1
        assert subscriber.stderr is not None
        err = subscriber.stderr.read()
    finally:
        if subscriber is not None and subscriber.poll() is None:
            subscriber.kill()
            subscriber.wait(10)
        d.stop()
        c.stop()
    assert err.splitlines()[-2].startswith(f"dmq-gateway: error: the gateway at {c.url} stopped (")
    assert resume_words(err) == [
        *("subscribe", PEER, "--since", "1", "--epoch", epoch, "--url", c.url, "--json")
    ]
