"""Three real gateways on one bus, driven over HTTP (httpx) and WebSocket (websockets).

A, B and C are separate ``dmq-gateway serve`` processes on loopback; B and C join
the bus through A. Short SIP timers, a ping every second; B cuts a WebSocket
subscriber off once it is ``QUEUE_LIMIT`` frames behind. Each test registers its
own peers, so the tests do not see each other's messages. Everything waits for a
condition with a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.dmq.sip import MAX_UDP_MESSAGE
from harness.gateway import Gateway
from harness.ports import free_port
from harness.waiting import wait_until
from tests.api.gateway_procs import dump_logs_on_failure, running

#: B's --ws-queue-limit.
QUEUE_LIMIT = 50
#: The largest KDMQ body over UDP: a whole datagram less the node's header reserve.
UDP_BODY_LIMIT = MAX_UDP_MESSAGE - 600
JSON = {"content-type": "application/json"}
TEXT = {"content-type": "text/plain"}
#: Seconds any single expected event may take.
PATIENCE = 10.0


@dataclass
class Cluster:
    a: Gateway
    b: Gateway
    c: Gateway
    workdir: Path
    #: Every gateway started by this module (stopped at the end, logs dumped on failure).
    gateways: list[Gateway] = field(default_factory=list)

    def bus_complete(self) -> bool:
        """Every gateway of the bus is up and holds the two others as active."""
        for gateway in (self.a, self.b, self.c):
            health = gateway.health()
            if health is None or health["active_nodes"] != 2:
                return False
        return True

    def wait_bus(self, timeout: float = 15.0) -> None:
        try:
            wait_until(self.bus_complete, timeout, "A, B and C to hold each other as active")
        except AssertionError as exc:
            logs = "\n".join(f"--- {g.name}:\n{g.log_tail()}" for g in (self.a, self.b, self.c))
            raise AssertionError(f"{exc}; their logs end:\n{logs}") from None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("gateways")
    a = Gateway("A", workdir)
    b = Gateway("B", workdir, notify=[a], extra=["--ws-queue-limit", str(QUEUE_LIMIT)])
    c = Gateway("C", workdir, notify=[a])
    bus = Cluster(a, b, c, workdir, [a, b, c])
    with running(bus.gateways):
        a.start()
        b.spawn()
        c.spawn()
        b.wait_ready()
        c.wait_ready()
        bus.wait_bus()
        yield bus


@pytest.fixture(autouse=True)
def _bus_and_logs(request: pytest.FixtureRequest, cluster: Cluster) -> Iterator[None]:
    """Each test starts on a complete bus; a failing test shows the gateways' logs."""
    with dump_logs_on_failure(request, lambda: cluster.gateways):
        cluster.wait_bus()
        yield


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=PATIENCE, trust_env=False) as client:
        yield client


# ---------------------------------------------------------------------- helpers


async def eventually(
    condition: Callable[[], Awaitable[Any]], what: str, timeout: float = PATIENCE
) -> Any:
    """Await ``condition`` every 20 ms until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def put_peer(
    http: httpx.AsyncClient, gateway: Gateway, peer: str, **settings: Any
) -> dict[str, Any]:
    response = await http.put(f"{gateway.url}/v1/peers/{peer}", json=settings)
    assert response.status_code in (200, 201), response.text
    data: dict[str, Any] = response.json()
    return data


async def get_peer(http: httpx.AsyncClient, gateway: Gateway, peer: str) -> dict[str, Any]:
    response = await http.get(f"{gateway.url}/v1/peers/{peer}")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def wait_subscribers(
    http: httpx.AsyncClient, gateway: Gateway, peer: str, count: int
) -> None:
    async def reached() -> bool:
        return bool((await get_peer(http, gateway, peer))["subscribers"] == count)

    await eventually(reached, f"{count} subscriber(s) of {peer} on {gateway.name}")


async def broadcast(
    http: httpx.AsyncClient,
    gateway: Gateway,
    peer: str,
    body: str | bytes,
    *,
    headers: dict[str, str] = JSON,
    wait: bool = False,
) -> dict[str, Any]:
    params = {"wait": "true"} if wait else {}
    response = await http.post(
        f"{gateway.url}/v1/peers/{peer}/broadcast", content=body, headers=headers, params=params
    )
    assert response.status_code == (200 if wait else 202), response.text
    data: dict[str, Any] = response.json()
    return data


async def send(
    http: httpx.AsyncClient,
    gateway: Gateway,
    peer: str,
    node: str,
    body: str | bytes,
    *,
    headers: dict[str, str] = JSON,
    wait: bool = True,
) -> dict[str, Any]:
    params = {"node": node, **({"wait": "true"} if wait else {})}
    response = await http.post(
        f"{gateway.url}/v1/peers/{peer}/send", content=body, headers=headers, params=params
    )
    assert response.status_code == (200 if wait else 202), response.text
    data: dict[str, Any] = response.json()
    return data


@contextlib.asynccontextmanager
async def subscribed(
    http: httpx.AsyncClient,
    gateway: Gateway,
    peer: str,
    *,
    subscribers: int = 1,
    query: str = "",
    **options: Any,
) -> AsyncIterator[ClientConnection]:
    """A WebSocket subscriber, yielded once the gateway counts ``subscribers``, with
    its first frame (``subscribed``) read and checked."""
    url = f"{gateway.ws_url}/v1/peers/{peer}/subscribe{query}"
    options = {"proxy": None, "open_timeout": PATIENCE, "close_timeout": 2, **options}
    async with connect(url, **options) as ws:
        first = await recv_frame(ws)
        assert (first["type"], first["peer"]) == ("subscribed", peer), first
        await wait_subscribers(http, gateway, peer, subscribers)
        yield ws


async def recv_frame(ws: ClientConnection, timeout: float = PATIENCE) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return frame


async def recv_until(
    ws: ClientConnection, last_body: str, timeout: float = PATIENCE
) -> list[dict[str, Any]]:
    """Every frame up to and including the message whose body is ``last_body``."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            bodies = [f.get("body") for f in frames][-5:]
            raise AssertionError(f"no {last_body!r} within {timeout} s; last frames: {bodies}")
        frame = await recv_frame(ws, remaining)
        frames.append(frame)
        if frame.get("type") == "message" and frame.get("body") == last_body:
            return frames


def assert_consecutive(frames: list[dict[str, Any]], first: int | None = None) -> None:
    offsets = [f["offset"] for f in frames]
    start = offsets[0] if first is None else first
    assert offsets == list(range(start, start + len(frames))), offsets


def marker(name: str) -> str:
    return json.dumps({"marker": name})


async def metric(http: httpx.AsyncClient, gateway: Gateway, name: str, labels: str = "") -> float:
    """One sample of GET /metrics (it must be there)."""
    response = await http.get(f"{gateway.url}/metrics")
    assert response.status_code == 200
    prefix = f"{name}{labels} "
    for line in response.text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    raise AssertionError(f"{gateway.name} has no metric {name}{labels}")


# ---------------------------------------------------------------------- 1. broadcast


async def test_broadcast_reaches_each_subscriber_once_in_order(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    a, b, c = cluster.a, cluster.b, cluster.c
    peer = "ordered"
    for gateway in (b, c):
        await put_peer(http, gateway, peer)
    bodies = [json.dumps({"seq": i, "text": f"message {i} from A"}) for i in range(50)]
    end = marker("ordered-end")
    async with subscribed(http, b, peer) as ws_b, subscribed(http, c, peer) as ws_c:
        for body in [*bodies, end]:
            accepted = await broadcast(http, a, peer, body)
            assert accepted["targets"] == 2
            assert sorted(accepted["nodes"]) == sorted([b.uri, c.uri])
        for gateway, ws in ((b, ws_b), (c, ws_c)):
            frames = await recv_until(ws, end)
            assert [f["body"] for f in frames] == [*bodies, end], gateway.name
            state = await get_peer(http, gateway, peer)
            assert_consecutive(frames, first=1)
            assert len({f["id"] for f in frames}) == len(frames)
            for frame in frames:
                assert frame["type"] == "message"
                assert frame["peer"] == peer
                assert frame["from"] == a.uri
                assert frame["content_type"] == "application/json"
                assert frame["epoch"] == state["epoch"]
                assert "encoding" not in frame
            # The gateway itself took each message in exactly once.
            assert state["received"] == len(bodies) + 1
            assert state["offset"] == frames[-1]["offset"]


# ---------------------------------------------------------------------- 2. send


async def test_send_reaches_only_the_node_named(cluster: Cluster, http: httpx.AsyncClient) -> None:
    a, b, c = cluster.a, cluster.b, cluster.c
    peer = "direct"
    for gateway in (b, c):
        await put_peer(http, gateway, peer)
    end = marker("direct-end")
    async with subscribed(http, b, peer) as ws_b, subscribed(http, c, peer) as ws_c:
        accepted = await send(http, a, peer, b.uri, "to B, no wait", headers=TEXT, wait=False)
        assert accepted["targets"] == 1
        assert accepted["nodes"] == [b.uri]
        done = await send(http, a, peer, b.uri, "to B, waited for", headers=TEXT)
        assert done["targets"] == 1
        assert [(r["node"], r["code"]) for r in done["results"]] == [(b.uri, 200)]
        binary = bytes(range(256))  # not UTF-8: the frame carries it in base64
        await send(http, a, peer, b.uri, binary, headers={"content-type": "image/png"})
        # Broadcast a marker: C's first frame must be it, nothing sent to B before it.
        await broadcast(http, a, peer, end, wait=True)
        frames_b = await recv_until(ws_b, end)
        assert [f["body"] for f in frames_b[:2]] == ["to B, no wait", "to B, waited for"]
        assert frames_b[0]["content_type"] == "text/plain"
        assert frames_b[2]["encoding"] == "base64"
        assert frames_b[2]["content_type"] == "image/png"
        assert base64.b64decode(frames_b[2]["body"]) == binary
        assert [f["body"] for f in frames_b[3:]] == [end]
        frames_c = await recv_until(ws_c, end)
        assert [f["body"] for f in frames_c] == [end]
    assert (await get_peer(http, c, peer))["received"] == 1
    assert (await get_peer(http, b, peer))["received"] == 4


# ---------------------------------------------------------------------- 3. results and errors


async def test_wait_results_and_errors(cluster: Cluster, http: httpx.AsyncClient) -> None:
    a, b, c = cluster.a, cluster.b, cluster.c
    peer = "results"
    for gateway in (b, c):
        await put_peer(http, gateway, peer)

    # wait=true: one result per node of the bus but A.
    done = await broadcast(http, a, peer, '{"k": "v"}', wait=True)
    assert done["targets"] == 2
    assert sorted(r["node"] for r in done["results"]) == sorted([b.uri, c.uri])
    for result in done["results"]:
        assert (result["code"], result["reason"], result["timeout"]) == (200, "OK", False)

    # Each node answers for itself: a peer only B has gets 404 from C.
    await put_peer(http, b, "results-b-only")
    done = await broadcast(http, a, "results-b-only", "x", headers=TEXT, wait=True)
    assert {r["node"]: r["code"] for r in done["results"]} == {b.uri: 200, c.uri: 404}

    # A node that is not on the bus: 404 problem+json.
    stranger = f"sip:127.0.0.1:{free_port()}"
    response = await http.post(
        f"{a.url}/v1/peers/{peer}/send", params={"node": stranger}, content="x", headers=TEXT
    )
    assert response.status_code == 404, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == 404
    assert problem["title"] == "Not Found"
    assert stranger in problem["detail"]

    # The largest body UDP carries goes through; one byte more is 413. The origin
    # stamp (X-DMQ-Origin) takes its share of the datagram: the 413 says how much.
    response = await http.post(
        f"{a.url}/v1/peers/{peer}/broadcast", content=b"z" * UDP_BODY_LIMIT, headers=TEXT
    )
    assert response.status_code == 413, response.text
    found = re.search(r"with (\d+) bytes of extra headers", response.json()["detail"])
    assert found, response.text
    largest = UDP_BODY_LIMIT - int(found[1])
    done = await broadcast(http, a, peer, b"z" * largest, headers=TEXT, wait=True)
    assert [r["code"] for r in done["results"]] == [200, 200]
    too_large = b"z" * (largest + 1)
    for path, params in (("broadcast", {}), ("send", {"node": b.uri})):
        response = await http.post(
            f"{a.url}/v1/peers/{peer}/{path}", params=params, content=too_large, headers=TEXT
        )
        assert response.status_code == 413, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["status"] == 413
    for gateway in (b, c):
        # two accepted broadcasts, nothing of the refused ones
        assert (await get_peer(http, gateway, peer))["received"] == 2

    # A gateway alone on its bus: a broadcast has nobody to go to.
    lone = Gateway("lone", cluster.workdir)
    cluster.gateways.append(lone)
    lone.start()
    try:
        accepted = await broadcast(http, lone, peer, "anyone?", headers=TEXT)
        assert (accepted["targets"], accepted["nodes"]) == (0, [])
        done = await broadcast(http, lone, peer, "anyone?", headers=TEXT, wait=True)
        assert (done["targets"], done["results"]) == (0, [])
    finally:
        lone.stop()


# ---------------------------------------------------------------------- 4. subscriber replies


async def test_subscriber_reply_mode(cluster: Cluster, http: httpx.AsyncClient) -> None:
    a, b = cluster.a, cluster.b
    peer = "rpc"
    registered = await put_peer(http, b, peer, reply="subscriber", reply_timeout=0.5)
    assert (registered["reply"], registered["reply_timeout"]) == ("subscriber", 0.5)

    async def ask(body: str) -> dict[str, Any]:
        done = await send(http, a, peer, b.uri, body)
        assert done["targets"] == 1
        [result] = done["results"]
        assert result["node"] == b.uri
        return dict(result)

    # Nobody subscribed: B answers 480 and keeps nothing.
    result = await ask('{"q": "nobody"}')
    assert (result["code"], result["timeout"]) == (480, False)
    assert (await get_peer(http, b, peer))["offset"] == 0

    # A subscriber that answers every message: its reply is B's SIP reply.
    async with subscribed(http, b, peer) as ws:

        async def answer() -> None:
            async for raw in ws:
                frame = json.loads(raw)
                question = json.loads(frame["body"])
                code = 486 if question.get("busy") else 200
                reply = {
                    "type": "reply",
                    "id": frame["id"],
                    "code": code,
                    "reason": "Busy Here" if code == 486 else "OK",
                    "content_type": "application/json",
                    "body": json.dumps({"echo": question}),
                }
                await ws.send(json.dumps(reply))

        answering = asyncio.create_task(answer())
        try:
            for i in range(3):
                result = await ask(json.dumps({"q": i}))
                assert (result["code"], result["reason"], result["timeout"]) == (200, "OK", False)
                assert result["content_type"] == "application/json"
                assert json.loads(result["body"]) == {"echo": {"q": i}}
            result = await ask('{"busy": true}')
            assert (result["code"], result["reason"]) == (486, "Busy Here")
            assert json.loads(result["body"]) == {"echo": {"busy": True}}
        finally:
            answering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answering
    await wait_subscribers(http, b, peer, 0)

    # A subscriber that reads but never answers: 408 from B after reply_timeout.
    timeouts_before = await metric(http, b, "dmq_peer_reply_timeouts_total")
    async with subscribed(http, b, peer) as ws:
        started = time.monotonic()
        result = await ask('{"q": "silence"}')
        elapsed = time.monotonic() - started
        assert (result["code"], result["timeout"]) == (408, False), result
        assert elapsed >= 0.5
        # The peer's reply_timeout answered, not the sender's Timer F.
        assert await metric(http, b, "dmq_peer_reply_timeouts_total") == timeouts_before + 1
        frame = await recv_frame(ws)
        assert json.loads(frame["body"]) == {"q": "silence"}
        # Too late now: the gateway says so instead of sending a second answer.
        await ws.send(json.dumps({"type": "reply", "id": frame["id"], "code": 200}))
        error = await recv_frame(ws)
        assert error["type"] == "error"
        assert frame["id"] in error["error"]


# ---------------------------------------------------------------------- 5. resume


async def test_resume_gets_exactly_what_was_missed(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    a, b = cluster.a, cluster.b
    peer = "resume"
    await put_peer(http, b, peer)
    bodies = [json.dumps({"n": i}) for i in range(30)]

    async with subscribed(http, b, peer) as ws:
        for body in bodies[:10]:
            await broadcast(http, a, peer, body)
        seen = await recv_until(ws, bodies[9])
    assert [f["body"] for f in seen] == bodies[:10]
    last, epoch = seen[-1]["offset"], seen[-1]["epoch"]
    await wait_subscribers(http, b, peer, 0)

    for body in bodies[10:20]:
        await broadcast(http, a, peer, body)

    async def all_arrived() -> bool:
        return bool((await get_peer(http, b, peer))["offset"] == last + 10)

    await eventually(all_arrived, "B to hold the 10 messages sent while nobody listened")

    end = marker("resume-end")
    query = f"?since={last}&epoch={epoch}"
    async with subscribed(http, b, peer, query=query) as ws:
        missed = [await recv_frame(ws) for _ in range(10)]
        assert [f["type"] for f in missed] == ["message"] * 10
        assert [f["body"] for f in missed] == bodies[10:20]
        assert_consecutive(missed, first=last + 1)
        for body in [*bodies[20:], end]:
            await broadcast(http, a, peer, body)
        live = await recv_until(ws, end)
    assert [f["body"] for f in live] == [*bodies[20:], end]
    assert_consecutive(missed + live, first=last + 1)


async def test_resume_past_the_history_starts_with_a_gap(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    a, b = cluster.a, cluster.b
    peer = "resume-short"
    await put_peer(http, b, peer, history=5)
    bodies = [json.dumps({"n": i}) for i in range(13)]

    async with subscribed(http, b, peer) as ws:
        for body in bodies[:3]:
            await broadcast(http, a, peer, body)
        seen = await recv_until(ws, bodies[2])
    assert_consecutive(seen, first=1)
    epoch = seen[-1]["epoch"]
    await wait_subscribers(http, b, peer, 0)

    for body in bodies[3:]:
        await broadcast(http, a, peer, body)

    async def all_arrived() -> bool:
        state = await get_peer(http, b, peer)
        return bool(state["offset"] == 13 and state["history_size"] == 5)

    await eventually(all_arrived, "B to hold offsets 9-13 only")

    end = marker("gap-end")
    async with subscribed(http, b, peer, query=f"?since=3&epoch={epoch}") as ws:
        gap = await recv_frame(ws)
        assert gap["type"] == "gap", gap
        assert (gap["from"], gap["to"], gap["epoch"]) == (4, 8, epoch)
        held = [await recv_frame(ws) for _ in range(5)]
        assert [f["body"] for f in held] == bodies[8:]
        assert_consecutive(held, first=9)
        await broadcast(http, a, peer, end)
        live = await recv_until(ws, end)
    assert [(f["offset"], f["body"]) for f in live] == [(14, end)]


# ---------------------------------------------------------------------- 6. slow consumer


async def small_buffer_socket(port: int) -> socket.socket:
    """A TCP socket to the gateway with a tiny receive buffer, so backpressure bites."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), 5)
    return sock


async def test_slow_consumer_is_cut_off_and_can_resume(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    """A client that stops reading is cut off with 4008 once it is QUEUE_LIMIT behind.

    The 4008 close frame is queued behind the data that already fills the TCP buffers
    (B's write buffer and both kernels'), so the client sees it only once it reads
    again, after everything sent before the cut; that is what this test does. B's
    endpoint stays blocked in that send meanwhile, the subscriber still counted in
    dmq_websocket_clients. A client that never reads again never sees 4008: after
    40 s uvicorn's keepalive queues a 1011 close behind the same data (the connection
    stays open until the client reads or goes away), and a client with its own
    keepalive (websockets' default) gives up after 40-50 s with 1006.
    """
    a, b = cluster.a, cluster.b
    peer = "slow"
    await put_peer(http, b, peer, history=100_000)
    overflow_metric = ("dmq_websocket_queue_overflows_total", f'{{peer="{peer}"}}')
    assert await metric(http, b, *overflow_metric) == 0
    end = marker("slow-end")
    # Incompressible 32 kB bodies fill the kernel's buffers in a few hundred messages.
    # (compression=None: with permessage-deflate, repetitive bodies would shrink to
    # nothing and never fill anything.)
    sent: list[int] = []

    def body(n: int) -> str:
        return json.dumps({"n": n, "pad": base64.b64encode(os.urandom(24_000)).decode()})

    async with (
        subscribed(http, b, peer, compression=None) as fast,
        subscribed(
            http,
            b,
            peer,
            subscribers=2,
            sock=await small_buffer_socket(b.http_port),
            compression=None,
            max_queue=1,
            ping_interval=None,
        ) as slow,
    ):
        fast_frames: list[dict[str, Any]] = []

        async def read_fast() -> None:
            async for raw in fast:
                frame = json.loads(raw)
                fast_frames.append(frame)
                if frame["body"] == end:
                    return

        reading = asyncio.create_task(read_fast())
        # The slow client reads nothing while A broadcasts, until B cuts it off.
        while await metric(http, b, *overflow_metric) < 1:
            assert len(sent) < 3000, "B never cut the client that does not read off"
            for _ in range(20):
                sent.append(len(sent))
                await broadcast(http, a, peer, body(sent[-1]))
        await broadcast(http, a, peer, end)
        await asyncio.wait_for(reading, PATIENCE)

        # The client that kept reading got everything, in order.
        assert [json.loads(f["body"]).get("n") for f in fast_frames[:-1]] == sent
        assert fast_frames[-1]["body"] == end
        assert_consecutive(fast_frames)

        # The slow one gets what was sent to it before the cut, then close code 4008.
        slow_frames: list[dict[str, Any]] = []
        with pytest.raises(ConnectionClosed):
            while True:
                slow_frames.append(await recv_frame(slow))
        assert slow.close_code == 4008, (slow.close_code, slow.close_reason)
        match = re.search(r"since=(\d+)", slow.close_reason or "")
        assert match, slow.close_reason
        resume_at = int(match.group(1))
        assert slow_frames, "the slow client got nothing before it was cut off"
        assert_consecutive(slow_frames, first=fast_frames[0]["offset"])
        assert slow_frames[-1]["offset"] == resume_at
        assert resume_at < fast_frames[-1]["offset"]
        await wait_subscribers(http, b, peer, 1)

    # It resumes where the close reason said, and gets the rest from the history.
    epoch = fast_frames[0]["epoch"]
    async with subscribed(http, b, peer, query=f"?since={resume_at}&epoch={epoch}") as ws:
        rest = await recv_until(ws, end)
    assert_consecutive(slow_frames + rest, first=fast_frames[0]["offset"])
    assert [f["body"] for f in slow_frames + rest] == [f["body"] for f in fast_frames]
    assert await metric(http, b, *overflow_metric) >= 1


# ---------------------------------------------------------------------- 7. restart


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_restart_keeps_peers_and_history(
    cluster: Cluster, http: httpx.AsyncClient, how: str
) -> None:
    """A restart, graceful or ``kill -9``, keeps the peer's epoch, offsets and
    history: a subscriber that resumes with since and epoch gets exactly what it had
    not read, with no gap, and then goes live."""
    a, b = cluster.a, cluster.b
    peer = f"kept-{how}"
    settings = {
        "description": "kept across restarts",
        "reply": "auto",
        "reply_timeout": 2.5,
        "history": 77,
        "history_max_age": 0,
    }
    await put_peer(http, b, peer, **settings)
    async with subscribed(http, b, peer) as ws:
        for n in range(5):
            await broadcast(http, a, peer, f"m{n}", headers=TEXT, wait=True)
        read = [await recv_frame(ws) for _ in range(3)]  # the client reads 3 of 5
    assert [f["body"] for f in read] == ["m0", "m1", "m2"]
    before = await get_peer(http, b, peer)
    assert before["offset"] == 5

    if how == "sigterm":
        # A graceful stop: B tells the bus it leaves (uvicorn re-raises the SIGTERM
        # once it has shut down, so the exit status is the signal's).
        assert b.stop() in (0, -signal.SIGTERM)

        async def a_lets_b_go() -> bool:
            nodes = (await http.get(f"{a.url}/v1/nodes")).json()
            return all(n["status"] != "active" for n in nodes if n["uri"] == b.uri)

        await eventually(a_lets_b_go, "A to hear that B left")
    else:
        assert b.kill() == -signal.SIGKILL
    b.restart()

    after = await get_peer(http, b, peer)
    for key, value in settings.items():
        assert after[key] == value, key
    assert after["persistent"] is True
    assert (after["epoch"], after["offset"], after["history_size"]) == (before["epoch"], 5, 5)

    await asyncio.to_thread(cluster.wait_bus)
    query = f"?since={read[-1]['offset']}&epoch={read[-1]['epoch']}"
    async with subscribed(http, b, peer, query=query) as ws:
        missed = [await recv_frame(ws) for _ in range(2)]
        assert [(f["type"], f["body"], f["offset"]) for f in missed] == [
            ("message", "m3", 4),
            ("message", "m4", 5),
        ]
        done = await broadcast(http, a, peer, "after the restart", headers=TEXT, wait=True)
        assert {r["node"]: r["code"] for r in done["results"]}[b.uri] == 200
        frame = await recv_frame(ws)
        assert (frame["type"], frame["body"], frame["offset"], frame["epoch"]) == (
            "message",
            "after the restart",
            6,
            before["epoch"],
        )


async def test_lossy_bus_delivers_every_broadcast_once_in_order(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """Three gateways dropping 20% of their UDP datagrams each way, 500 broadcasts from
    A: every subscriber on B and C gets every message once, in A's order; anything a
    reorder bound really gave up is named by a gap frame, never skipped silently."""
    count = 500
    peer = "lossy"
    lossy = ["--drop-rate", "0.2"]
    a = Gateway("lossy-a", tmp_path, extra=lossy)
    b = Gateway("lossy-b", tmp_path, notify=[a], extra=lossy)
    c = Gateway("lossy-c", tmp_path, notify=[a], extra=lossy)
    bus = Cluster(a, b, c, tmp_path, [a, b, c])
    with running(bus.gateways):
        a.start()
        b.start()
        c.start()
        await asyncio.to_thread(bus.wait_bus, 30)
        for gateway in (b, c):
            await put_peer(http, gateway, peer)
        async with (
            subscribed(http, b, peer) as on_b,
            subscribed(http, c, peer) as on_c,
        ):
            queued = 0
            for n in range(count):
                sent = await broadcast(http, a, peer, str(n), headers=TEXT)
                queued += sent["targets"] == 2
            assert queued == count  # B and C were targets of every broadcast
            for ws in (on_b, on_c):
                frames = await recv_until_seq(ws, count, timeout=120)
                delivered = [int(f["body"]) for f in frames if f["type"] == "message"]
                lost: set[int] = set()
                for gap in (f for f in frames if f["type"] == "gap"):
                    assert gap["origin"] == a.uri, gap
                    lost.update(n - 1 for n in range(gap["from"], gap["to"] + 1))
                assert delivered == sorted(set(delivered)), "out of order or twice"
                assert set(delivered) | lost == set(range(count)), "lost silently"
                assert not set(delivered) & lost
                assert_consecutive(frames)
        duplicates = await metric(http, b, "dmq_duplicates_total")
        print(f"lossy bus: {duplicates:g} duplicate copies answered on B, not delivered")


async def recv_until_seq(ws: ClientConnection, count: int, timeout: float) -> list[dict[str, Any]]:
    """Frames until message ``count - 1`` (body) or a gap that reaches seq ``count``."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            tail = [(f["type"], f.get("body"), f.get("to")) for f in frames[-5:]]
            raise AssertionError(f"{len(frames)} frames within {timeout} s; last: {tail}")
        frame = await recv_frame(ws, remaining)
        frames.append(frame)
        if frame["type"] == "message" and frame["body"] == str(count - 1):
            return frames
        if frame["type"] == "gap" and frame.get("to") == count:
            return frames
