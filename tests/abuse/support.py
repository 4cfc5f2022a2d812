"""What the abuse tests and ``bench/abuse.py`` share: KDMQ requests to send, a normal
client probing ``GET /v1/health`` while an attack runs, and a gateway process's memory
and descriptors (``psutil``)."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from dataclasses import dataclass, field

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from harness.gateway import Gateway

_branches = itertools.count(1)


def kdmq(port: int, peer: str = "nobody", body: bytes = b"x", *, via_port: int = 9) -> bytes:
    """One KDMQ request over TCP to ``peer`` of the node on ``port``."""
    branch = f"z9hG4bKabuse{next(_branches)}"
    return (
        f"KDMQ sip:{peer}@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP 127.0.0.1:{via_port};branch={branch}\r\n"
        f"From: <sip:{peer}@127.0.0.1:{via_port}>;tag=a1\r\n"
        f"To: <sip:{peer}@127.0.0.1:{port}>\r\n"
        f"Call-ID: {branch}@127.0.0.1\r\n"
        "CSeq: 1 KDMQ\r\n"
        "Max-Forwards: 1\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def rss_mb(gateway: Gateway) -> float:
    return float(psutil.Process(gateway.pid).memory_info().rss) / 2**20


def descriptors(gateway: Gateway) -> int:
    return int(psutil.Process(gateway.pid).num_fds())


def cpu_seconds(gateway: Gateway) -> float:
    times = psutil.Process(gateway.pid).cpu_times()
    return float(times.user + times.system)


@dataclass
class Probe:
    """A normal client: ``GET /v1/health`` every ``interval`` seconds in a thread (one
    keep-alive connection, opened again when the gateway closes it), recording how long
    each took and which failed."""

    gateway: Gateway
    interval: float = 0.05
    timeout: float = 2.0
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _ready: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Probe:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        # The probe is asking before what it watches starts: making the client takes
        # tens of milliseconds, and a fast load (1 000 refusals) can be over by then.
        self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        url = f"{self.gateway.url}/v1/health"
        client = httpx.Client(headers=self.gateway.headers, timeout=self.timeout, trust_env=False)
        with client:
            self._ready.set()
            while not self._stop.is_set():
                self._once(client, url)
                self._stop.wait(self.interval)

    def _once(self, client: httpx.Client, url: str) -> None:
        started = time.perf_counter()
        try:
            response = client.get(url)
            if response.status_code != 200:
                self.failures.append(f"HTTP {response.status_code}")
            else:
                self.latencies.append(time.perf_counter() - started)
        except httpx.HTTPError as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def summary(self) -> dict[str, float | int]:
        return {
            "probes": len(self.latencies),
            "failures": len(self.failures),
            "p50_ms": round(self.percentile(0.5) * 1000, 2),
            "p99_ms": round(self.percentile(0.99) * 1000, 2),
            "max_ms": round(max(self.latencies, default=float("nan")) * 1000, 2),
        }


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the other end closes ``sock`` within ``timeout`` s (what it sends
    meanwhile is read and dropped)."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True  # reset
    return False


def send_until_blocked(sock: socket.socket, data: bytes, limit: int, timeout: float) -> int:
    """Write ``data`` over and over without reading, until the writes block for
    ``timeout`` s or ``limit`` bytes went out; the bytes written."""
    sock.setblocking(False)
    sent = 0
    view = memoryview(data)
    offset = 0
    blocked_since: float | None = None
    while sent < limit:
        try:
            n = sock.send(view[offset:])
        except BlockingIOError:
            now = time.monotonic()
            if blocked_since is None:
                blocked_since = now
            elif now - blocked_since > timeout:
                break
            time.sleep(0.01)
            continue
        except OSError:
            break
        blocked_since = None
        sent += n
        offset = (offset + n) % len(data)
    return sent


def metric(gateway: Gateway, name: str, client: httpx.Client | None = None, **labels: str) -> float:
    """The value of sample ``name`` (with these labels) on the gateway's ``/metrics``;
    0 when it has no such sample (a series not created yet). ``client``: one kept open
    by a caller that scrapes often."""
    url = f"{gateway.url}/metrics"
    if client is None:
        with httpx.Client(headers=gateway.headers, timeout=5, trust_env=False) as one:
            response = one.get(url)
    else:
        response = client.get(url)
    response.raise_for_status()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


#: UDP datagrams sent before their answers are read: the socket buffers hold them all.
UDP_BATCH = 50


def udp_kdmq(port: int, source: tuple[str, int], peer: str = "htable") -> bytes:
    """One KDMQ request over UDP to the node on ``port``, from ``source``."""
    branch = f"z9hG4bKudp{next(_branches)}"
    host, via_port = source
    return (
        f"KDMQ sip:{peer}@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{via_port};branch={branch}\r\n"
        f"From: <sip:{peer}@{host}:{via_port}>;tag=u1\r\n"
        f"To: <sip:{peer}@127.0.0.1:{port}>\r\n"
        f"Call-ID: {branch}@{host}\r\n"
        "CSeq: 10 KDMQ\r\n"
        "Max-Forwards: 1\r\n"
        "Content-Type: text/plain\r\n"
        "Content-Length: 1\r\n\r\nx"
    ).encode()


def refused_over_udp(gateway: Gateway, host: str, count: int) -> int:
    """Send ``count`` distinct KDMQ requests over UDP from address ``host`` (a loopback
    address the gateway does not trust); the 403s that came back."""
    answers = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.settimeout(5)  # generous: a loaded machine answers late, never not at all
        source = sock.getsockname()
        for start in range(0, count, UDP_BATCH):
            batch = min(UDP_BATCH, count - start)
            for _ in range(batch):
                sock.sendto(udp_kdmq(gateway.sip_port, source), ("127.0.0.1", gateway.sip_port))
            for _ in range(batch):
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    break
                answers += data.startswith(b"SIP/2.0 403 ")
    return answers
