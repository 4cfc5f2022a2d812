"""Abuse at full size: every attack the bounds are for, against a real gateway with the
default limits of ``dmq-gateway serve``, while a normal client times ``GET /v1/health``
(p50/p99/max, failures). Writes ``bench/results/abuse.json``.

Each row records the gateway's RSS before, at its peak (sampled every 50 ms) and after,
its descriptors, its CPU seconds, and what the attacker saw (bytes taken, status lines,
how long a connection was held). ``--quick`` runs each at a tenth of its size. The last
row cuts a TCP link between two gateways for 60 s in a fault lab (root needed; recorded
as skipped otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from app.dmq import sip
from bench.common import RESULTS, machine_info
from harness.gateway import Gateway
from harness.netns import lab_unavailable
from harness.waiting import wait_until
from tests.abuse.partition import run_partition
from tests.abuse.support import (
    Probe,
    closed_by_peer,
    cpu_seconds,
    descriptors,
    kdmq,
    metric,
    refused_over_udp,
    rss_mb,
    send_until_blocked,
)

WORKDIR = Path("/tmp/dmq-bench-abuse")
TOKEN = "bench-abuse-token"


class Sampler:
    """The gateway's peak RSS and descriptors while an attack runs."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.peak_rss = 0.0
        self.peak_fds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, rss_mb(self.gateway))
                self.peak_fds = max(self.peak_fds, descriptors(self.gateway))
            except Exception:
                return
            self._stop.wait(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


@contextmanager
def measured(gateway: Gateway, row: dict[str, Any]) -> Iterator[None]:
    row["rss_before_mb"] = round(rss_mb(gateway), 1)
    row["fds_before"] = descriptors(gateway)
    cpu = cpu_seconds(gateway)
    log_at = gateway.log_size()
    with Sampler(gateway) as sampler, Probe(gateway) as probe:
        yield
    row["rss_peak_mb"] = round(sampler.peak_rss, 1)
    row["fds_peak"] = sampler.peak_fds
    row["cpu_seconds"] = round(cpu_seconds(gateway) - cpu, 2)
    time.sleep(1)
    row["rss_after_mb"] = round(rss_mb(gateway), 1)
    row["fds_after"] = descriptors(gateway)
    lines = gateway.log_text(log_at).splitlines()
    row["warning_lines"] = sum(" WARNING " in line for line in lines)
    row["health"] = probe.summary()
    row["alive"] = gateway.alive


def connect_from(gateway: Gateway, source: str, port: int | None = None) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port or gateway.sip_port))
    return sock


# --------------------------------------------------------------------------- SIP over TCP


def flood_unread(gateway: Gateway, requests: int) -> dict[str, Any]:
    """One connection, ``requests`` requests, the replies never read."""
    row: dict[str, Any] = {"requests": requests}
    blob = b"".join(kdmq(gateway.sip_port) for _ in range(2000))
    with measured(gateway, row), connect_from(gateway, "127.0.0.1") as sock:
        row["bytes_taken"] = send_until_blocked(
            sock, blob, limit=requests * len(blob) // 2000, timeout=3
        )
    row["requests_taken"] = row["bytes_taken"] * 2000 // len(blob)
    return row


def udp_untrusted(gateway: Gateway, requests: int) -> dict[str, Any]:
    """``requests`` KDMQ over UDP from an address outside ``--trusted``: each answered
    403 and counted, the log written once per source per interval."""
    row: dict[str, Any] = {"requests": requests}
    before = metric(gateway, "dmq_forbidden_total")
    with measured(gateway, row):
        row["answered_403"] = refused_over_udp(gateway, "127.0.0.1", requests)
    row["counted_in_metrics"] = int(metric(gateway, "dmq_forbidden_total") - before)
    return row


def tcp_partition(cut_s: float) -> dict[str, Any]:
    """Two gateways over TCP in a fault lab, the link between them cut ``cut_s``
    seconds by nftables, then healed (tests/abuse/partition.py); needs root."""
    reason = lab_unavailable()
    if reason is not None:
        return {"skipped": reason}
    workdir = WORKDIR / f"partition-{os.getpid()}"
    run = asyncio.run(run_partition(workdir, cut_s, rate=5.0, after_s=20.0, settle_s=120.0))
    return run.as_dict()


def half_sent(gateway: Gateway, connections: int, sources: int) -> dict[str, Any]:
    """Connections announcing 1 MB and sending 900 KB, from ``sources`` addresses."""
    row: dict[str, Any] = {"connections": connections, "sources": sources}
    message = kdmq(gateway.sip_port, body=b"b" * 1_000_000)
    socks: list[socket.socket] = []
    with measured(gateway, row):
        refused = 0
        for index in range(connections):
            try:
                sock = connect_from(gateway, f"127.0.0.{2 + index % sources}")
                sock.sendall(message[:900_000])
                socks.append(sock)
            except OSError:
                refused += 1
        started = time.monotonic()
        closed = [closed_by_peer(s, 30) for s in socks]
        row["held_s"] = round(time.monotonic() - started, 1)
        row["closed_by_gateway"] = sum(closed)
        row["refused_on_connect_or_send"] = refused
        for sock in socks:
            sock.close()
    return row


def trickle(gateway: Gateway, connections: int, seconds: float) -> dict[str, Any]:
    """Connections each sending a 1 MB message 64 bytes at a time."""
    row: dict[str, Any] = {"connections": connections, "seconds": seconds}
    message = kdmq(gateway.sip_port, body=b"t" * 1_000_000)
    socks = [connect_from(gateway, f"127.0.0.{2 + i % 8}") for i in range(connections)]
    for sock in socks:
        sock.setblocking(False)
    open_socks = list(socks)
    with measured(gateway, row):
        deadline = time.monotonic() + seconds
        offset = 0
        while time.monotonic() < deadline and open_socks:
            for sock in list(open_socks):
                try:
                    sock.send(message[offset : offset + 64])
                except OSError:
                    open_socks.remove(sock)
            offset = (offset + 64) % len(message)
            time.sleep(0.002)
    row["closed_by_gateway"] = connections - len(open_socks)
    row["gateway_cpu_percent"] = round(100 * row["cpu_seconds"] / seconds, 1)
    for sock in socks:
        sock.close()
    return row


def framer_cpu() -> dict[str, Any]:
    """CPU seconds the framer spends on a 1 MB message fed in 64-byte reads."""
    message = kdmq(5060, body=b"f" * 1_000_000)
    framer = sip.StreamFramer()
    started = time.process_time()
    out: list[bytes] = []
    for offset in range(0, len(message), 64):
        out += framer.feed(message[offset : offset + 64])
    assert out == [message]
    return {
        "bytes": len(message),
        "read_size": 64,
        "cpu_s": round(time.process_time() - started, 3),
    }


def header_names(gateway: Gateway, count: int) -> dict[str, Any]:
    """``count`` distinct header names of 60 KB each, over UDP (TCP's header cap refuses
    them on sight)."""
    row: dict[str, Any] = {"names": count, "name_bytes": 60_000}
    with measured(gateway, row), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for index in range(count):
            name = f"X-{index}-".encode() + b"n" * 60_000
            sock.sendto(
                kdmq(gateway.sip_port).replace(b"Max-Forwards", name),
                ("127.0.0.1", gateway.sip_port),
            )
            time.sleep(0.005)
    return row


# --------------------------------------------------------------------------- HTTP


def slowloris(gateway: Gateway, connections: int) -> dict[str, Any]:
    row: dict[str, Any] = {"connections": connections}
    socks: list[socket.socket] = []
    with measured(gateway, row):
        for _ in range(connections):
            try:
                sock = socket.create_connection(("127.0.0.1", gateway.http_port), timeout=5)
                sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
                socks.append(sock)
            except OSError:
                break
        row["opened"] = len(socks)
        started = time.monotonic()
        closed = sum(closed_by_peer(s, 30) for s in socks)
        row["closed_by_gateway"] = closed
        row["all_closed_after_s"] = round(time.monotonic() - started, 1)
        for sock in socks:
            sock.close()
    return row


def big_head(gateway: Gateway, size: int) -> dict[str, Any]:
    row: dict[str, Any] = {"announced_bytes": size}
    with measured(gateway, row):
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", gateway.http_port), timeout=10) as sock:
            sent = 0
            sock.sendall(b"GET /v1/health?")
            try:
                while sent < size:
                    sock.sendall(b"q" * 65_536)
                    sent += 65_536
            except OSError:
                pass
            row["bytes_sent_before_refused"] = sent
            row["status"] = _status_line(sock)
        row["seconds"] = round(time.monotonic() - started, 2)
    return row


def big_body(gateway: Gateway, method: str, path: str, size: int, token: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"request": f"{method} {path}", "announced_bytes": size, "token": token}
    auth = f"Authorization: Bearer {TOKEN}\r\n" if token else ""
    with measured(gateway, row):
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", gateway.http_port), timeout=10) as sock:
            sock.sendall(
                f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json"
                f"\r\nContent-Length: {size}\r\n\r\n".encode()
            )
            row["status"] = _status_line(sock)
        row["seconds"] = round(time.monotonic() - started, 3)
        row["body_bytes_sent"] = 0
    return row


def _status_line(sock: socket.socket) -> str:
    sock.settimeout(30)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data.split(b"\r\n", 1)[0].decode("latin-1")


# --------------------------------------------------------------------------- WebSocket


def ws_flood(gateway: Gateway, frame: bytes | str, clients: int, seconds: float) -> dict[str, Any]:
    httpx.put(f"{gateway.url}/v1/peers/bench", json={}, headers=gateway.headers, timeout=5)
    row: dict[str, Any] = {"clients": clients, "frame_bytes": len(frame), "seconds": seconds}
    codes: list[int | None] = []

    def client() -> None:
        url = f"{gateway.ws_url}/v1/peers/bench/subscribe?token={TOKEN}"
        deadline = time.monotonic() + seconds
        code = None
        try:
            with ws_connect(url, max_size=None) as ws:
                while time.monotonic() < deadline:
                    ws.send(frame)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
        except OSError:
            code = None
        codes.append(code)

    with measured(gateway, row):
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 30)
    row["close_codes"] = codes
    return row


# --------------------------------------------------------------------------- main


def run(quick: bool) -> dict[str, Any]:
    scale = 10 if quick else 1
    WORKDIR.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine_info(), "quick": quick, "rows": {}}
    rows = results["rows"]

    def with_gateway(name: str, body: Callable[[Gateway], None], **kwargs: Any) -> None:
        gateway = Gateway(name, WORKDIR, tokens=[TOKEN], **kwargs).start()
        try:
            body(gateway)
        finally:
            gateway.stop()

    def sip_rows(gateway: Gateway) -> None:
        rows["tcp_unread_replies_trusted"] = flood_unread(gateway, 200_000 // scale)
        rows["tcp_half_sent_1mb"] = half_sent(gateway, 300 // scale, 10)
        rows["tcp_trickle"] = trickle(gateway, max(4, 40 // scale), 15.0 / scale)
        rows["header_names"] = header_names(gateway, 100 // scale)

    def untrusted_rows(gateway: Gateway) -> None:
        rows["tcp_unread_replies_untrusted"] = flood_unread(gateway, 200_000 // scale)
        rows["udp_untrusted_requests"] = udp_untrusted(gateway, 200_000 // scale)

    def http_rows(gateway: Gateway) -> None:
        rows["http_slowloris"] = slowloris(gateway, 2000 // scale)
        wait_until(lambda: gateway.health() is not None, 30, "served again")
        rows["http_big_head"] = big_head(gateway, 200_000_000 // scale)
        rows["http_put_no_token"] = big_body(gateway, "PUT", "/v1/peers/x", 150_000_000, False)
        rows["http_broadcast_200mb"] = big_body(
            gateway, "POST", "/v1/peers/x/broadcast", 200_000_000, True
        )
        rows["ws_tiny_frames"] = ws_flood(gateway, '{"type":"reply"}', 2, 10.0 / scale)
        rows["ws_16mb_frames"] = ws_flood(gateway, b"x" * 16_000_000, 2, 10.0 / scale)

    with_gateway("abuse-sip", sip_rows, transport="tcp", timers=())
    with_gateway(
        "abuse-untrusted", untrusted_rows, transport="tcp", extra=("--trusted", "10.255.0.0/16")
    )
    with_gateway("abuse-http", http_rows)
    results["framer_1mb_in_64_byte_reads"] = framer_cpu()
    rows["tcp_partition_healed"] = tcp_partition(60.0 / scale)
    results["loadavg_at_end"] = list(os.getloadavg())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="every attack at a tenth of its size")
    args = parser.parse_args()
    results = run(args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "abuse.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["rows"], indent=2))
    print(json.dumps(results["framer_1mb_in_64_byte_reads"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
