"""What every benchmark shares: where results go, percentiles, CPU and memory readings of
the processes under test (psutil), the kernel's UDP drop counter, the machine's
description, the event loop, and waiting for a bus of gateways to form.

The processes themselves are started by :mod:`harness` (the same launchers as the tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import importlib.metadata
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

from harness.gateway import Gateway
from harness.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

#: Versions recorded with every result: what the figures depend on.
PACKAGES = (
    "dmq-gateway",
    "fastapi",
    "starlette",
    "uvicorn",
    "websockets",
    "uvloop",
    "httptools",
    "httpx",
    "h11",
    "pydantic",
    "psutil",
    "matplotlib",
)

T = TypeVar("T")

# --------------------------------------------------------------------------- numbers


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence; None when it is empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def rnd(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# --------------------------------------------------------------------------- processes


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process; None when it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def process_rss_kb(pid: int) -> int | None:
    """Resident memory of one process in KB (of 1024 bytes); None when it is gone."""
    try:
        return int(psutil.Process(pid).memory_info().rss // 1024)
    except psutil.Error:
        return None


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group ``pgid``.

    A server that forks workers (Kamailio) is measured whole; a process started in a
    session of its own leads a group whose id is its pid.
    """
    total = 0.0
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) != pgid:
                continue
            times = proc.cpu_times()
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
        total += times.user + times.system
    return total


def self_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


# --------------------------------------------------------------------------- the kernel


def udp_drops(port: int, host: str = "127.0.0.1") -> int | None:
    """The kernel's drop counter of the UDP sockets bound to ``host:port`` (/proc/net/udp).

    psutil does not report it. None when no such socket exists (or not on Linux).
    """
    needle = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    found: int | None = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 13 and cols[1] == needle:
                found = (found or 0) + int(cols[12])
    return found


def cpu_pressure() -> float | None:
    """The machine's CPU pressure: % of the last 10 s some runnable task waited for a CPU."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    for part in first.split():
        if part.startswith("avg10="):
            return float(part[6:])
    return None


def cpu_ticks() -> tuple[int, int] | None:
    """The machine's CPU time so far, in ticks: (all of it, stolen). *Steal* is the time
    a virtual CPU was ready to run and the host ran something else: on a virtual machine
    it is how busy the neighbours are, which no load figure inside it shows."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    ticks = [int(value) for value in fields[1:9]]
    return sum(ticks), ticks[7]


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """% of the machine's CPU time between two :func:`cpu_ticks` the host took away."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return round(100 * (after[1] - before[1]) / (after[0] - before[0]), 2)


# --------------------------------------------------------------------------- the machine


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine_info() -> dict[str, Any]:
    """Where and with what a run was made: CPUs, memory, Python, packages, commit."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_at_start": list(os.getloadavg()),
        "cpu_pressure_at_start": cpu_pressure(),
        "clock": time.get_clock_info("perf_counter").implementation,
        "memory_total_kb": psutil.virtual_memory().total // 1024,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info["packages"] = versions
    info["git_commit"] = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", "app")
    info["git_app_modified"] = None if status is None else bool(status)
    return info


# --------------------------------------------------------------------------- asyncio


def event_loop_factory() -> Any:
    """uvloop's loop factory when uvloop is installed, else None (the default loop)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


@contextlib.contextmanager
def no_collector_pauses() -> Iterator[None]:
    """The cyclic garbage collector of this (measuring) process off for the block,
    what lives already frozen out of its sight: a full pass in a benchmark's own
    client, 85-150 ms with the e2e subscriber's thousands of records, would be
    counted as the gateway's latency. Reference counting still frees nearly all."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def collect_between_phases() -> None:
    """For a process whose collector stays off (``gc.disable()``): collect now, between
    measured phases, and freeze what lives, so that the next collection has only the
    next phase's leftovers to look at."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(coro)


# --------------------------------------------------------------------------- gateways


def wait_joined(gateways: Sequence[Gateway], others: int, timeout: float = 20.0) -> None:
    """Until every gateway holds ``others`` other nodes as active."""

    def counts() -> list[int]:
        return [(g.health(timeout=5.0) or {}).get("active_nodes", 0) for g in gateways]

    wait_until(lambda: all(c >= others for c in counts()), timeout, f"{others} active nodes")


def register_peer(gateway: Gateway, peer: str, history: int = 100) -> None:
    """PUT /v1/peers/{peer} with ``reply: auto``."""
    response = httpx.put(
        f"{gateway.url}/v1/peers/{peer}",
        json={"reply": "auto", "history": history, "description": "benchmark"},
        headers=gateway.headers,
        timeout=5.0,
        trust_env=False,
    )
    if response.status_code not in (200, 201):
        raise RuntimeError(f"PUT peer {peer} on {gateway.name}: {response.status_code}")


def peer_info(gateway: Gateway, peer: str) -> dict[str, Any]:
    response = httpx.get(
        f"{gateway.url}/v1/peers/{peer}", headers=gateway.headers, timeout=5.0, trust_env=False
    )
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def bench_gateway(
    name: str,
    workdir: Path,
    *,
    notify: Sequence[Gateway | str] = (),
    queue_limit: int | None = None,
    extra: Sequence[str] = (),
) -> Gateway:
    """A gateway as a user runs it: default SIP timers and ping interval, warnings only.

    ``queue_limit`` is ``--ws-queue-limit``. Not started yet: call ``start()``.
    """
    options = list(extra)
    if queue_limit is not None:
        options += ["--ws-queue-limit", str(queue_limit)]
    return Gateway(
        name,
        workdir,
        notify=notify,
        ping_interval=60,
        log_level="warning",
        timers=(),
        extra=options,
    )
