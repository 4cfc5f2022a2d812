"""WebSocket fan-out: the gateway against a bare ``websockets`` server, same clients, same frames.

Run from the repository root::

    python -m bench.ws_fanout                  # the full run (defaults below)
    python -m bench.ws_fanout --levels 20,100 --messages 50 --idle-connections 100 \
        --compression none                     # a quick check

Two servers are measured in the same run, each in its own process:

* ``gateway``: ``dmq-gateway serve`` (gateway A, ``--log-level warning``) with a
  peer ``fanout`` (``reply: auto``, registered with ``PUT /v1/peers/fanout``); the
  subscribers connect to ``/v1/peers/fanout/subscribe``.
* ``bare``: ``websockets.asyncio.server.serve`` on uvloop when installed, with
  websockets' default permessage-deflate settings (the same as uvicorn's), keeping the
  open connections in a set and calling ``websockets.asyncio.server.broadcast`` once per
  message with a JSON text frame of the same fields and size as the gateway's (type,
  offset, epoch, id, peer, from, content_type, body). It is what Python + websockets can
  do for the same work with nothing in between.

Messages are injected the same way into both (``--inject udp``, the default): a KDMQ
sender in this process sends ``--messages`` KDMQ requests over UDP (an htable set each,
with its own branch and Call-ID; ``--window`` unanswered at most; retransmitted after
2 s), from loopback, which the gateway trusts, and counts the 200s. The gateway stores
each in the peer's history, fans it out and answers; the bare server parses the
headers, broadcasts the frame and answers a minimal 200 (a retransmission is answered
again from a cache and not broadcast twice, as the gateway's transaction layer does).
``--inject dmq`` instead makes a gateway B (which joins A) broadcast each message with
``POST /v1/peers/fanout/broadcast`` (httpx, keep-alive), so the gateway gets real DMQ
traffic; the bare server still gets UDP.

The subscribers live in ``--client-procs`` separate processes (``multiprocessing``,
spawn), each holding its share of the connections with the ``websockets`` asyncio
client, reading frames with ``recv(decode=False)`` and counting them. Every measurement
is made once per ``--compression`` mode: ``deflate`` (the clients offer
permessage-deflate, as browsers do, and both servers accept it) and ``none``.

What is measured, and how:

* deliveries/s: for each level of ``--levels`` subscribers (fresh connections each
  time), ``--repeats`` runs per server, gateway and bare taking turns run by run (both
  servers stay up for the whole compression mode, so a change in the machine's load
  falls on both alike; the median run is reported, every run's figure is kept). In a
  run the clients are armed, the messages injected as fast as the server answers, and every
  client process reports its frame count and the ``perf_counter`` of its last frame
  (CLOCK_MONOTONIC: one clock for every process on Linux). deliveries/s = frames
  received by all subscribers / (first injection .. last frame anywhere). The gateway
  runs with ``--ws-queue-limit`` = ``--messages`` + 100 so that no subscriber is cut off
  for being slow while a burst is queued. ratio = gateway / bare per level (the target is
  >= 0.8). Because that ratio also depends on how fast the clients can read (they share
  the machine), the server's CPU time per delivery is reported too, and
  ``cpu_ratio_bare_over_gateway`` = bare's / gateway's.
* memory per idle connection: on a fresh server, after a warm-up (a few connections and
  messages, then closed) and ``--settle`` seconds, VmRSS of the server process
  (psutil) is read, ``--idle-connections`` subscriptions are opened and left
  idle, the server is checked to hold them all, and after ``--settle`` seconds VmRSS is
  read again: (after - before) / connections, in KB (of 1024 bytes, as VmRSS). The
  reference is Centrifugo's ~27-30 KB per connection; the target is below it.
* CPU: seconds and % of one core used by the server and by the client processes during
  each level (from psutil), and the machine's CPU pressure (/proc/pressure/cpu),
  so that a client-bound or contended run shows as such.

Writes ``OUT/ws-fanout.json`` and ``OUT/ws-fanout.png`` (OUT defaults to bench/results).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    RESULTS,
    bench_gateway,
    cpu_pressure,
    machine_info,
    peer_info,
    process_cpu_seconds,
    process_rss_kb,
    register_peer,
    rnd,
    run_async,
    wait_joined,
)
from bench.gateway_e2e import offer
from harness.gateway import Gateway

PEER = "fanout"
CENTRIFUGO_KB = 27.0
TARGET_RATIO = 0.8
#: First retransmission of an unanswered injection (doubling after). Loopback does not
#: lose datagrams unless a receive buffer overflows; a busy server answering late must
#: not be made busier by retransmissions.
RETRANSMIT_S = 2.0

# --------------------------------------------------------------------------- injection


class UdpInjector:
    """Sends KDMQ requests over UDP from loopback and counts the 200s (matched by Call-ID)."""

    def __init__(self, port: int, peer: str, body_size: int) -> None:
        self.port = port
        self.peer = peer
        self.body_size = body_size
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.local_port = int(self.sock.getsockname()[1])
        self.run = secrets.token_hex(4)
        self.tag = secrets.token_hex(8)
        self.sent = 0

    def close(self) -> None:
        self.sock.close()

    def request(self, n: int) -> tuple[bytes, bytes]:
        """KDMQ request number n (an htable set, padded to body_size) and its Call-ID."""
        call_id = f"fanout-{self.run}-{n}@127.0.0.1".encode()
        head = f'{{"action":2,"htname":"ht","cname":"k{n:08d}","type":2,"mode":1,"strval":"'
        body = head + "v" * max(0, self.body_size - len(head) - 2) + '"}'
        local = f"127.0.0.1:{self.local_port}"
        target = f"127.0.0.1:{self.port}"
        text = (
            f"KDMQ sip:{self.peer}@{target} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {local};branch=z9hG4bK-fanout-{self.run}-{n}\r\n"
            f"To: <sip:{self.peer}@{target}>\r\n"
            f"From: <sip:{self.peer}@{local}>;tag={self.tag}\r\n"
            f"CSeq: 10 KDMQ\r\n"
            f"Call-ID: {call_id.decode()}\r\n"
            f"Content-Length: {len(body.encode())}\r\n"
            f"Max-Forwards: 1\r\n"
            f"Content-Type: application/json\r\n"
            f"\r\n{body}"
        )
        return text.encode(), call_id

    @staticmethod
    def _parse(data: bytes) -> tuple[int | None, bytes | None]:
        head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        parts = head[0].split(b" ", 2)
        code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        for line in head[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() in (b"call-id", b"i"):
                return code, value.strip()
        return code, None

    def inject(self, count: int, window: int, timeout: float = 120.0) -> dict[str, Any]:
        sock = self.sock
        address = ("127.0.0.1", self.port)
        pending: dict[bytes, list[Any]] = {}  # call-id -> [data, last sent, tries]
        codes: Counter[int | None] = Counter()
        retransmissions = 0
        next_n = self.sent
        end_n = self.sent + count
        self.sent = end_n
        perf = time.perf_counter
        first = perf()
        deadline = first + timeout
        sock.settimeout(0.02)
        acked = 0
        last_ack = first
        while (next_n < end_n or pending) and perf() < deadline:
            while next_n < end_n and len(pending) < window:
                data, call_id = self.request(next_n)
                sock.sendto(data, address)
                pending[call_id] = [data, perf(), 0]
                next_n += 1
            try:
                reply = sock.recv(65535)
            except TimeoutError:
                now = perf()
                for entry in pending.values():
                    if now - entry[1] > RETRANSMIT_S * (2 ** min(entry[2], 3)):
                        sock.sendto(entry[0], address)
                        entry[1] = now
                        entry[2] += 1
                        retransmissions += 1
                continue
            code, call_id = self._parse(reply)
            if code is None or code < 200 or call_id not in pending:
                continue
            del pending[call_id]
            codes[code] += 1
            if code == 200:
                acked += 1
            last_ack = perf()
        return {
            "first_send": first,
            "last_answer": last_ack,
            "answered_200": acked,
            "other_codes": {str(k): v for k, v in codes.items() if k != 200},
            "unanswered": len(pending) + (end_n - next_n),
            "retransmissions": retransmissions,
            "injection_rate": round(acked / (last_ack - first), 1) if last_ack > first else None,
        }


class DmqInjector:
    """POST /v1/peers/PEER/broadcast on gateway B, as fast as ``window`` POSTs in flight allow."""

    def __init__(self, b: Gateway, body_size: int) -> None:
        self.url = f"{b.url}/v1/peers/{PEER}/broadcast"
        self.body_size = body_size
        self.sent = 0

    def close(self) -> None:
        pass

    def inject(self, count: int, window: int, timeout: float = 120.0) -> dict[str, Any]:
        first_seq = self.sent
        self.sent += count

        async def go() -> Any:
            limits = httpx.Limits(max_connections=window, max_keepalive_connections=window)
            async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as c:
                return await offer(
                    c,
                    self.url,
                    range(first_seq, first_seq + count),
                    first_seq,
                    1e9,  # as fast as the window allows
                    time.perf_counter(),
                    window,
                    self.body_size,
                    False,
                )

        stats = run_async(go())
        first = stats.first_start or time.perf_counter()
        return {
            "first_send": first,
            "last_answer": stats.last_done,
            "posted_202": stats.sent,
            "post_errors": dict(stats.errors),
            "injection_rate": round(stats.sent / (stats.last_done - first), 1)
            if stats.last_done > first
            else None,
        }


# --------------------------------------------------------------------------- bare server


def bare_main(conn: Any, peer: str) -> None:
    """The bare websockets server process: WebSocket on a TCP port, KDMQ-ish on UDP."""
    run_async(_bare(conn, peer))


async def _bare(conn: Any, peer: str) -> None:
    from websockets.asyncio.server import broadcast, serve

    loop = asyncio.get_running_loop()
    clients: set[Any] = set()
    epoch = secrets.token_hex(4)
    offset = 0
    #: Call-ID -> our 200, so that a retransmitted request is answered, not broadcast twice
    answered: dict[bytes, bytes] = {}
    order: deque[bytes] = deque()

    async def handler(ws: Any) -> None:
        clients.add(ws)
        try:
            await ws.wait_closed()
        finally:
            clients.discard(ws)

    class Kdmq(asyncio.DatagramProtocol):
        transport: asyncio.DatagramTransport

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            nonlocal offset
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            content_type = None
            call_id = b""
            keep = []
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name in (b"via", b"from", b"to", b"call-id", b"cseq"):
                    keep.append(line)
                    if name == b"call-id":
                        call_id = value.strip()
                elif name == b"content-type":
                    content_type = value.strip().decode()
            cached = answered.get(call_id)
            if cached is not None:  # a retransmission: answer again, do not broadcast again
                self.transport.sendto(cached, addr)
                return
            offset += 1
            frame = json.dumps(
                {
                    "type": "message",
                    "offset": offset,
                    "epoch": epoch,
                    "id": f"{epoch}-{offset}",
                    "peer": peer,
                    "from": f"sip:{addr[0]}:{addr[1]}",
                    "content_type": content_type,
                    "body": body.decode("utf-8", "replace"),
                },
                separators=(",", ":"),
            )
            broadcast(clients, frame)
            reply = b"SIP/2.0 200 OK\r\n" + b"\r\n".join(keep) + b"\r\nContent-Length: 0\r\n\r\n"
            answered[call_id] = reply
            order.append(call_id)
            if len(order) > 100_000:
                answered.pop(order.popleft(), None)
            self.transport.sendto(reply, addr)

    async with serve(handler, "127.0.0.1", 0) as server:
        ws_port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_datagram_endpoint(Kdmq, local_addr=("127.0.0.1", 0))
        udp_port = transport.get_extra_info("sockname")[1]
        conn.send(("ready", ws_port, udp_port, type(loop).__module__))
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command[0] == "count":
                conn.send(("count", len(clients)))
            else:
                break
        transport.close()
    conn.close()


class BareServer:
    name = "bare"

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=bare_main, args=(child, PEER), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(60):
            raise RuntimeError("the bare websockets server did not start")
        _, self.ws_port, self.udp_port, self.loop_module = self.conn.recv()

    @property
    def pid(self) -> int:
        pid = self.proc.pid
        assert pid is not None
        return pid

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/v1/peers/{PEER}/subscribe"

    def subscribers(self) -> int:
        self.conn.send(("count",))
        return int(self.conn.recv()[1])

    def describe(self) -> dict[str, Any]:
        return {
            "server": "websockets.asyncio.server.serve + broadcast",
            "event_loop": self.loop_module,
            "compression": "deflate (websockets default: server_max_window_bits=12, "
            "client_max_window_bits=12, memLevel=5, as uvicorn's)",
            "ws_port": self.ws_port,
        }

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("stop",))
        self.proc.join(10)
        if self.proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.proc.join(5)


class GatewayServer:
    name = "gateway"

    def __init__(self, args: argparse.Namespace, workdir: Path, compression: str) -> None:
        # The gateway offers permessage-deflate only with --ws-deflate (off by default);
        # in the deflate mode it is turned on so that both servers compress alike.
        extra = ["--ws-deflate"] if compression == "deflate" else []
        self.a = bench_gateway(
            "A", workdir, queue_limit=max(1000, args.messages + 100), extra=extra
        )
        self.b: Gateway | None = None
        self.a.start()
        try:
            register_peer(self.a, PEER, history=args.history)
            if args.inject == "dmq":
                self.b = bench_gateway("B", workdir, notify=[self.a])
                self.b.start()
                wait_joined([self.a, self.b], 1)
        except Exception:
            self.stop()
            raise
        self.udp_port = self.a.sip_port

    @property
    def pid(self) -> int:
        return self.a.pid

    @property
    def url(self) -> str:
        return f"{self.a.ws_url}/v1/peers/{PEER}/subscribe"

    def subscribers(self) -> int:
        return int(peer_info(self.a, PEER)["subscribers"])

    def describe(self) -> dict[str, Any]:
        return {
            "server": "dmq-gateway serve (uvicorn, websockets-sansio, uvloop if installed)",
            "args": self.a.args[1:],
            "b_args": self.b.args[1:] if self.b else None,
        }

    def stop(self) -> None:
        for g in (self.b, self.a):
            if g is not None:
                g.stop()


# --------------------------------------------------------------------------- clients


def client_main(conn: Any, url: str, n: int, compression: str | None, opening: int) -> None:
    """A client process: ``n`` WebSocket connections that count the frames they get."""
    run_async(_clients(conn, url, n, compression, opening))


class _Round:
    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.target = 0
        self.done = 0
        self.live = size
        self.first: float | None = None
        self.last: float | None = None
        self.frame_bytes: int | None = None
        self.finished = asyncio.Event()


async def _clients(conn: Any, url: str, n: int, compression: str | None, opening: int) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    loop = asyncio.get_running_loop()
    errors: Counter[str] = Counter()
    gate = asyncio.Semaphore(opening)

    async def open_one() -> Any:
        async with gate:
            try:
                return await connect(
                    url,
                    compression=compression,
                    proxy=None,
                    ping_interval=None,
                    open_timeout=120,
                    close_timeout=5,
                    max_queue=64,
                )
            except Exception as exc:
                errors[type(exc).__name__] += 1
                return None

    opened = await asyncio.gather(*(open_one() for _ in range(n)))
    sockets = [ws for ws in opened if ws is not None]
    state = _Round(len(sockets))
    closes: Counter[str] = Counter()
    perf = time.perf_counter

    async def read(i: int, ws: Any) -> None:
        counts = state.counts
        try:
            while True:
                data = await ws.recv(decode=False)
                now = perf()
                c = counts[i] + 1
                counts[i] = c
                if state.first is None:
                    state.first = now
                    state.frame_bytes = len(data)
                state.last = now
                if c == state.target:
                    state.done += 1
                    if state.done >= state.live:
                        state.finished.set()
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            closes[str(code)] += 1
        finally:
            state.live -= 1
            if state.done >= state.live and state.target:
                state.finished.set()

    readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(sockets)]
    extensions = None
    if sockets and sockets[0].response is not None:
        extensions = sockets[0].response.headers.get("Sec-WebSocket-Extensions")
    conn.send(("ready", len(sockets), dict(errors), extensions))
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command[0] == "arm":
            _, target, timeout, idle = command
            state.counts[:] = [0] * len(sockets)
            state.target = target
            state.done = 0
            state.first = state.last = None
            state.finished.clear()
            conn.send(("armed",))
            armed = perf()
            while not state.finished.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.finished.wait(), 0.2)
                now = perf()
                if now - armed > timeout:
                    break
                if state.last is not None and now - state.last > idle:
                    break
            conn.send(
                (
                    "result",
                    {
                        "frames": sum(state.counts),
                        "first": state.first,
                        "last": state.last,
                        "complete": state.done,
                        "connections": len(sockets),
                        "min_frames": min(state.counts) if state.counts else 0,
                        "frame_bytes": state.frame_bytes,
                        "closed": dict(closes),
                    },
                )
            )
        else:
            break
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    conn.send(("closed",))


class Clients:
    """``total`` WebSocket connections to ``url``, spread over ``procs`` processes."""

    def __init__(
        self, url: str, total: int, procs: int, compression: str, args: argparse.Namespace
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        procs = max(1, min(procs, total))
        shares = [total // procs + (1 if i < total % procs else 0) for i in range(procs)]
        offer = None if compression == "none" else compression
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.open_s = 0.0
        started = time.perf_counter()
        try:
            for share in shares:
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=client_main,
                    args=(child, url, share, offer, args.opening),
                    daemon=True,
                )
                proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
            self.connected = 0
            self.errors: Counter[str] = Counter()
            self.extensions: str | None = None
            for conn in self.conns:
                if not conn.poll(300):
                    raise RuntimeError("a client process did not connect in 300 s")
                try:
                    _, ok, errors, extensions = conn.recv()
                except EOFError:
                    raise RuntimeError("a client process exited while connecting") from None
                self.connected += ok
                self.errors.update(errors)
                self.extensions = self.extensions or extensions
        except BaseException:
            self.close()
            raise
        self.open_s = time.perf_counter() - started

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def cpu_seconds(self) -> float:
        return sum(process_cpu_seconds(pid) or 0.0 for pid in self.pids)

    def arm(self, target: int, timeout: float, idle: float) -> None:
        for conn in self.conns:
            conn.send(("arm", target, timeout, idle))
        for conn in self.conns:
            conn.recv()

    def results(self, timeout: float) -> list[dict[str, Any]]:
        out = []
        for conn in self.conns:
            if not conn.poll(timeout + 30):
                raise RuntimeError("a client process did not report")
            out.append(conn.recv()[1])
        return out

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("close",))
        for conn in self.conns:
            with contextlib.suppress(OSError, EOFError):
                if conn.poll(30):
                    conn.recv()
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.join(5)
        self.procs.clear()
        self.conns.clear()


# --------------------------------------------------------------------------- the run


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def wait_subscribers(server: Any, expected: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        held = int(server.subscribers())
        if held >= expected or time.monotonic() > deadline:
            return held
        time.sleep(0.1)


def measure_memory(
    server: Any, args: argparse.Namespace, injector: Any, compression: str
) -> dict[str, Any]:
    """RSS before and after ``--idle-connections`` idle subscriptions, after a warm-up."""
    warm = Clients(server.url, 10, 1, compression, args)
    try:
        wait_subscribers(server, warm.connected)
        warm.arm(5, 30, 5)
        injector.inject(5, args.window)
        warm.results(30)
    finally:
        warm.close()
    time.sleep(args.settle)
    before = process_rss_kb(server.pid)
    clients = Clients(server.url, args.idle_connections, args.client_procs, compression, args)
    try:
        held = wait_subscribers(server, clients.connected)
        time.sleep(args.settle)
        after = process_rss_kb(server.pid)
    finally:
        clients.close()
    per = None
    if before is not None and after is not None and clients.connected:
        per = (after - before) / clients.connected
    return {
        "connections": clients.connected,
        "server_held": held,
        "connect_errors": dict(clients.errors),
        "extensions": clients.extensions,
        "rss_before_kb": before,
        "rss_after_kb": after,
        "per_connection_kb": rnd(per, 2),
        "open_s": rnd(clients.open_s, 2),
    }


def measure_level(
    server: Any, level: int, args: argparse.Namespace, injector: Any, compression: str
) -> dict[str, Any]:
    clients = Clients(server.url, level, args.client_procs, compression, args)
    try:
        held = wait_subscribers(server, clients.connected)
        time.sleep(min(args.settle, 1.0))
        clients.arm(args.messages, args.level_timeout, args.idle_timeout)
        cpu0 = (process_cpu_seconds(server.pid), clients.cpu_seconds())
        wall0 = time.perf_counter()
        injected = injector.inject(args.messages, args.window)
        reports = clients.results(args.level_timeout)
        wall1 = time.perf_counter()
        cpu1 = (process_cpu_seconds(server.pid), clients.cpu_seconds())
        pressure = cpu_pressure()
    finally:
        clients.close()
    frames = sum(r["frames"] for r in reports)
    lasts = [r["last"] for r in reports if r["last"] is not None]
    first = injected["first_send"]
    span = (max(lasts) - first) if lasts else 0.0
    expected = clients.connected * args.messages
    elapsed = wall1 - wall0
    server_cpu = None if cpu0[0] is None or cpu1[0] is None else cpu1[0] - cpu0[0]
    client_cpu = cpu1[1] - cpu0[1]
    closed: Counter[str] = Counter()
    for r in reports:
        closed.update(r["closed"])
    sizes = {r["frame_bytes"] for r in reports if r["frame_bytes"]}
    return {
        "subscribers": clients.connected,
        "server_held": held,
        "connect_errors": dict(clients.errors),
        "extensions": clients.extensions,
        "messages": args.messages,
        "deliveries_expected": expected,
        "deliveries": frames,
        "missing": expected - frames,
        "min_frames_per_subscriber": min((r["min_frames"] for r in reports), default=0),
        "closed_by_server": dict(closed),
        "frame_bytes": sorted(sizes),
        "fanout_s": rnd(span),
        "deliveries_per_s": round(frames / span, 1) if span > 0 else None,
        "messages_per_s": round(frames / span / clients.connected, 1)
        if span > 0 and clients.connected
        else None,
        "injection": {k: v for k, v in injected.items() if k not in ("first_send", "last_answer")},
        "injection_s": rnd(injected["last_answer"] - first),
        "server_cpu_s": rnd(server_cpu),
        "server_cpu_pct": None if server_cpu is None else round(100 * server_cpu / elapsed, 1),
        "server_cpu_us_per_delivery": rnd(server_cpu / frames * 1e6, 2)
        if server_cpu is not None and frames
        else None,
        "clients_cpu_s": rnd(client_cpu),
        "clients_cpu_pct": round(100 * client_cpu / elapsed, 1),
        "clients_cpu_us_per_delivery": rnd(client_cpu / frames * 1e6, 2) if frames else None,
        "client_procs": len(clients.pids) or args.client_procs,
        "cpu_pressure_some_avg10": pressure,
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median deliveries/s (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r["deliveries_per_s"] or 0.0)
    return ordered[(len(ordered) - 1) // 2]


def run_mode(compression: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every server, for one compression mode: memory first, then the levels, interleaved.

    Both servers run for the whole mode; each level is measured ``--repeats`` times,
    alternating gateway and bare run by run, so that a change in the machine's load
    during the mode falls on both alike. The median run is reported.
    """
    run: dict[str, Any] = {"compression": compression, "targets": {}}
    servers: dict[str, Any] = {}
    injectors: dict[str, Any] = {}
    samples: dict[str, dict[int, list[dict[str, Any]]]] = {}

    def fail(kind: str, exc: BaseException) -> None:
        run["targets"][kind]["error"] = f"{type(exc).__name__}: {exc}"
        log(f"[{compression}] {kind}: FAILED: {type(exc).__name__}: {exc}")
        log_path = workdir / "gateway-A.log"
        if kind == "gateway" and log_path.exists():
            log(log_path.read_text(errors="replace")[-3000:])
        server = servers.pop(kind, None)
        if server is not None:
            server.stop()

    try:
        for kind in args.server_list:
            entry: dict[str, Any] = {"levels": {}}
            run["targets"][kind] = entry
            try:
                server = (
                    GatewayServer(args, workdir, compression) if kind == "gateway" else BareServer()
                )
            except Exception as exc:
                fail(kind, exc)
                continue
            servers[kind] = server
            entry["server"] = server.describe()
            if kind == "gateway" and args.inject == "dmq":
                assert server.b is not None
                injectors[kind] = DmqInjector(server.b, args.body_size)
                entry["injection"] = "dmq: POST broadcast on gateway B (httpx, keep-alive)"
            else:
                injectors[kind] = UdpInjector(server.udp_port, PEER, args.body_size)
                entry["injection"] = "udp: KDMQ requests from this process, counted 200s"
            entry["rss_at_start_kb"] = process_rss_kb(server.pid)
            samples[kind] = {level: [] for level in args.level_list}
        if args.idle_connections:
            for kind, server in list(servers.items()):
                try:
                    memory = measure_memory(server, args, injectors[kind], compression)
                except Exception as exc:
                    fail(kind, exc)
                    continue
                run["targets"][kind]["memory"] = memory
                log(
                    f"[{compression}] {kind}: {memory['connections']} idle connections: RSS "
                    f"{memory['rss_before_kb']} -> {memory['rss_after_kb']} KB = "
                    f"{memory['per_connection_kb']} KB per connection"
                )
        for level in args.level_list:
            for repeat in range(args.repeats):
                for kind, server in list(servers.items()):
                    try:
                        result = measure_level(server, level, args, injectors[kind], compression)
                    except Exception as exc:
                        fail(kind, exc)
                        continue
                    samples[kind][level].append(result)
                    log(
                        f"[{compression}] {kind}: {result['subscribers']} subscribers x "
                        f"{args.messages} messages (run {repeat + 1}/{args.repeats}): "
                        f"{result['deliveries']}/{result['deliveries_expected']} delivered in "
                        f"{result['fanout_s']} s = {result['deliveries_per_s']} deliveries/s; "
                        f"server {result['server_cpu_us_per_delivery']} us CPU per delivery; "
                        f"CPU % server {result['server_cpu_pct']}, clients "
                        f"{result['clients_cpu_pct']}"
                    )
        for kind, server in servers.items():
            run["targets"][kind]["rss_at_end_kb"] = process_rss_kb(server.pid)
    finally:
        for injector in injectors.values():
            injector.close()
        for server in servers.values():
            server.stop()
    for kind, per_level in samples.items():
        for level, runs in per_level.items():
            if not runs:
                continue
            chosen = dict(median_run(runs))
            chosen["runs"] = len(runs)
            chosen["deliveries_per_s_all_runs"] = [r["deliveries_per_s"] for r in runs]
            chosen["server_cpu_us_per_delivery_all_runs"] = [
                r["server_cpu_us_per_delivery"] for r in runs
            ]
            run["targets"][kind]["levels"][str(level)] = chosen
    return run


# --------------------------------------------------------------------------- chart


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"gateway": "#dd8452", "bare": "#4c72b0"}
    labels = {"gateway": "dmq-gateway", "bare": "bare websockets broadcast"}
    runs = report.get("runs") or []
    fig, axes = plt.subplots(
        max(1, len(runs)),
        2,
        figsize=(13, 4.6 * max(1, len(runs))),
        dpi=110,
        gridspec_kw={"width_ratios": [3, 2]},
        squeeze=False,
    )
    levels = [str(v) for v in report["parameters"]["levels"]]
    for row, run in enumerate(runs):
        left, right = axes[row]
        mode = run["compression"]
        targets = run.get("targets", {})
        names = [n for n in ("gateway", "bare") if "levels" in targets.get(n, {})]
        top = 0.0
        for i, name in enumerate(names):
            per = targets[name]["levels"]
            values = [(per.get(lv) or {}).get("deliveries_per_s") or 0.0 for lv in levels]
            top = max([top, *values])
            xs = [j + (i - (len(names) - 1) / 2) * 0.38 for j in range(len(levels))]
            bars = left.bar(xs, values, 0.38, color=colours[name], label=labels[name])
            left.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8, padding=2)
        for j, lv in enumerate(levels):
            ratio = run.get("ratio_gateway_over_bare", {}).get(lv)
            cpu_ratio = run.get("cpu_ratio_bare_over_gateway", {}).get(lv)
            if ratio is not None:
                left.annotate(
                    f"gateway/bare = {ratio:.2f}"
                    + (
                        f"\n(server CPU per delivery, bare/gateway: {cpu_ratio:.2f})"
                        if cpu_ratio
                        else ""
                    ),
                    (j, top * 1.1),
                    ha="center",
                    fontsize=8,
                    fontweight="bold",
                    color="#2a7a2a" if ratio >= TARGET_RATIO else "#c44e52",
                )
        left.set_xticks(range(len(levels)), [f"{lv} subscribers" for lv in levels])
        left.set_ylabel("deliveries per second")
        left.set_ylim(0, top * 1.3 if top else 1)
        left.set_title(
            f"compression {mode}: fan-out of {report['parameters']['messages']:,} messages "
            f"(target gateway/bare >= {TARGET_RATIO})",
            fontsize=10,
        )
        left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
        left.grid(axis="y", alpha=0.3)

        names = [n for n in ("gateway", "bare") if n in targets]
        values = [((targets[n].get("memory") or {}).get("per_connection_kb") or 0.0) for n in names]
        bars = right.bar([labels[n] for n in names], values, 0.5, color=[colours[n] for n in names])
        right.bar_label(
            bars, labels=[f"{v:.1f} KB" if v else "n/a" for v in values], fontsize=9, padding=2
        )
        right.axhline(CENTRIFUGO_KB, color="#c44e52", linestyle="--", linewidth=1)
        right.annotate(
            f"Centrifugo ~{CENTRIFUGO_KB:g}-30 KB",
            (0.02, CENTRIFUGO_KB),
            xycoords=("axes fraction", "data"),
            fontsize=8,
            color="#c44e52",
            xytext=(0, 3),
            textcoords="offset points",
        )
        right.set_ylim(0, max([*values, CENTRIFUGO_KB]) * 1.3)
        right.set_ylabel("RSS growth per idle connection (KB)")
        right.set_title(
            f"compression {mode}: memory per idle WebSocket "
            f"({report['parameters']['idle_connections']:,} connections)",
            fontsize=10,
        )
        right.grid(axis="y", alpha=0.3)
    m = report["machine"]
    p = report["parameters"]
    fig.suptitle(
        f"WebSocket fan-out on loopback: injection {p['inject']}, {p['client_procs']} client "
        f"processes, {p['body_size']}-byte bodies\n{m.get('nproc')} CPUs, Python "
        f"{m.get('python')}, websockets {m['packages'].get('websockets')}, uvicorn "
        f"{m['packages'].get('uvicorn')}, {m.get('timestamp')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ws_fanout",
        description="WebSocket fan-out of the gateway against a bare websockets server.",
    )
    parser.add_argument("--levels", default="100,1000", help="comma-separated subscriber counts")
    parser.add_argument("--messages", type=int, default=1000, help="messages per level (M)")
    parser.add_argument("--body-size", type=int, default=128, help="bytes per message body")
    parser.add_argument(
        "--idle-connections",
        type=int,
        default=1000,
        help="idle subscriptions for the memory measurement (0: skip it)",
    )
    parser.add_argument(
        "--inject",
        choices=("udp", "dmq"),
        default="udp",
        help="udp: KDMQ requests from this process; dmq: POST broadcast on a gateway B "
        "(gateway only; the bare server always gets UDP)",
    )
    parser.add_argument("--window", type=int, default=16, help="injections in flight at most")
    parser.add_argument(
        "--client-procs",
        type=int,
        default=max(2, min(8, (os.cpu_count() or 2) - 1)),
        help="client processes holding the connections",
    )
    parser.add_argument(
        "--compression",
        default="deflate,none",
        help="comma-separated client offers, each a full run of every server: deflate "
        "(permessage-deflate, as browsers offer it) and/or none",
    )
    parser.add_argument("--opening", type=int, default=50, help="handshakes in flight per process")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before reading RSS")
    parser.add_argument("--history", type=int, default=100, help="the gateway peer's history")
    parser.add_argument(
        "--servers", default="gateway,bare", help="comma-separated: gateway, bare (in order)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each level per server, alternating servers; the median is reported",
    )
    parser.add_argument("--level-timeout", type=float, default=300.0, help="seconds per level")
    parser.add_argument(
        "--idle-timeout", type=float, default=10.0, help="a level ends after this long silent"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    args = parser.parse_args(argv)
    try:
        args.level_list = [int(v) for v in args.levels.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--levels {args.levels!r}: must be comma-separated whole numbers")
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.modes = [m.strip() for m in args.compression.split(",") if m.strip()]
    if not args.modes or not set(args.modes) <= {"deflate", "none"}:
        parser.error("--compression takes deflate and/or none")
    if not set(args.server_list) <= {"gateway", "bare"}:
        parser.error("--servers takes gateway and/or bare")
    if (
        args.messages < 1
        or any(v < 1 for v in args.level_list)
        or args.client_procs < 1
        or args.repeats < 1
    ):
        parser.error("--messages, --levels, --client-procs and --repeats must be positive")
    return args


def summarise(run: dict[str, Any], levels: Sequence[int]) -> None:
    """Ratios and memory of one compression mode, and whether the targets are met."""
    targets = run["targets"]
    gateway = targets.get("gateway", {})
    bare = targets.get("bare", {})
    ratio: dict[str, float | None] = {}
    cpu_ratio: dict[str, float | None] = {}
    for level in levels:
        g = gateway.get("levels", {}).get(str(level)) or {}
        b = bare.get("levels", {}).get(str(level)) or {}
        gv, bv = g.get("deliveries_per_s"), b.get("deliveries_per_s")
        ratio[str(level)] = round(gv / bv, 3) if gv and bv else None
        gc, bc = g.get("server_cpu_us_per_delivery"), b.get("server_cpu_us_per_delivery")
        cpu_ratio[str(level)] = round(bc / gc, 3) if gc and bc else None
    run["ratio_gateway_over_bare"] = ratio
    run["cpu_ratio_bare_over_gateway"] = cpu_ratio
    gateway_kb = (gateway.get("memory") or {}).get("per_connection_kb")
    run["memory_per_idle_connection_kb"] = {
        "gateway": gateway_kb,
        "bare": (bare.get("memory") or {}).get("per_connection_kb"),
        "reference_centrifugo": "27-30",
    }
    ratios = [r for r in ratio.values() if r is not None]
    run["targets_met"] = {
        "ratio_at_least_0_8": all(r >= TARGET_RATIO for r in ratios) if ratios else None,
        "memory_below_27_kb": None if gateway_kb is None else gateway_kb < CENTRIFUGO_KB,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="ws-fanout-"))
    report: dict[str, Any] = {
        "benchmark": "ws-fanout",
        "machine": machine_info(),
        "parameters": {
            "levels": args.level_list,
            "messages": args.messages,
            "body_size": args.body_size,
            "idle_connections": args.idle_connections,
            "inject": args.inject,
            "window": args.window,
            "client_procs": args.client_procs,
            "repeats": args.repeats,
            "compression_modes": args.modes,
            "settle_s": args.settle,
            "history": args.history,
            "gateway_ws_queue_limit": max(1000, args.messages + 100),
            "servers": args.server_list,
        },
        "method": {
            "deliveries_per_s": "frames received by all subscribers / (first injection .. "
            "last frame received, perf_counter = CLOCK_MONOTONIC across processes)",
            "ratio_gateway_over_bare": "deliveries_per_s of the gateway / of the bare server",
            "cpu_ratio_bare_over_gateway": "server CPU us per delivery of the bare server / "
            "of the gateway (less sensitive to a busy machine; 1 = as cheap as bare)",
            "injection": "M messages as fast as the server answers, --window in flight",
            "repeats": "each level --repeats times per server, gateway and bare alternating "
            "run by run (both servers up for the whole mode); the median run by "
            "deliveries_per_s is reported, every run's figure under *_all_runs",
            "memory": "(VmRSS after opening N idle subscriptions and --settle s - VmRSS "
            "before, after a warm-up) / N, KB",
            "clients": "websockets asyncio client in --client-procs spawned processes, "
            "recv(decode=False), counting frames",
            "compression": "deflate: the clients offer permessage-deflate and both servers "
            "accept it (uvicorn and websockets defaults: 12-bit windows, memLevel 5); none: "
            "the clients offer nothing",
        },
        "runs": [],
    }
    code = 0
    try:
        for mode in args.modes:
            run = run_mode(mode, args, workdir)
            report["runs"].append(run)
            if any("error" in t for t in run["targets"].values()):
                code = 1
            summarise(run, args.level_list)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["summary"] = {
        run["compression"]: {
            "ratio_gateway_over_bare": run["ratio_gateway_over_bare"],
            "cpu_ratio_bare_over_gateway": run["cpu_ratio_bare_over_gateway"],
            "memory_per_idle_connection_kb": run["memory_per_idle_connection_kb"],
            "targets_met": run["targets_met"],
        }
        for run in report["runs"]
    }
    json_path = args.out / "ws-fanout.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png_path = args.out / "ws-fanout.png"
    plot(report, png_path)
    for mode, summary in report["summary"].items():
        log(
            f"[{mode}] gateway/bare deliveries/s: {summary['ratio_gateway_over_bare']}; "
            f"CPU per delivery bare/gateway: {summary['cpu_ratio_bare_over_gateway']}; "
            f"KB per idle connection: {summary['memory_per_idle_connection_kb']}"
        )
    log(f"wrote {json_path} and {png_path}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
