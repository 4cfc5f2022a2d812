"""Ingress: how many messages one gateway takes in, and what each costs it.

In one run, on this machine:

- **per POST**, closed loop, ``--concurrency`` POSTs in flight, ``--rounds`` rounds in
  which the four take turns (each figure the median of its rounds): a raw ASGI app and a
  minimal FastAPI route (each in a uvicorn process of its own, with the gateway's HTTP
  stack: uvloop, httptools, no access log) that do the same UDP send of the body and
  answer a small JSON id, then gateway A's ``POST /v1/peers/{peer}/broadcast`` through
  FastAPI's router and through the fast path. The router is reached with a timeout
  spelled with an exponent (``timeout=3e1``), which the fast path leaves to FastAPI.
- **batch**: ``POST .../broadcast/batch`` with ``--batch`` messages each.
- **WebSocket publish**: ``GET .../publish``, one connection, up to ``--window``
  publishes unacknowledged.

Gateway A sends every message to gateway B (default timers, ``--peer``), where a
subscriber in a process of its own counts them: nothing may be lost, duplicated or
reordered. Order is what one sender asked for: each per-POST worker sends its next
message once the last was accepted, so its messages must arrive in its order (messages
of workers in flight at once have no order between them, and are not compared); a
batch, and the publishing WebSocket, are one sender each. For each mode: the server's
CPU µs per message (psutil, the process under test alone: the machine is shared),
messages per second end to end (first send to last arrival at B's subscriber), the UDP
drops of B's socket, and the machine's load.
Writes ``bench/results/ingress.json`` and ``ingress.png``.

    .venv/bin/python -m bench.ingress [--posts 3000] [--messages 30000]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel

from bench.common import (
    RESULTS,
    ROOT,
    bench_gateway,
    cpu_pressure,
    machine_info,
    process_cpu_seconds,
    register_peer,
    rnd,
    run_async,
    udp_drops,
    wait_joined,
)
from bench.gateway_e2e import RawHttpClient
from harness.ports import free_port
from harness.waiting import wait_until

PEER = "ingress"


# --------------------------------------------------------------------------- baselines


class Accepted(BaseModel):
    """The minimal FastAPI route's answer."""

    id: str
    peer: str


def _raw_app(sock: socket.socket, target: tuple[str, int]) -> Any:
    """The least an ASGI app can do for the same request: read the body, send it in one
    datagram, answer 202 with a JSON id."""
    count = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal count
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        count += 1
        sock.sendto(body, target)
        payload = b'{"id":"%d"}' % count
        await send(
            {
                "type": "http.response.start",
                "status": 202,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(payload)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    return app


def _fastapi_app(sock: socket.socket, target: tuple[str, int]) -> Any:
    """A minimal FastAPI route doing the same: a path parameter, the body, a model out."""
    app = FastAPI()
    count = 0

    @app.post("/v1/peers/{peer_id}/broadcast", status_code=202)
    async def broadcast(peer_id: str, request: Request) -> Accepted:
        nonlocal count
        body = await request.body()
        count += 1
        sock.sendto(body, target)
        return Accepted(id=str(count), peer=peer_id)

    return app


def serve_baseline(kind: str, port: int, sink: int) -> None:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = ("127.0.0.1", sink)
    app = _raw_app(sock, target) if kind == "raw" else _fastapi_app(sock, target)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


# --------------------------------------------------------------------------- subscriber


async def subscribe(url: str, expected: int, timeout: float) -> None:
    """Count message frames until ``expected`` arrived or ``timeout`` passed; print a
    JSON summary (arrival times are wall clock, comparable across processes)."""
    import websockets

    seen: set[int] = set()
    duplicates = inversions = 0
    #: The last seq received from each sender (``w`` in the body: a per-POST worker).
    last_seq: dict[int, int] = {}
    first_at = last_at = None
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        json.loads(await ws.recv())  # the subscribed frame
        print("ready", flush=True)
        deadline = time.monotonic() + timeout
        while len(seen) < expected:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                raw = await asyncio.wait_for(ws.recv(), left)
            except TimeoutError:
                break
            frame = json.loads(raw)
            if frame.get("type") != "message":
                continue
            now = time.time()
            first_at = first_at or now
            last_at = now
            body = json.loads(frame["body"])
            seq, sender = body["s"], body.get("w", 0)
            if seq in seen:
                duplicates += 1
                continue
            if seq < last_seq.get(sender, -1):
                inversions += 1
            last_seq[sender] = seq
            seen.add(seq)
    summary = {
        "received": len(seen),
        "duplicates": duplicates,
        "inversions": inversions,
        "first_at": first_at,
        "last_at": last_at,
    }
    print(json.dumps(summary), flush=True)


class Subscriber:
    """A subscriber on B in a process of its own, so that it never competes with the
    load generator for one event loop."""

    def __init__(self, url: str, expected: int, timeout: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.ingress", "--subscribe", url, str(expected),
             str(timeout)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
            text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"the subscriber did not start: {line!r}")

    def result(self) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=600)
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result


# --------------------------------------------------------------------------- load


def _body(seq: int, sender: int = 0) -> bytes:
    """A message: its seq, and which sender (``w``) sent it, whose order it must keep."""
    return b'{"s":%d,"w":%d}' % (seq, sender)


async def post_each(url: str, seqs: range, concurrency: int, params: dict[str, str]) -> int:
    """POST one body per seq, ``concurrency`` at a time in order of seq per worker;
    returns how many were not accepted."""
    failures = 0
    async with RawHttpClient(concurrency) as client:
        queue = iter(seqs)

        async def worker(sender: int) -> None:
            nonlocal failures
            headers = {"Content-Type": "application/json"}
            for seq in queue:
                answer = await client.post(
                    url, content=_body(seq, sender), headers=headers, params=params
                )
                if answer.status_code != 202:
                    failures += 1

        await asyncio.gather(*(worker(sender) for sender in range(1, concurrency + 1)))
    return failures


async def post_batches(url: str, seqs: range, batch: int) -> int:
    """One batch at a time, in order (the order of a batch is kept on the wire; two
    batches in flight at once would interleave)."""
    failures = 0
    async with RawHttpClient(1) as client:
        headers = {"Content-Type": "application/json"}
        for start in range(seqs.start, seqs.stop, batch):
            items = [
                {"body": _body(s).decode()} for s in range(start, min(start + batch, seqs.stop))
            ]
            answer = await client.post(
                url, content=json.dumps(items).encode(), headers=headers, params=None
            )
            if answer.status_code != 202:
                failures += len(items)
    return failures


async def publish_ws(url: str, seqs: range, window: int) -> int:
    """Publish every seq over one WebSocket with up to ``window`` unacknowledged."""
    import websockets

    failures = 0
    room = asyncio.Semaphore(window)
    done = asyncio.Event()
    expected = len(seqs)
    async with websockets.connect(url, max_size=None, compression=None) as ws:

        async def read_acks() -> None:
            nonlocal failures
            acked = 0
            async for raw in ws:
                frame = json.loads(raw)
                acked += 1
                if frame.get("type") != "ack" or frame["results"][0]["code"] != 200:
                    failures += 1
                room.release()
                if acked == expected:
                    done.set()
                    return

        reader = asyncio.ensure_future(read_acks())
        for seq in seqs:
            await room.acquire()
            await ws.send(f'{{"type":"publish","id":"{seq}","body":"{{\\"s\\":{seq}}}"}}')
        await asyncio.wait((reader,), timeout=120)
    return failures if done.is_set() else failures + 1


# --------------------------------------------------------------------------- phases


def measure(
    name: str,
    pid: int,
    count: int,
    load: Any,
    subscriber_url: str | None = None,
    drops_port: int | None = None,
    extra_pids: tuple[int, ...] = (),
) -> dict[str, Any]:
    subscriber = Subscriber(subscriber_url, count, 120) if subscriber_url else None
    drops_before = udp_drops(drops_port) if drops_port else None
    cpu_before = process_cpu_seconds(pid) or 0.0
    extra_before = [process_cpu_seconds(p) or 0.0 for p in extra_pids]
    load_before = os.getloadavg()[0]
    started_wall = time.time()
    started = time.perf_counter()
    failures = run_async(load())
    sent_s = time.perf_counter() - started
    result: dict[str, Any] = {"mode": name, "messages": count, "failures": failures}
    if subscriber is not None:
        delivery = subscriber.result()
        result["delivery"] = delivery
        end = delivery["last_at"] or time.time()
        result["end_to_end_s"] = rnd(end - started_wall)
        result["messages_per_s"] = round(delivery["received"] / (end - started_wall))
        result["lost"] = count - delivery["received"]
    else:
        result["messages_per_s"] = round(count / sent_s)
    cpu = (process_cpu_seconds(pid) or 0.0) - cpu_before
    result["send_s"] = rnd(sent_s)
    result["accepted_per_s"] = round(count / sent_s)
    result["server_cpu_s"] = rnd(cpu)
    result["cpu_us_per_message"] = rnd(cpu / count * 1e6, 1)
    result["server_cpu_share"] = rnd(cpu / sent_s, 2)
    if extra_pids:
        extra = [
            (process_cpu_seconds(p) or 0.0) - b
            for p, b in zip(extra_pids, extra_before, strict=True)
        ]
        result["receiver_cpu_us_per_message"] = rnd(extra[0] / count * 1e6, 1)
    if drops_port:
        result["udp_drops"] = (udp_drops(drops_port) or 0) - (drops_before or 0)
    result["loadavg_1m"] = [rnd(load_before, 2), rnd(os.getloadavg()[0], 2)]
    result["cpu_pressure_avg10"] = cpu_pressure()
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=3000, help="messages per POST mode")
    parser.add_argument("--messages", type=int, default=30000, help="per batch/WS mode")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="of the per-POST modes")
    parser.add_argument("--subscribe", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.subscribe:
        url, expected, timeout = args.subscribe
        run_async(subscribe(url, int(expected), float(timeout)))
        return
    if args.baseline:
        kind, port, sink = args.baseline
        serve_baseline(kind, int(port), int(sink))
        return
    report = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ingress.json").write_text(json.dumps(report, indent=2) + "\n")
    chart(report, RESULTS / "ingress.png")
    print(f"wrote {RESULTS / 'ingress.json'} and ingress.png")


def run(args: argparse.Namespace) -> dict[str, Any]:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))  # never read: the baselines' datagrams end here
    sink_port = sink.getsockname()[1]
    baselines: list[tuple[str, subprocess.Popen[bytes], str]] = []
    rounds: dict[str, list[dict[str, Any]]] = {}
    modes: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingress-") as tmp:
        work = Path(tmp)
        b = bench_gateway("B", work, queue_limit=200_000).start()
        a = bench_gateway("A", work, notify=[b]).start()
        try:
            for kind in ("raw", "fastapi"):
                port = free_port()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "bench.ingress", "--baseline", kind, str(port),
                     str(sink_port)],
                    cwd=ROOT,
                )  # fmt: skip
                name = "raw ASGI app" if kind == "raw" else "minimal FastAPI route"
                url = f"http://127.0.0.1:{port}/v1/peers/{PEER}/broadcast"
                baselines.append((name, proc, url))
                wait_until(functools.partial(_listening, port), 20, f"the {kind} baseline")
            wait_joined([a, b], 1)
            register_peer(a, PEER)
            register_peer(b, PEER)
            sub_url = f"{b.ws_url}/v1/peers/{PEER}/subscribe"
            post_url = f"{a.url}/v1/peers/{PEER}/broadcast"
            for _, _, url in baselines:
                run_async(post_each(url, range(300), args.concurrency, {}))  # warm up
            run_async(post_each(post_url, range(300), args.concurrency, {}))  # warm up
            seq = 1_000_000
            # The per-POST modes take turns, round after round, so that each sees the
            # same machine; each mode's figure is the median of its rounds.
            for _ in range(args.rounds):
                for name, proc, url in baselines:
                    rounds.setdefault(name, []).append(
                        measure(
                            name,
                            proc.pid,
                            args.posts,
                            lambda u=url: post_each(u, range(args.posts), args.concurrency, {}),
                        )
                    )
                for name, params in (
                    ("gateway POST, routed", {"timeout": "3e1"}),
                    ("gateway POST, fast path", {}),
                ):
                    seqs = range(seq, seq + args.posts)
                    seq += args.posts
                    rounds.setdefault(name, []).append(
                        measure(
                            name,
                            a.pid,
                            args.posts,
                            lambda s=seqs, p=params: post_each(post_url, s, args.concurrency, p),
                            sub_url,
                            b.sip_port,
                            (b.pid,),
                        )
                    )
            for runs in rounds.values():
                modes.append(_median_round(runs))
            seqs = range(seq, seq + args.messages)
            seq += args.messages
            modes.append(
                measure(
                    f"gateway batch of {args.batch}",
                    a.pid,
                    args.messages,
                    lambda s=seqs: post_batches(f"{post_url}/batch", s, args.batch),
                    sub_url,
                    b.sip_port,
                    (b.pid,),
                )
            )
            seqs = range(seq, seq + args.messages)
            modes.append(
                measure(
                    f"gateway WebSocket publish (window {args.window})",
                    a.pid,
                    args.messages,
                    lambda s=seqs: publish_ws(
                        f"{a.ws_url}/v1/peers/{PEER}/publish", s, args.window
                    ),
                    sub_url,
                    b.sip_port,
                    (b.pid,),
                )
            )
        finally:
            for _, proc, _ in baselines:
                proc.terminate()
                proc.wait(10)
            a.stop()
            b.stop()
    return {
        "machine": machine_info(),
        "parameters": vars(args),
        "modes": modes,
    }


def _median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median CPU per message, with every round's figure beside it
    (and, for the gateway, everything lost or failed in any round)."""
    ordered = sorted(runs, key=lambda r: r["cpu_us_per_message"])
    median = dict(ordered[len(ordered) // 2])
    median["rounds"] = len(runs)
    median["cpu_us_per_message_rounds"] = [r["cpu_us_per_message"] for r in runs]
    median["failures_all_rounds"] = sum(r["failures"] for r in runs)
    if "lost" in median:
        median["lost_all_rounds"] = sum(r["lost"] for r in runs)
    return median


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = report["modes"]
    names = [m["mode"] for m in modes]
    colours = ["#8c8c8c", "#8c8c8c", "#c44e52", "#4c72b0", "#55a868", "#dd8452"][: len(modes)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=110)
    cpu = [m["cpu_us_per_message"] for m in modes]
    left.barh(names, cpu, color=colours)
    for y, value in enumerate(cpu):
        left.annotate(f"{value:g} µs", (value, y), xytext=(3, 0), textcoords="offset points",
                      va="center", fontsize=9)  # fmt: skip
    left.invert_yaxis()
    left.set_xlabel("server CPU per message (µs)")
    left.set_title("(a) what one message costs the process taking it in", fontsize=10)
    rate = [m["messages_per_s"] for m in modes]
    right.barh(names, rate, color=colours)
    for y, (value, mode) in enumerate(zip(rate, modes, strict=True)):
        lost = mode.get("lost")
        note = f"{value:,}/s" + ("" if lost is None else f", lost {lost}")
        right.annotate(note, (value, y), xytext=(3, 0), textcoords="offset points",
                       va="center", fontsize=9)  # fmt: skip
    right.invert_yaxis()
    right.set_yticklabels([])
    right.axvline(10_000, color="#333333", linestyle="--", linewidth=1)
    right.set_xlabel("messages per second (gateways: end to end, A to a subscriber on B)")
    right.set_title("(b) throughput; dashed: the 10 000/s target", fontsize=10)
    fig.suptitle("Ingress into one gateway, with baselines doing the same UDP send, one run")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
