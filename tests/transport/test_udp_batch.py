"""The UDP driver's end-of-turn flush and batched sends, on real loopback sockets.

A received datagram only marks a flush as due, and the flush sends what the turn
produced through ``sendmmsg``, falling back to the transport for what that does not
send. What a user meets is checked: a burst of KDMQ requests answered, each once, in
the order sent (loopback keeps the order, so any reordering is the driver's), and a
batch whose middle the kernel or the address refuses losing nothing else, the refusal
reported. Both on asyncio's loop and on uvloop (which ``serve`` runs, and which hands
up to 32 datagrams of one readiness event to the driver in one turn), each driving its
own loop here rather than through the test runner's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from app.dmq.config import NodeConfig
from app.dmq.peers import PeerMessage, PeerReply
from app.dmq.sip import SipUri
from app.dmq.transaction import TimerSettings
from app.transport.server import DmqServer
from harness.ports import free_port

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}

#: Requests per burst: well past the 32 datagrams uvloop reads per readiness event,
#: and few enough (with their answers) for the client's default receive buffer.
BURST = 100
BURSTS = 10


def run(loop: str, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(scenario())


def server() -> DmqServer:
    port = free_port()
    return DmqServer(
        NodeConfig(
            server_address=SipUri.parse(f"sip:127.0.0.1:{port}"),
            timers=TimerSettings(t1=0.05, t2=0.2, timer_f=1.0),
        )
    )


def kdmq(port: int, source: tuple[str, int], number: int) -> bytes:
    """A KDMQ request for peer ``echo`` whose Call-ID and body carry ``number``."""
    host, via_port = source
    return (
        f"KDMQ sip:echo@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{via_port};branch=z9hG4bKbatch{number}\r\n"
        f"From: <sip:echo@{host}:{via_port}>;tag=b1\r\n"
        f"To: <sip:echo@127.0.0.1:{port}>\r\n"
        f"Call-ID: batch-{number}@{host}\r\n"
        "CSeq: 10 KDMQ\r\n"
        "Max-Forwards: 1\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(str(number))}\r\n\r\n{number}"
    ).encode()


def call_id(response: bytes) -> str:
    for line in response.split(b"\r\n"):
        if line.lower().startswith(b"call-id:"):
            return line.split(b":", 1)[1].strip().decode()
    raise AssertionError(f"no Call-ID in {response!r}")


def client(port: int) -> list[bytes]:
    """Send BURSTS bursts of BURST requests from one socket, each burst at once, and
    read every answer of a burst before the next; all answers, in arrival order."""
    answers: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(10)  # generous: a loaded machine answers late, never not at all
        source = sock.getsockname()
        for burst in range(BURSTS):
            numbers = range(burst * BURST, (burst + 1) * BURST)
            for number in numbers:
                sock.sendto(kdmq(port, source, number), ("127.0.0.1", port))
            answers.extend(sock.recv(65536) for _ in numbers)
        # Anything more would be a second answer to one of them.
        sock.settimeout(0.3)
        with contextlib.suppress(TimeoutError):
            answers.append(sock.recv(65536))
    return answers


@pytest.mark.parametrize("loop", LOOPS)
def test_a_burst_of_requests_is_answered_each_once_in_order(loop: str) -> None:
    async def scenario() -> None:
        node = server()
        seen: list[bytes] = []

        def echo(message: PeerMessage) -> PeerReply:
            seen.append(message.body)
            return PeerReply(200, "OK", "text/plain", message.body)

        node.register_peer("echo", echo)
        await node.start()
        try:
            answers = await asyncio.to_thread(client, node.config.server_address.port or 5060)
        finally:
            await node.stop(grace=0.2)
        total = BURST * BURSTS
        assert [call_id(a).split("@")[0] for a in answers] == [f"batch-{n}" for n in range(total)]
        assert all(a.startswith(b"SIP/2.0 200 OK\r\n") for a in answers)
        assert [a.rsplit(b"\r\n\r\n", 1)[1] for a in answers] == [b"%d" % n for n in range(total)]
        assert seen == [b"%d" % n for n in range(total)]

    run(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_batch_refused_in_the_middle_loses_nothing_else(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Three datagrams of one batch cannot be sent (the kernel refuses a broadcast
    address, an IPv6 address does not fit the IPv4 socket, port 0): sendmmsg stops at
    each, the transport takes that one and reports why, and every other datagram
    arrives once, in order."""
    caplog.set_level(logging.DEBUG, logger="dmq.transport")
    count = 300
    refused = {40: ("255.255.255.255", 9), 130: ("::1", 9), 200: ("127.0.0.1", 0)}
    arrived: list[bytes] = []

    async def scenario() -> None:
        node = server()
        await node.start()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
            receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            receiver.bind(("127.0.0.1", 0))
            receiver.settimeout(10)
            target = receiver.getsockname()
            datagrams = [(b"datagram %d" % i, refused.get(i, target)) for i in range(count)]
            try:
                caplog.clear()
                node._send_datagrams(datagrams)
                # Whatever the transport queued leaves as the loop runs.
                reader = threading.Thread(
                    target=lambda: arrived.extend(
                        receiver.recv(65536) for _ in range(count - len(refused))
                    )
                )
                reader.start()
                while reader.is_alive():
                    await asyncio.sleep(0.01)
                reader.join()
                receiver.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    arrived.append(receiver.recv(65536))
            finally:
                await node.stop(grace=0.2)

    run(loop, scenario)
    assert arrived == [b"datagram %d" % i for i in range(count) if i not in refused]
    reports = [
        r.getMessage()
        for r in caplog.records
        if r.name == "dmq.transport" and ("cannot send" in r.msg or "UDP error" in r.msg)
    ]
    assert len(reports) == len(refused), reports
