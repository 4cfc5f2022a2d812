"""A full UDP send buffer: datagrams queue behind the transport, none lost or reordered.

Loopback never fills a UDP send buffer (the kernel frees each datagram as it hands it
over), so this runs over a real link: a network namespace (harness/netns.py) whose
veth, on our side, is slowed by a token-bucket qdisc. Datagrams waiting in the qdisc
still count against the sending socket, whose buffer is made as small as the kernel
allows, so ``sendmmsg`` meets EAGAIN a few datagrams into the first batch. The rest go
through uvloop's transport, which queues them; the batches after it must go behind
that queue rather than straight to the socket whenever the qdisc has made room, or
they would overtake it. The receiver, in the namespace, checks every datagram arrived
once, in order.

Needs root, ``ip``, ``nft`` and ``tc``: skipped with the reason elsewhere (failed with
``CI=true``, as the fault tests are).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys

import pytest
import uvloop

from app.dmq.config import NodeConfig
from app.dmq.sip import SipUri
from app.transport.server import DmqServer
from harness.netns import Lab, lab_unavailable
from harness.ports import free_port

BATCHES = 5
PER_BATCH = 100
PAYLOAD = 600  # bytes of each datagram
#: 4 Mbit/s, with room in the qdisc for everything sent here, so it drops nothing.
QDISC = ("tbf", "rate", "4mbit", "burst", "2kb", "latency", "10s")

RECEIVER = """
import socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    sock.bind((host, port))
    print("ready", flush=True)
    sock.settimeout(30)
    for _ in range(count):
        print(sock.recv(65536)[:6].decode(), flush=True)
"""


def tc() -> str | None:
    return shutil.which("tc", path=os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin")


def lab_or_skip() -> None:
    reason = lab_unavailable()
    if reason is None and tc() is None:
        reason = "tc is not installed (apt-get install iproute2)"
    if reason is None:
        return
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"no lab: {reason}; CI=true, so this is an error, not a skip")
    pytest.skip(f"no lab: {reason}")


def test_batches_behind_a_full_send_buffer_arrive_once_in_order() -> None:
    lab_or_skip()
    total = BATCHES * PER_BATCH
    with Lab(["far"]) as lab:
        far = lab["far"]
        # Our side of the host's veth, which the bridge forwards to.
        veth = f"dmqv{lab.tag}h0"
        subprocess.run([str(tc()), "qdisc", "add", "dev", veth, "root", *QDISC], check=True)
        port = free_port()
        receiver = subprocess.Popen(
            far.command([sys.executable, "-c", RECEIVER, far.address, str(port), str(total)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert receiver.stdout is not None
            assert receiver.stdout.readline().strip() == "ready"
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                queued_at_start = runner.run(send(lab.bridge_address, (far.address, port)))
            out, _ = receiver.communicate(timeout=60)
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
    # The path under test was taken: after the first batch the transport held data
    # when each later batch was handed over.
    assert queued_at_start[0] == 0
    assert all(queued_at_start[1:]), queued_at_start
    assert out.split() == [f"d{i:05d}" for i in range(total)]


async def send(bind: str, target: tuple[str, int]) -> list[int]:
    """Hand BATCHES batches to the driver, a few milliseconds apart (so the qdisc
    makes room between them); the transport's queued bytes when each was handed."""
    node = DmqServer(NodeConfig(server_address=SipUri.parse(f"sip:{bind}:{free_port()}")))
    await node.start()
    queued: list[int] = []
    try:
        transport = node._udp
        assert transport is not None
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        for batch in range(BATCHES):
            numbers = range(batch * PER_BATCH, (batch + 1) * PER_BATCH)
            datagrams = [(f"d{i:05d}".encode().ljust(PAYLOAD, b"."), target) for i in numbers]
            queued.append(transport.get_write_buffer_size())  # type: ignore[attr-defined]
            node._send_datagrams(datagrams)
            await asyncio.sleep(0.005)
        for _ in range(3000):
            if not transport.get_write_buffer_size():  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
    finally:
        await node.stop(grace=0.1)
    return queued
