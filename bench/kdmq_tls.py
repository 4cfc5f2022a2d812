"""KDMQ over TLS next to TCP and UDP, ours and Kamailio 5.6 in one run; and what a
node joining over TLS costs.

**Throughput.** One client in this process keeps ``WINDOW`` KDMQ htable-set requests
in flight over one connection (TCP; TLS with a client certificate) or one UDP socket,
and counts the 200s; median of ``--runs`` runs per target. The targets: our gateway
(``--peer htable``, history in memory, ``--tls-verify-peer`` over TLS) and Kamailio
(``examples/kamailio/kamailio.cfg``: 8 UDP workers, 2 TCP/TLS workers, its ``tls``
module demanding a certificate of every peer). The same client drives both, so the
ratios are the servers', though the client shares the machine's two cores with them.
The server's CPU per request is read from its processes (Kamailio: all of them).

**Joining.** A node joining a bus opens a connection to a node, makes its handshake
and sends its first request. ``--joins`` times in a row, a fresh connection is opened,
one KDMQ is sent over it and answered, and it is closed: wall time per join, and the
server's CPU per join, over TCP and over TLS (mutual, TLS 1.3 as negotiated). TLS
minus TCP is the handshake's cost.

The certificates are made for the run with ``trustme`` (the test extras). Writes
``bench/results/kdmq-tls.json`` and ``kdmq-tls.png``.

    .venv/bin/python -m bench.kdmq_tls [--requests N] [--runs R] [--joins J]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.dmq.sip import StreamFramer
from bench.common import (
    RESULTS,
    group_cpu_seconds,
    machine_info,
    percentile,
    process_cpu_seconds,
    rnd,
    run_async,
)
from harness.gateway import Gateway, TlsFiles
from harness.kamailio import KamailioNode, kamailio_available
from harness.ports import free_port

WINDOW = 64
PEER = "htable"
BODY = b'{"action":2,"htname":"ht","cname":"k","type":2,"strval":"v","mode":1}'
TRANSPORTS = ("udp", "tcp", "tls")


def request(port: int, transport: str, number: int, local_port: int) -> bytes:
    branch = f"z9hG4bKbench{number}x{local_port}"
    return (
        f"KDMQ sip:{PEER}@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport.upper()} 127.0.0.1:{local_port};branch={branch}\r\n"
        f"From: <sip:{PEER}@127.0.0.1:{local_port}>;tag=b{number}\r\n"
        f"To: <sip:{PEER}@127.0.0.1:{port}>\r\n"
        f"Call-ID: {branch}@bench\r\n"
        "CSeq: 1 KDMQ\r\n"
        "Max-Forwards: 1\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY


async def stream_run(
    port: int, transport: str, total: int, context: ssl.SSLContext | None
) -> float:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1" if context else None
    )
    local_port = writer.get_extra_info("sockname")[1]
    framer = StreamFramer(1 << 20)
    sent = answered = 0
    started = time.perf_counter()
    while sent < min(WINDOW, total):
        writer.write(request(port, transport, sent, local_port))
        sent += 1
    while answered < total:
        data = await asyncio.wait_for(reader.read(65536), 10)
        if not data:
            raise RuntimeError(f"{transport}: the server closed the connection")
        for message in framer.feed(data):
            if not message.startswith(b"SIP/2.0 200"):
                raise RuntimeError(f"{transport}: answered {message[:40]!r}")
            answered += 1
            if sent < total:
                writer.write(request(port, transport, sent, local_port))
                sent += 1
    elapsed = time.perf_counter() - started
    writer.close()
    return total / elapsed


class _Udp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.answers.put_nowait(data)


async def udp_run(port: int, total: int) -> float:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Udp, remote_addr=("127.0.0.1", port))
    local_port = transport.get_extra_info("sockname")[1]
    sent = answered = 0
    started = time.perf_counter()
    while sent < min(WINDOW, total):
        transport.sendto(request(port, "udp", sent, local_port))
        sent += 1
    while answered < total:
        data = await asyncio.wait_for(protocol.answers.get(), 5)
        if not data.startswith(b"SIP/2.0 200"):
            continue  # a provisional answer, or a late retransmitted one
        answered += 1
        if sent < total:
            transport.sendto(request(port, "udp", sent, local_port))
            sent += 1
    elapsed = time.perf_counter() - started
    transport.close()
    return total / elapsed


async def joins(
    port: int, transport: str, count: int, context: ssl.SSLContext | None
) -> list[float]:
    """Seconds of each of ``count`` joins: connect (and handshake), one KDMQ, its 200."""
    times = []
    for number in range(count):
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1" if context else None
        )
        local_port = writer.get_extra_info("sockname")[1]
        writer.write(request(port, transport, number, local_port))
        framer = StreamFramer(1 << 20)
        answered = False
        while not answered:
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                raise RuntimeError(f"{transport}: closed before the answer")
            answered = any(m.startswith(b"SIP/2.0 200") for m in framer.feed(data))
        times.append(time.perf_counter() - started)
        writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), 5)
    return times


def make_pki(directory: Path) -> tuple[TlsFiles, TlsFiles]:
    import trustme  # the test extras

    ca = trustme.CA()
    ca_path = str(directory / "ca.pem")
    ca.cert_pem.write_to_path(ca_path)
    files = []
    for name in ("server", "client"):
        leaf = ca.issue_cert("127.0.0.1", f"{name}.bench")
        cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
        for blob in leaf.cert_chain_pems:
            blob.write_to_path(str(cert), append=True)
        leaf.private_key_pem.write_to_path(str(key))
        files.append(TlsFiles(str(cert), str(key), ca_path))
    return files[0], files[1]


class Target:
    """A server under test: its SIP port, its CPU seconds, how to stop it."""

    def __init__(self, port: int, cpu: Callable[[], float], stop: Callable[[], None]) -> None:
        self.port = port
        self.cpu = cpu
        self.stop = stop


def start_ours(workdir: Path, transport: str, files: TlsFiles) -> Target:
    # History in memory: the transport's cost, not the store's, is measured.
    extra = ["--peer", PEER, "--history-store", "memory"]
    if transport == "tls":
        extra.append("--tls-verify-peer")
    gateway = Gateway(
        f"bench-{transport}",
        workdir,
        transport=transport,
        tls=files if transport == "tls" else None,
        log_level="warning",
        timers=(),
        ping_interval=60,
        extra=extra,
    )
    gateway.start()
    return Target(gateway.sip_port, lambda: process_cpu_seconds(gateway.pid) or 0.0, gateway.stop)


def start_kamailio(workdir: Path, transport: str, files: TlsFiles) -> Target:
    node = KamailioNode(
        workdir / f"kamailio-{transport}",
        free_port(),
        transport=transport,  # type: ignore[arg-type]
        ping_interval=60,
        log_level=1,
        tls_files=(files.cert, files.key, files.ca) if transport == "tls" else None,
    )
    return Target(node.port, lambda: group_cpu_seconds(node.pid), node.stop)


def measure(
    target: Target,
    transport: str,
    args: argparse.Namespace,
    context: ssl.SSLContext,
) -> dict[str, Any]:
    rates: list[float] = []
    cpu_per_request: list[float] = []
    for _ in range(args.runs):
        cpu_before = target.cpu()
        if transport == "udp":
            rate = run_async(udp_run(target.port, args.requests))
        else:
            tls_context = context if transport == "tls" else None
            rate = run_async(stream_run(target.port, transport, args.requests, tls_context))
        cpu_per_request.append((target.cpu() - cpu_before) / args.requests)
        rates.append(rate)
    row: dict[str, Any] = {
        "requests_per_second_median": round(statistics.median(rates)),
        "runs": [round(r) for r in rates],
        "server_cpu_us_per_request": round(statistics.median(cpu_per_request) * 1e6, 1),
        "loadavg_after": list(os.getloadavg()),
    }
    if transport != "udp" and args.joins:
        tls_context = context if transport == "tls" else None
        cpu_before = target.cpu()
        times = sorted(run_async(joins(target.port, transport, args.joins, tls_context)))
        cpu = target.cpu() - cpu_before
        row["joins"] = {
            "count": args.joins,
            "ms_median": rnd(statistics.median(times) * 1000),
            "ms_p90": rnd((percentile(times, 90) or 0.0) * 1000),
            "server_cpu_ms_per_join": rnd(cpu / args.joins * 1000),
            "total_s": rnd(sum(times)),
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--joins", type=int, default=200)
    parser.add_argument("--no-kamailio", action="store_true", help="ours only")
    args = parser.parse_args()
    info = machine_info()
    servers: list[tuple[str, Callable[[Path, str, TlsFiles], Target]]] = [("ours", start_ours)]
    if not args.no_kamailio:
        if not kamailio_available():
            raise SystemExit("kamailio is not installed (or pass --no-kamailio)")
        servers.append(("kamailio", start_kamailio))
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server_files, client_files = make_pki(workdir)
        context = ssl.create_default_context(cafile=client_files.ca)
        context.load_cert_chain(client_files.cert, client_files.key)
        # Interleaved (ours, Kamailio, ours...) so that the shared machine's load
        # swings fall on both.
        for transport in TRANSPORTS:
            for server, start in servers:
                target = start(workdir, transport, server_files)
                try:
                    row = measure(target, transport, args, context)
                finally:
                    target.stop()
                results.setdefault(server, {})[transport] = row
                print(f"{server} {transport}: {json.dumps(row)}", flush=True)
    ratios: dict[str, Any] = {}
    for server, rows in results.items():
        ratios[f"{server}_tls_over_tcp"] = round(
            rows["tls"]["requests_per_second_median"] / rows["tcp"]["requests_per_second_median"],
            2,
        )
        if "joins" in rows["tls"]:
            ratios[f"{server}_handshake_ms"] = rnd(
                rows["tls"]["joins"]["ms_median"] - rows["tcp"]["joins"]["ms_median"]
            )
            ratios[f"{server}_handshake_cpu_ms"] = rnd(
                rows["tls"]["joins"]["server_cpu_ms_per_join"]
                - rows["tcp"]["joins"]["server_cpu_ms_per_join"]
            )
    if "kamailio" in results:
        for transport in TRANSPORTS:
            ratios[f"ours_over_kamailio_{transport}"] = round(
                results["ours"][transport]["requests_per_second_median"]
                / results["kamailio"][transport]["requests_per_second_median"],
                2,
            )
    result = {
        "machine": info,
        "loadavg_at_end": list(os.getloadavg()),
        "requests": args.requests,
        "window": WINDOW,
        "runs": args.runs,
        "joins": args.joins,
        "kamailio": "examples/kamailio/kamailio.cfg: 8 UDP workers, 2 TCP/TLS workers",
        "results": results,
        "ratios": ratios,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kdmq-tls.json").write_text(json.dumps(result, indent=2) + "\n")
    chart(result, RESULTS / "kdmq-tls.png")
    print(json.dumps(ratios, indent=2))


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = result["results"]
    servers = list(results)
    colours = {"ours": "#4c72b0", "kamailio": "#dd8452"}
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(servers)
    for index, server in enumerate(servers):
        xs = [t + index * width for t in range(len(TRANSPORTS))]
        rates = [results[server][t]["requests_per_second_median"] for t in TRANSPORTS]
        left.bar(xs, rates, width, label=server, color=colours.get(server))
        for x, rate in zip(xs, rates, strict=True):
            left.text(x, rate, f"{rate:,}", ha="center", va="bottom", fontsize=8)
    left.set_xticks([t + width * (len(servers) - 1) / 2 for t in range(len(TRANSPORTS))])
    left.set_xticklabels([t.upper() for t in TRANSPORTS])
    left.set_ylabel("KDMQ requests/s (median)")
    left.set_title(f"{WINDOW} in flight, one connection")
    left.legend()
    labels, wall, cpu = [], [], []
    for server in servers:
        for transport in ("tcp", "tls"):
            joined = results[server][transport].get("joins")
            if joined:
                labels.append(f"{server}\n{transport.upper()}")
                wall.append(joined["ms_median"])
                cpu.append(joined["server_cpu_ms_per_join"])
    xs = list(range(len(labels)))
    right.bar([x - 0.2 for x in xs], wall, 0.4, label="wall ms per join (median)", color="#55a868")
    right.bar([x + 0.2 for x in xs], cpu, 0.4, label="server CPU ms per join", color="#8172b2")
    right.set_xticks(xs)
    right.set_xticklabels(labels)
    right.set_title(f"a node joining: connect, handshake, 1 KDMQ ({result['joins']}x)")
    right.legend()
    load = result["machine"]["loadavg_at_start"][0]
    figure.suptitle(f"KDMQ over UDP, TCP, TLS (load average {load:.1f} on 2 cores)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
