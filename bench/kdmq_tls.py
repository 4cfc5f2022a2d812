"""KDMQ throughput over TLS next to TCP and UDP, into one gateway (``--peer htable``).

One client in this process keeps ``WINDOW`` requests in flight to the gateway's SIP
port over one connection (TCP, TLS with a client certificate and ``--tls-verify-peer``)
or one UDP socket, and counts the 200s; median of ``RUNS`` runs per transport. The
certificates are made for the run with ``trustme`` (the test extras). Writes
``bench/results/kdmq-tls.json``.

    .venv/bin/python -m bench.kdmq_tls [--requests N] [--runs R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from app.dmq.sip import StreamFramer
from bench.common import RESULTS, machine_info, run_async
from harness.gateway import Gateway, TlsFiles

WINDOW = 64
PEER = "htable"
BODY = b'{"action":2,"htname":"ht","cname":"k","type":2,"strval":"v","mode":1}'


def request(port: int, transport: str, number: int, local_port: int) -> bytes:
    branch = f"z9hG4bKbench{number}"
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
        data = await reader.read(65536)
        if not data:
            raise RuntimeError(f"{transport}: the gateway closed the connection")
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
            raise RuntimeError(f"udp: answered {data[:40]!r}")
        answered += 1
        if sent < total:
            transport.sendto(request(port, "udp", sent, local_port))
            sent += 1
    elapsed = time.perf_counter() - started
    transport.close()
    return total / elapsed


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server_files, client_files = make_pki(workdir)
        context = ssl.create_default_context(cafile=client_files.ca)
        context.load_cert_chain(client_files.cert, client_files.key)
        for transport in ("udp", "tcp", "tls"):
            # History in memory: the transport's cost, not the store's, is measured.
            extra = ["--peer", PEER, "--history-store", "memory"]
            if transport == "tls":
                extra.append("--tls-verify-peer")
            gateway = Gateway(
                f"bench-{transport}",
                workdir,
                transport=transport,
                tls=server_files if transport == "tls" else None,
                log_level="warning",
                timers=(),
                ping_interval=60,
                extra=extra,
            )
            try:
                gateway.start()
                rates = []
                for _ in range(args.runs):
                    if transport == "udp":
                        rate = run_async(udp_run(gateway.sip_port, args.requests))
                    else:
                        tls_context = context if transport == "tls" else None
                        rate = run_async(
                            stream_run(gateway.sip_port, transport, args.requests, tls_context)
                        )
                    rates.append(rate)
                rows[transport] = {
                    "requests_per_second_median": round(statistics.median(rates)),
                    "runs": [round(r) for r in rates],
                }
                print(f"{transport}: {rows[transport]}", flush=True)
            finally:
                gateway.stop()
    rows["tls_over_tcp"] = round(
        rows["tls"]["requests_per_second_median"] / rows["tcp"]["requests_per_second_median"], 2
    )
    result = {
        "machine": machine_info(),
        "requests": args.requests,
        "window": WINDOW,
        "runs": args.runs,
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kdmq-tls.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
